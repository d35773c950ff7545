"""The extracted factors of one student module: what extraction produces and the adapter holds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paratransfer.arch import ModuleSpec


@dataclass
class ModuleFactors:
    """The LoRA pair for one student module, in `[out, in]` orientation: delta = B @ A."""

    spec: ModuleSpec
    module_name: str
    B: torch.Tensor
    A: torch.Tensor
    energy: float
