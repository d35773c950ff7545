"""How one row of a source dataset becomes one of the project's chat records, per task: each
task's `TaskFormat` is declared in its own module of `paratransfer.tasks` (with its prompt and
score) and registered once in `tasks/registry.py`; `FORMATS` here is that registry.

A `TaskFormat` names the fields it reads, each with the column it is read from by default
(`--columns FIELD=COLUMN` reads it from another), the conversation it writes, and where its data
usually lives on the Hugging Face hub. Records are `{"dataset", "id", "messages"}` (MMLU adds
`category`), the shape `paratransfer.tasks.examples` reads and `paratransfer.evaluate` scores.

Hub ids, configs, splits and columns, checked against each dataset's card on the hub (and, for
Super-NI and LIMA, code that loads them with `datasets`):
- `openai/gsm8k`, config `main`: `question`, `answer` (worked solution with `<<calc>>`
  annotations, ending in `#### N`); splits `train` (7,473), `test` (1,319).
- `cais/mmlu`, config `all`: `question`, `subject`, `choices` (4 strings), `answer` (class
  label 0-3 = A-D); splits `auxiliary_train`, `dev` (285), `validation` (1,531), `test` (14,042).
- `Muennighoff/natural-instructions` (Super-NaturalInstructions): `task_name`, `id`,
  `definition`, `inputs`, `targets`; splits `train`, `validation`, `test`.
- `GAIR/lima`: `conversations` (strings, user first), `source`; splits `train` (1,030) and
  `test` (300 prompts without answers). The repository holds a loading script, which `datasets`
  4 and later refuse, so its data file is read directly: `hf://datasets/GAIR/lima/train.jsonl`.
"""

from __future__ import annotations

from paratransfer.io.errors import UserError
from paratransfer.tasks.gsm import FORMAT as GSM
from paratransfer.tasks.gsm import gsm_answer
from paratransfer.tasks.mmlu import FORMAT as MMLU
from paratransfer.tasks.open import LIMA_FORMAT as LIMA
from paratransfer.tasks.open import OPEN_FORMAT as OPEN
from paratransfer.tasks.registry import FORMATS
from paratransfer.tasks.super_ni import FORMAT as SUPER_NI
from paratransfer.tasks.super_ni import SUPER_NI_EXAMPLES
from paratransfer.tasks.task import BadRow, Field, TaskFormat

__all__ = ["FORMATS", "GSM", "LIMA", "MMLU", "OPEN", "SUPER_NI", "SUPER_NI_EXAMPLES", "BadRow",
           "Field", "TaskFormat", "get_format", "gsm_answer", "parse_columns"]


def get_format(name: str) -> TaskFormat:
    """The registered task format, or a one-line error naming the known ones."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown task {name!r} (expected one of: {', '.join(FORMATS)})") from None


def parse_columns(fmt: TaskFormat, text: str | None) -> dict[str, str | None]:
    """`FIELD=COLUMN,...` over the task's defaults: field name -> source column (None: unused)."""
    columns = {f.name: f.column for f in fmt.all_fields}
    if not text:
        return columns
    for item in text.split(","):
        name, sep, column = (s.strip() for s in item.partition("="))
        if not sep or not name or not column:
            raise UserError(f"--columns: {item.strip()!r} is not FIELD=COLUMN "
                            "(expected e.g. question=prompt,answer=solution)")
        if name not in columns:
            raise UserError(f"--columns: task {fmt.name} has no field {name!r} "
                            f"(expected one of: {', '.join(columns)})")
        columns[name] = column
    return columns
