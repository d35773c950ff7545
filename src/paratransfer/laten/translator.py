"""LaTen's translator: per role, a two-layer MLP from a teacher neuron's vector to a student's.

teacher hidden width → teacher hidden width (no bias) → ReLU → student hidden width (no bias),
both weights drawn from N(0, σ²) with a small σ (1e-5 by default), so what it adds to the
student starts near zero. It acts on each neuron's vector separately.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


class Translator(torch.nn.Module):
    """One MLP per role; `forward` maps `{role: [..., d_teacher]}` to `{role: [..., d_student]}`."""

    def __init__(self, roles: Sequence[str], teacher_width: int, student_width: int,
                 init_std: float, seed: int):
        super().__init__()
        self.nets = torch.nn.ModuleDict({
            role: torch.nn.Sequential(
                torch.nn.Linear(teacher_width, teacher_width, bias=False),
                torch.nn.ReLU(),
                torch.nn.Linear(teacher_width, student_width, bias=False),
            ) for role in roles})
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in self.parameters():  # in role order, seeded: reproducible
                param.normal_(0.0, init_std, generator=generator)

    def forward(self, vectors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for role, v in vectors.items():
            net = self.nets[role]
            out[role] = net(v.to(device=net[0].weight.device, dtype=torch.float32))
        return out
