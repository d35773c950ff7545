"""From attribution scores to located neurons, and the parameter vectors they hold.

Per kind (attention for v/o, MLP for up/down) the model's L highest-scoring layers are kept, in
their original order (L: the student's layer count; the student keeps all of its layers). A
teacher with fewer than L layers keeps them all, mapped by relative depth as extraction's
`--layers depth` does: student layer i takes teacher layer round(i·(n−1)/(L−1)), so teacher
layers repeat, in order (the rule is recorded as `layer_rule`). In
each kept layer a role's k highest-scoring neurons are located, best first (ties: lower index),
k = ⌊rate · the student's width of that role⌋ for teacher and student alike. The i-th kept
teacher layer is paired with the i-th student layer and, inside it, the teacher's j-th best
neuron with the student's j-th best.

A neuron's vector lies in the hidden space: a row of up or v (`[in]`), a column of down or o
(`[out]`), so the translator maps teacher hidden width to student hidden width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paratransfer.arch.spec import ArchSpec
from paratransfer.extract.strategies import select_layers
from paratransfer.io.errors import UserError
from paratransfer.laten.attribution import Attribution, role_matrix
from paratransfer.laten.settings import ROW_ROLES

KIND = {"v": "attn", "o": "attn", "up": "ffn", "down": "ffn"}


@dataclass(frozen=True)
class Located:
    """Which layers and neurons were located in one model, for one example."""

    layers: dict[str, list[int]]  # "attn"/"ffn" -> kept layer indices, ascending
    neurons: dict[str, list[list[int]]]  # role -> per kept layer, neuron indices, best first
    layer_rule: str = "attribution"  # or "depth" (a teacher shallower than the student)

    def record(self) -> dict:
        return {"layers": self.layers, "neurons": self.neurons, "layer_rule": self.layer_rule}


def role_width(model: torch.nn.Module, spec: ArchSpec, role: str) -> int:
    """How many neurons a role has: rows of up/v, columns of down/o."""
    matrix = role_matrix(model, spec, role, 0)
    return matrix.shape[0] if role in ROW_ROLES else matrix.shape[1]


def neuron_counts(student: torch.nn.Module, spec: ArchSpec, roles, rate: float) -> dict[str, int]:
    """k per role: ⌊rate · the student's width⌋ (at least one neuron, else refused)."""
    counts = {}
    for role in roles:
        width = role_width(student, spec, role)
        k = int(rate * width)
        if k < 1:
            raise UserError(f"--rate {rate}: locates no neuron of the student's {role} "
                            f"({width} neurons); raise --rate")
        counts[role] = k
    return counts


def _top_layers(scores: torch.Tensor, keep: int) -> list[int]:
    order = torch.sort(scores, descending=True, stable=True).indices[:keep]
    return sorted(int(i) for i in order)


def locate(attribution: Attribution, keep_layers: int, counts: dict[str, int]) -> Located:
    """The top `keep_layers` layers per kind and the top-k neurons of each role in them."""
    total = attribution.attn_layers.shape[0]
    if keep_layers > total:
        rule = "depth"
        by_depth = select_layers("depth", [0.0] * total, keep_layers)
        layers = {"attn": by_depth, "ffn": list(by_depth)}
    else:
        rule = "attribution"
        layers = {"attn": _top_layers(attribution.attn_layers, keep_layers),
                  "ffn": _top_layers(attribution.ffn_layers, keep_layers)}
    neurons: dict[str, list[list[int]]] = {}
    for role, k in counts.items():
        scores = attribution.neurons[role]
        if k > scores.shape[1]:
            raise UserError(f"{role}: {k} neurons to locate, but the model has only "
                            f"{scores.shape[1]}")
        neurons[role] = [torch.sort(scores[layer], descending=True, stable=True).indices[:k].tolist()
                         for layer in layers[KIND[role]]]
    return Located(layers, neurons, rule)


def neuron_vectors(model: torch.nn.Module, spec: ArchSpec, located: Located) -> dict[str, torch.Tensor]:
    """role -> `[kept layers, k, hidden]` float32: the located neurons' parameter vectors."""
    out = {}
    with torch.no_grad():
        for role, per_layer in located.neurons.items():
            rows = []
            for layer, idx in zip(located.layers[KIND[role]], per_layer, strict=True):
                matrix = role_matrix(model, spec, role, layer)
                index = torch.tensor(idx, device=matrix.device)
                picked = matrix.index_select(0, index) if role in ROW_ROLES \
                    else matrix.index_select(1, index).t()
                rows.append(picked.float().cpu())
            out[role] = torch.stack(rows)
    return out
