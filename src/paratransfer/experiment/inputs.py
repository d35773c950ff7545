"""What a run read, by content: `RUN_DIR/inputs.json`, checked by `run --resume`.

`recipe.json` fixes the recipe as written (seeds, settings, arms, which files); it cannot see a
file whose rows changed under the same name. A resumed run that read another training file
than its finished steps would mix two data sets in one results table, so every data file is
recorded by its SHA-256 and every local model folder by a fingerprint of its files, and
`--resume` refuses when one of them differs (as `train --resume` does for its own inputs).

A model folder's fingerprint hashes its small files (config, tokenizer) whole and, of each
large file (the weights), the size and three 1 MiB pieces (start, middle, end): any change of
shape, dtype, header or a retrained tensor shows, in milliseconds even for a 13B model. A hub
id is recorded as given (the hub decides what it names).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from paratransfer.io.errors import UserError

INPUTS_FILE = "inputs.json"
#: Files up to this size are hashed whole; larger ones by size and three pieces.
WHOLE_BELOW = 16 << 20
PIECE = 1 << 20


def _file_digest(path: Path) -> str:
    from paratransfer.tasks.examples import file_digest

    return file_digest(path)


def _large_file_digest(path: Path, size: int) -> str:
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        for start in (0, max(0, size // 2 - PIECE // 2), max(0, size - PIECE)):
            fh.seek(start)
            h.update(fh.read(PIECE))
    return h.hexdigest()


def model_digest(name: str) -> str:
    """A local model folder's fingerprint (see the module docstring); a hub id as given."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return f"hub:{name}"
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue  # hidden files (caches, locks) are not the model
        size = path.stat().st_size
        digest = _file_digest(path) if size < WHOLE_BELOW else _large_file_digest(path, size)
        h.update(f"{rel.as_posix()}:{digest};".encode())
    return h.hexdigest()


def input_digests(recipe) -> dict[str, str]:
    """Every input of `recipe` by the recipe key that names it."""
    out = {"teacher": model_digest(recipe.teacher), "student": model_digest(recipe.student)}
    for key, path in vars(recipe.task).items():
        if isinstance(path, Path):  # the task's files (not its type)
            out[f"task.{key}"] = _file_digest(path)
    if recipe.settings.get("shots_data") is not None:
        out["shots_data"] = _file_digest(Path(recipe.settings["shots_data"]))
    for arm, change in recipe.arms.items():
        if change.get("shots_data") is not None:
            out[f"arms.{arm}.shots_data"] = _file_digest(Path(change["shots_data"]))
    return out


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two records (missing on one side included)."""
    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))


def check_same_inputs(folder: Path, out: Path, now: dict[str, str]) -> bool:
    """UserError when `folder`'s recorded inputs differ from `now`; False when none are
    recorded (a run folder from a version that did not record them)."""
    from paratransfer.io.readers import read_json

    record = folder / INPUTS_FILE
    if not record.is_file():
        return False
    saved = read_json(record, "a run's input fingerprints")
    changed = differences(saved, now)
    if changed:
        raise UserError(f"--resume: {out}: {', '.join(changed)} changed since the run started "
                        f"(its content differs from what the finished steps read; {INPUTS_FILE}); "
                        "restore it, or start again with a new --out or --overwrite")
    return True
