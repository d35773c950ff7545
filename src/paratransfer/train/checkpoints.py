"""Checkpoints: LoRA factors and AdamW state (safetensors) plus the rest (JSON), written
atomically every few steps; a resumed run checks it continues the same run.

`state.json` is written after the tensors and records their SHA-256, so a checkpoint whose
files were damaged (a truncated copy, a full disk) is recognised: `last_checkpoint` skips it
and resumes from the newest intact one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from paratransfer.io.errors import UserError
from paratransfer.io.outputs import atomic_dir, scratch_dir, write_json
from paratransfer.train.state import Run

CHECKPOINTS = "checkpoints"
TENSORS = "state.safetensors"
STATE = "state.json"
#: Settings that may differ between a run and its resumption (they do not change the result).
_RESUMABLE_CHANGES = {"checkpoint_every", "keep_checkpoints"}


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted (None when it is intact)."""
    from paratransfer.io.readers import read_json, safetensors_header
    from paratransfer.tasks.examples import file_digest

    try:
        info = read_json(folder / STATE, "a checkpoint's state")
        if not isinstance(info, dict) or not isinstance(info.get("step"), int):
            return f"{folder / STATE}: no step number"
        want = info.get("tensors_sha256")
        if want is not None:
            if not (folder / TENSORS).is_file():
                return f"{folder / TENSORS}: missing"
            if file_digest(folder / TENSORS) != want:
                return f"{folder / TENSORS}: its SHA-256 differs from the one recorded"
        else:  # written before digests were recorded: the file must at least be whole
            safetensors_header(folder / TENSORS)
    except UserError as e:
        return str(e)
    return None


def last_checkpoint(out: Path, say=None) -> Path | None:
    """The newest intact checkpoint folder of a run, or None; `say` (e.g. `console.notice`)
    hears about each newer one that was skipped as damaged."""
    folder = Path(out) / CHECKPOINTS
    if not folder.is_dir():
        return None
    for path in sorted((p for p in folder.glob("step-*") if p.is_dir()), reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if say is not None:
            say(f"checkpoint {path.name} is damaged, not resumed from ({problem})")
    return None


def save_checkpoint(run: Run, step: int) -> Path:
    """LoRA factors, AdamW state (tensors) and the rest (JSON), written atomically."""
    from safetensors.torch import save_file

    from paratransfer.tasks.examples import file_digest

    tensors = {f"param.{n}": p.detach().cpu().clone().contiguous() for n, p in run.trainable}
    state = run.optimizer.state_dict()
    other: dict[str, dict] = {}
    for i, s in state["state"].items():
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{i}.{k}"] = v.detach().cpu().clone().contiguous()
            else:
                other.setdefault(str(i), {})[k] = v
    path = run.out / CHECKPOINTS / f"step-{step:06d}"
    with atomic_dir(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        info = {"step": step, "meta": run.meta, "history": run.history,
                "heldout_history": run.heldout_history,
                "param_names": [n for n, _ in run.trainable],
                "optimizer": {"param_groups": state["param_groups"], "other_state": other},
                "tensors_sha256": file_digest(tmp / TENSORS),
                "timing": run.timing()}
        write_json(tmp / STATE, info)
    old = sorted(p for p in (run.out / CHECKPOINTS).glob("step-*") if p.is_dir())
    for p in old[:-run.settings.keep_checkpoints]:
        _discard(p)
    return path


def _discard(folder: Path) -> None:
    """Remove a folder by first renaming it to a temporary: killed midway, what is left is a
    stale temporary the next run removes, never a half-deleted checkpoint."""
    import shutil

    trash = scratch_dir(folder.parent, folder.name, "old")
    os.replace(folder, trash / folder.name)
    shutil.rmtree(trash, ignore_errors=True)


def restore_checkpoint(run: Run, folder: Path) -> None:
    """Load a checkpoint into the run, after checking it belongs to the same settings and data."""
    from paratransfer.io.readers import load_tensors, read_json

    info = read_json(folder / STATE, "a checkpoint's state")
    _check_same_run(info["meta"], run.meta, folder)
    tensors = load_tensors(folder / TENSORS)
    names = [n for n, _ in run.trainable]
    if names != info["param_names"]:
        raise UserError(f"{folder}: its LoRA parameters differ from this run's")
    with torch.no_grad():
        for n, p in run.trainable:
            p.copy_(tensors[f"param.{n}"].to(p.device, p.dtype))
    state: dict = {"state": {}, "param_groups": info["optimizer"]["param_groups"]}
    for key, t in tensors.items():
        if key.startswith("optimizer."):
            _, i, k = key.split(".", 2)
            state["state"].setdefault(int(i), {})[k] = t
    for i, extra in info["optimizer"]["other_state"].items():
        state["state"].setdefault(int(i), {}).update(extra)
    run.optimizer.load_state_dict(state)
    run.history = [{k: v for k, v in h.items() if k not in ("seconds", "teacher_seconds")}
                   for h in info["history"]]
    run.heldout_history = info.get("heldout_history", [])
    run.start_step = info["step"]
    timing = info.get("timing") or {"train_seconds": info.get("seconds", 0.0)}
    run.seconds = timing.get("train_seconds", 0.0)
    run.step_seconds = list(timing.get("step_seconds", []))
    run.teacher_seconds = list(timing.get("teacher_seconds", []))
    run.resumed_from = [*timing.get("resumed_from", []), info["step"]]


def _check_same_run(saved: dict, now: dict, folder: Path) -> None:
    """A resumed run must train the same thing: same student, data, adapter and settings."""
    for key in ("student", "data_sha256", "adapter_sha256", "init"):
        if saved.get(key) != now.get(key):
            raise UserError(f"--resume: {key} is {now.get(key)!r} now but {saved.get(key)!r} in "
                            f"{folder} (give the command that started the run)")
    digests = [(m.get("heldout") or {}).get("data_sha256") for m in (saved, now)]
    if digests[0] != digests[1]:
        raise UserError(f"--resume: the held-out examples (--eval-data) differ from those of the "
                        f"run in {folder} (give the command that started the run)")
    from paratransfer.train.settings import TrainSettings

    defaults = TrainSettings().as_dict()
    for key, value in now["settings"].items():
        if key not in saved["settings"] and value == defaults.get(key):
            continue  # a setting added since that checkpoint, at its default: what it ran with
        if key not in _RESUMABLE_CHANGES and saved["settings"].get(key) != value:
            raise UserError(f"--resume: setting {key} is {value!r} now but "
                            f"{saved['settings'].get(key)!r} in {folder} (give the command that "
                            "started the run)")
