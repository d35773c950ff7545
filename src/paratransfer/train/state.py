"""The state of a training run: what `setup` builds and the loop, checkpoints and outputs use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from paratransfer.distributed import Dist
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
    heldout: list[Example] = field(default_factory=list)  # scored every eval_every steps
    heldout_history: list[dict] = field(default_factory=list)  # {"step", "loss"}
    objective: Callable = field(default_factory=CrossEntropy)  # see objectives.py

    @property
    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
