"""What a draw is compared on: its choice against the whole pool's, per module family.

Layers: Jaccard overlap of the selected sets. Windows: intersection over union of the window
of one teacher matrix in both choices, over the matrices both selected. Factor subspaces: per
student module, the column space of B `[m', r]` (output side) and the row space of A `[r, n']`
(input side), in the student's coordinates whichever teacher layer and window they came from;
similarity is the mean of cos² over the principal angles, ‖Q₁ᵀQ₂‖²_F / max(dim₁, dim₂): 1 for
the same subspace, 0 for orthogonal ones. *Chance* is what a choice blind to the seeds would
score: a window at a uniformly random position, a uniformly random subspace (dim / space).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    """|a ∩ b| / |a ∪ b| of two layer sets (1 for two empty sets)."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def window_iou(a: Sequence[int], b: Sequence[int]) -> float:
    """Intersection over union of two windows, each (row, col, rows, cols)."""
    (r1, c1, h1, w1), (r2, c2, h2, w2) = a, b
    inter = (max(0, min(r1 + h1, r2 + h2) - max(r1, r2))
             * max(0, min(c1 + w1, c2 + w2) - max(c1, c2)))
    union = h1 * w1 + h2 * w2 - inter
    return inter / union if union else 1.0


def orthonormal_basis(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (float64 columns) of the column space of x, rank by x's own dtype."""
    eps = torch.finfo(x.dtype if x.is_floating_point() else torch.float32).eps
    u, s, _ = torch.linalg.svd(x.to(torch.float64), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return u[:, :0]
    keep = int((s > s[0] * max(x.shape) * eps).sum())
    return u[:, :keep]


def subspace_similarity(q1: torch.Tensor, q2: torch.Tensor) -> float | None:
    """Mean cos² of the principal angles between span(q1) and span(q2) (orthonormal columns):
    ‖q1ᵀq2‖²_F / max(dim); None when both are empty (zero factors on both sides)."""
    d = max(q1.shape[1], q2.shape[1])
    if d == 0:
        return None
    cos = torch.linalg.svdvals(q1.mT @ q2).clamp(max=1.0)
    return float((cos ** 2).sum()) / d


def chance_window_iou(shape: Sequence[int], window: Sequence[int]) -> float:
    """Mean IoU of `window` (row, col, rows, cols) with a same-sized window at a uniformly
    random position of a `shape` matrix: what a choice blind to the seeds would score."""
    (m, n), (r0, c0, h, w) = shape, window
    rows = (h - (torch.arange(m - h + 1, dtype=torch.float64) - r0).abs()).clamp(min=0)
    cols = (w - (torch.arange(n - w + 1, dtype=torch.float64) - c0).abs()).clamp(min=0)
    inter = torch.outer(rows, cols)
    return float((inter / (2 * h * w - inter)).mean())


@dataclass
class Choice:
    """What one extraction chose: layers, each teacher matrix's window, each module's bases."""

    layers: list[int]
    #: "teacher parameter (role)" -> (role, window (row, col, rows, cols), searched shape)
    windows: dict[str, tuple[str, tuple[int, int, int, int], tuple[int, int]]]
    bases: dict[str, tuple[str, torch.Tensor, torch.Tensor]]  # module -> (family, out, in)


def _searched_shape(entry: Mapping[str, Any]) -> tuple[int, int]:
    """The shape the window was searched in: vocabulary rows gathered into the student's
    order, dimensions narrower than the student's zero-padded (as `extract` does)."""
    from paratransfer.extract.plan import VOCAB_DIM

    shape = list(entry["teacher_shape"])
    if entry["role"] in VOCAB_DIM:
        shape[VOCAB_DIM[entry["role"]]] = entry["student_shape"][VOCAB_DIM[entry["role"]]]
    return max(shape[0], entry["student_shape"][0]), max(shape[1], entry["student_shape"][1])


def choice_of(result) -> Choice:
    """The comparable parts of an `extract.Extraction` (standard-init modules left out)."""
    windows, extracted = {}, set()
    for e in result.entries:
        extracted.add(e["name"].removesuffix(".weight"))
        if e.get("window") is not None:
            windows[f"{e['teacher_name']} ({e['role']})"] = (
                e["role"], (*e["window"], *e["student_shape"]), _searched_shape(e))
    bases = {f.module_name: ("+".join(f.spec.roles), orthonormal_basis(f.B),
                             orthonormal_basis(f.A.mT))
             for f in result.factors if f.module_name in extracted}
    return Choice(list(result.selected_layers), windows, bases)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def compare(draw: Choice, full: Choice) -> dict[str, Any]:
    """A draw's figures against the full pool's choice, per module family."""
    ious: dict[str, list[float]] = {}
    for key, (role, window, _) in draw.windows.items():
        if key in full.windows:
            ious.setdefault(role, []).append(window_iou(window, full.windows[key][1]))
    sides: dict[str, dict[str, list[float]]] = {"subspace": {}, "subspace_out": {},
                                                "subspace_in": {}}
    for module, (family, q_out, q_in) in draw.bases.items():
        if module not in full.bases:
            continue
        _, f_out, f_in = full.bases[module]
        out, in_ = subspace_similarity(q_out, f_out), subspace_similarity(q_in, f_in)
        for key, sim in (("subspace_out", out), ("subspace_in", in_)):
            if sim is not None:
                sides[key].setdefault(family, []).append(sim)
        if out is not None and in_ is not None:
            sides["subspace"].setdefault(family, []).append((out + in_) / 2)
    return {
        "layers": jaccard(draw.layers, full.layers),
        "window_iou": {f: _mean(v) for f, v in ious.items()},
        **{key: {f: _mean(v) for f, v in by_family.items()} for key, by_family in sides.items()},
    }


def chance(full: Choice) -> dict[str, dict[str, float]]:
    """Per family, what choices blind to the seeds would score against the pool's: a window at
    a uniformly random position, and uniformly random subspaces (mean cos² = dim / space)."""
    ious: dict[str, list[float]] = {}
    for role, window, shape in full.windows.values():
        ious.setdefault(role, []).append(chance_window_iou(shape, window))
    spaces: dict[str, list[float]] = {}
    for family, q_out, q_in in full.bases.values():
        spaces.setdefault(family, []).append(
            (q_out.shape[1] / q_out.shape[0] + q_in.shape[1] / q_in.shape[0]) / 2)
    return {"window_iou": {f: _mean(v) for f, v in ious.items()},
            "subspace": {f: _mean(v) for f, v in spaces.items()}}
