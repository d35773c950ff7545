"""Where task data comes from: a hub dataset, a `save_to_disk` folder, or data files.

Everything goes through the `datasets` library (4.x/5.x API: `load_dataset`, `load_from_disk`,
checked against its loading guide and reference): a hub id is `load_dataset(ID, CONFIG,
revision=...)`; a folder with `dataset_dict.json` or `state.json` is `load_from_disk`; any other
folder is `load_dataset(FOLDER)`, which reads JSON/JSONL/Parquet/CSV files and names splits after
the files (`train.jsonl`, `test.jsonl`); a single file, local or `hf://datasets/...`, is the split
"train". The result is split name -> `datasets.Dataset`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paratransfer.io.errors import UserError
from paratransfer.sources.local import check_source_files, digests

#: Data-file suffix -> the `datasets` builder that reads it.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

#: Local files are read again every time: the library's cache is keyed on their path and
#: modification time, not on their content (see `sources.local`).
_REBUILD = "force_redownload"

_EXPECTED = ("expected a hub dataset id, a folder saved with save_to_disk, or "
             "JSON/JSONL/Parquet/CSV files")


@dataclass(frozen=True)
class Source:
    """The loaded splits and how they were found (recorded in data.json)."""

    splits: dict[str, Any]   # split name -> datasets.Dataset
    kind: str                # "hub" | "disk" | "files"
    config: str | None
    revision: str | None
    sha256: dict[str, str] | None = None  # local data files -> their SHA-256


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_saved(folder: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _as_splits(loaded: Any) -> dict[str, Any]:
    """DatasetDict -> its splits; a lone Dataset is the split "train"."""
    from datasets import Dataset

    if isinstance(loaded, Dataset):
        return {"train": loaded}
    return dict(loaded.items())


def load_source(source: str, *, config: str | None = None, revision: str | None = None,
                cache_dir: str | Path | None = None) -> Source:
    """Load every split of `source`; a one-line UserError naming it when that fails."""
    import datasets

    path = Path(source)
    suffix = path.suffix.lower()
    local = path.exists()
    remote_file = source.startswith("hf://")
    if config is not None and (local or remote_file):
        raise UserError(f"--config: only for hub dataset ids (got the files {source})")
    if revision is not None and (local or remote_file):
        raise UserError(f"--revision: only for hub dataset ids (got the files {source}; "
                        "a hub file takes one as hf://datasets/OWNER/NAME@REVISION/FILE)")
    if not local and not remote_file and (suffix in FILE_BUILDERS or "\\" in source
                                          or source.startswith((".", "/", "~"))):
        raise UserError(f"{source}: no such file or folder ({_EXPECTED})")
    try:
        if local and path.is_dir() and _is_saved(path):
            return Source(_as_splits(datasets.load_from_disk(str(path))), "disk", None, None)
        if local and path.is_dir():
            files = check_source_files(path)
            loaded = datasets.load_dataset(str(path), cache_dir=_str(cache_dir),
                                           download_mode=_REBUILD)
            return Source(_as_splits(loaded), "files", None, None, digests(path, files))
        if local or remote_file:
            if suffix not in FILE_BUILDERS:
                raise UserError(f"{source}: unknown file type {suffix or '(none)'!r} "
                                f"(expected one of: {', '.join(FILE_BUILDERS)})")
            files = check_source_files(path) if local else []
            loaded = datasets.load_dataset(FILE_BUILDERS[suffix], data_files={"train": source},
                                           cache_dir=_str(cache_dir),
                                           download_mode=_REBUILD if local else None)
            return Source(_as_splits(loaded), "files", None, None,
                          digests(path, files) if local else None)
        loaded = datasets.load_dataset(source, config, revision=revision, cache_dir=_str(cache_dir))
        return Source(_as_splits(loaded), "hub", config, revision)
    except UserError:
        raise
    except Exception as e:  # network, missing config, gated repository, unreadable files, ...
        raise UserError(f"{source}: could not load it: {_one_line(e)} ({_EXPECTED})") from None


def _str(path: str | Path | None) -> str | None:
    return None if path is None else str(path)


def pick_split(source: Source, name: str, where: str) -> list[tuple[str, Any]]:
    """The parts of a split spec ("train", "dev+validation") as (name, Dataset) pairs."""
    parts = []
    for part in name.split("+"):
        part = part.strip()
        if part not in source.splits:
            raise UserError(f"{where}: no split {part!r} (splits: {', '.join(source.splits)})")
        parts.append((part, source.splits[part]))
    return parts
