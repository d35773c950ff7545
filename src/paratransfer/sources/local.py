"""Local data files, checked by this project before `datasets` reads them, and their digests.

`datasets` reports a malformed JSONL or CSV file as "An error occurred while generating the
dataset" (and an empty one as `StopIteration`), naming no line; and it caches what it read
under a key built from the file's path and modification time, so a file whose rows changed
while its mtime stayed (restored by a copy tool, a checkout) is served from the old cache.
Here every JSON/JSONL/CSV file is read line by line first (a bad one is `FILE:LINE: what is
wrong`), its SHA-256 is recorded, and the loader is told to rebuild its cache from the files.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from paratransfer.io.errors import UserError
from paratransfer.io.readers import json_line

#: Suffixes of the data files a folder source is read from.
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


def data_files(path: Path) -> list[Path]:
    """The data files a local source consists of: the file itself, or a folder's data files."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def check_file(path: Path) -> None:
    """A one-line UserError naming `path` (and the line) when it cannot be a table of rows."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return  # binary, checked by its reader as a whole
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if not raw.strip():
        raise UserError(f"{path}: empty (expected rows of data)")
    if suffix == ".csv":
        _check_csv(path, raw)
    elif suffix == ".json" and _whole_json(path, raw):
        return
    else:
        _check_jsonl(path, raw)


def _whole_json(path: Path, raw: bytes) -> bool:
    """A .json file holding one JSON value (a list of objects, or an object): checked here;
    False when it is not one value (then it is read as JSON lines)."""
    try:
        value = json_line(raw, str(path), "a list of JSON objects, or one object per line")
    except UserError:
        return False
    if isinstance(value, list):
        for i, row in enumerate(value):
            if not isinstance(row, dict):
                raise UserError(f"{path}: item {i} is {type(row).__name__} (expected a JSON "
                                "object per row)")
    elif not isinstance(value, dict):
        raise UserError(f"{path}: holds a JSON {type(value).__name__} (expected a list of "
                        "objects, or one object per line)")
    return True


def _check_jsonl(path: Path, raw: bytes) -> None:
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        row = json_line(line, f"{path}:{lineno}")
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: a JSON {type(row).__name__} (expected one JSON "
                            "object per line)")


def _check_csv(path: Path, raw: bytes) -> None:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 at byte {e.start} (expected a UTF-8 CSV "
                        "file)") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        width = len(header)
        if not any(h.strip() for h in header):
            raise UserError(f"{path}:1: an empty header (expected column names)")
        if len(set(header)) != width:
            raise UserError(f"{path}:1: a column name is repeated ({', '.join(header)})")
        for row in reader:
            if row and len(row) != width:
                raise UserError(f"{path}:{reader.line_num}: {len(row)} fields, the header has "
                                f"{width} (expected one value per column)")
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def check_source_files(path: Path) -> list[Path]:
    """Check every data file of a local source; returns them (none: a UserError)."""
    files = data_files(path)
    if not files:
        raise UserError(f"{path}: no data files in it (expected {', '.join(DATA_SUFFIXES)} files "
                        "or a folder saved with save_to_disk)")
    for f in files:
        check_file(f)
    return files


def digests(root: Path, files: list[Path]) -> dict[str, str]:
    """Each file's SHA-256, by its path relative to the source (the file's name for one file)."""
    from paratransfer.tasks.examples import file_digest

    return {(f.name if f == root else str(f.relative_to(root))): file_digest(f) for f in files}

