"""The state of a training run: what `setup` builds and the loop, checkpoints and outputs use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from paratransfer.io.distributed import Dist
from paratransfer.train.batches import Example
from paratransfer.train.objectives import CrossEntropy
from paratransfer.train.settings import TrainSettings


@dataclass
class Run:
    """Everything the training loop needs, built by `setup`."""

    settings: TrainSettings
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    examples: list[Example]
    pad_id: int
    total_steps: int
    warmup_steps: int
    device: torch.device
    dtype: torch.dtype
    dist: Dist
    out: Path
    meta: dict
    history: list[dict] = field(default_factory=list)
    start_step: int = 0
    seconds: float = 0.0  # training time so far (without checkpoint writing), over resumes
    step_seconds: list[float] = field(default_factory=list)  # per step, as `history`
    teacher_seconds: list[float] = field(default_factory=list)  # distillation teacher, per step
    resumed_from: list[int] = field(default_factory=list)  # the steps the run was resumed at
    heldout: list[Example] = field(default_factory=list)  # scored every eval_every steps
    heldout_history: list[dict] = field(default_factory=list)  # {"step", "loss"}
    objective: Callable = field(default_factory=CrossEntropy)  # see objectives.py

    def timing(self) -> dict:
        """How this execution went (wall-clock time, resumptions): the only part of train.json
        and of a checkpoint that differs between two identical runs."""
        tokens = sum(h["tokens"] for h in self.history)
        out = {"train_seconds": round(self.seconds, 3),
               "tokens_per_second": tokens / self.seconds if self.seconds > 0 else None,
               "step_seconds": list(self.step_seconds), "resumed_from": list(self.resumed_from)}
        if self.teacher_seconds:  # distillation: the teacher's forward passes, per step
            steps = sum(self.step_seconds[-len(self.teacher_seconds):])
            out["teacher_seconds"] = list(self.teacher_seconds)
            out["distill_cost"] = {
                "teacher_seconds_per_step": sum(self.teacher_seconds) / len(self.teacher_seconds),
                "share_of_step_time": sum(self.teacher_seconds) / steps if steps else None}
        return out

    @property
    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
