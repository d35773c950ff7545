"""Task data in the project's formats from Hugging Face datasets or local files.

`formats` says how a row becomes a chat record for each task (GSM, MMLU,
Super-NaturalInstructions, LIMA, any instruction data through a column mapping), `loading` finds
the splits (hub id, `save_to_disk` folder, data files), `build` samples seeds / train / eval
reproducibly and writes them atomically with a data.json describing what was done.
"""

from paratransfer.sources.build import RULE, DataSettings, build_data
from paratransfer.sources.formats import FORMATS, TaskFormat, get_format

__all__ = ["FORMATS", "RULE", "DataSettings", "TaskFormat", "build_data", "get_format"]
