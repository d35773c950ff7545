"""What a finished run leaves in RUN_DIR: the plain LoRA adapter for the unmodified student,
`train.json` and `loss.png` (written last, atomically), and the folder prepared at the start."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from paratransfer.io.outputs import atomic_dir, follow_umask, scratch_dir, write_json
from paratransfer.train.checkpoints import CHECKPOINTS
from paratransfer.train.inits import INITS
from paratransfer.train.state import Run

TRAIN_JSON = "train.json"


def summary(run: Run, complete: bool) -> dict:
    """train.json: settings, seed, steps, loss curve; wall-clock times under `timing`, apart,
    so that two identical runs differ in nothing else."""
    return {
        **run.meta,
        "complete": complete,
        "steps_done": len(run.history),
        "final_loss": run.history[-1]["loss"] if run.history else None,
        "adapter_rank": run.settings.rank * (2 if INITS[run.settings.init].residual else 1),
        "history": run.history,
        "heldout_history": run.heldout_history,
        "timing": run.timing(),
    }


def plot_loss(history: list[dict], path: Path, title: str) -> None:
    """Training loss per step, learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    ax.plot(steps, [h["loss"] for h in history], color="tab:blue", marker="." if len(steps) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("answer-token loss", color="tab:blue")
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [h["lr"] for h in history], color="tab:gray", alpha=0.5, linewidth=1)
    lr_ax.set_ylabel("learning rate", color="tab:gray")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_outputs(run: Run, info: dict) -> None:
    """Write the plain LoRA adapter, train.json and loss.png into RUN_DIR (rank 0, atomically)."""
    from paratransfer.adapter.inject import INITIAL_NAME, save_plain_lora
    from paratransfer.adapter.write import canonical_adapter_config

    tmp = scratch_dir(run.out, "final")
    try:
        initial = None
        if INITS[run.settings.init].residual:
            initial = tmp / INITIAL_NAME  # PEFT rewrites the config of this folder: use a copy
            shutil.copytree(run.out / INITIAL_NAME, initial)
        save_plain_lora(run.model, tmp / "adapter", initial)
        canonical_adapter_config(tmp / "adapter")
        write_json(tmp / "adapter" / TRAIN_JSON, info)
        plot_loss(run.history, tmp / "adapter" / "loss.png",
                  f"{run.settings.init} init: loss per step ({len(run.history)} steps)")
        follow_umask(tmp / "adapter")
        names = sorted(p.name for p in (tmp / "adapter").iterdir())
        for name in [n for n in names if n != TRAIN_JSON] + [TRAIN_JSON]:  # train.json last
            os.replace(tmp / "adapter" / name, run.out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_output(run: Run) -> None:
    """Create the folder a fresh run works in, with the adapter as initialized; rank 0 only.

    What an earlier, abandoned attempt left there (an interrupted `--overwrite` that was not
    resumed) goes first.
    """
    from paratransfer.adapter.inject import INITIAL_NAME
    from paratransfer.adapter.write import canonical_adapter_config

    if run.out.exists():
        shutil.rmtree(run.out)
    run.out.mkdir(parents=True)
    (run.out / CHECKPOINTS).mkdir()
    with atomic_dir(run.out / INITIAL_NAME) as tmp:
        run.model.save_pretrained(str(tmp), save_embedding_layers=False)
        canonical_adapter_config(tmp)
