"""Checkpoints: LoRA factors and AdamW state (safetensors) plus the rest (JSON), written
atomically every few steps; a resumed run checks it continues the same run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from paratransfer.errors import UserError
from paratransfer.outputs import atomic_dir, write_json
from paratransfer.train.state import Run

CHECKPOINTS = "checkpoints"
#: Settings that may differ between a run and its resumption (they do not change the result).
_RESUMABLE_CHANGES = {"checkpoint_every", "keep_checkpoints"}


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    folder = Path(out) / CHECKPOINTS
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def save_checkpoint(run: Run, step: int) -> Path:
    """LoRA factors, AdamW state (tensors) and the rest (JSON), written atomically."""
    from safetensors.torch import save_file

    tensors = {f"param.{n}": p.detach().cpu().clone().contiguous() for n, p in run.trainable}
    state = run.optimizer.state_dict()
    other: dict[str, dict] = {}
    for i, s in state["state"].items():
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{i}.{k}"] = v.detach().cpu().clone().contiguous()
            else:
                other.setdefault(str(i), {})[k] = v
    info = {"step": step, "meta": run.meta, "history": run.history, "seconds": run.seconds,
            "heldout_history": run.heldout_history,
            "param_names": [n for n, _ in run.trainable],
            "optimizer": {"param_groups": state["param_groups"], "other_state": other}}
    path = run.out / CHECKPOINTS / f"step-{step:06d}"
    with atomic_dir(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        write_json(tmp / "state.json", info)
    old = sorted(p for p in (run.out / CHECKPOINTS).glob("step-*") if p.is_dir())
    for p in old[:-run.settings.keep_checkpoints]:
        shutil.rmtree(p, ignore_errors=True)
    return path


def restore_checkpoint(run: Run, folder: Path) -> None:
    """Load a checkpoint into the run, after checking it belongs to the same settings and data."""
    from safetensors.torch import load_file

    info = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    _check_same_run(info["meta"], run.meta, folder)
    tensors = load_file(str(folder / "state.safetensors"))
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
    run.history = info["history"]
    run.heldout_history = info.get("heldout_history", [])
    run.start_step = info["step"]
    run.seconds = info.get("seconds", 0.0)
    run.meta["resumed_from"] = [*info["meta"].get("resumed_from", []), info["step"]]


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
    for key, value in now["settings"].items():
        if key not in _RESUMABLE_CHANGES and saved["settings"].get(key) != value:
            raise UserError(f"--resume: setting {key} is {value!r} now but "
                            f"{saved['settings'].get(key)!r} in {folder} (give the command that "
                            "started the run)")
