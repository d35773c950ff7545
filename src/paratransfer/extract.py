"""Extraction (METHOD.md §2–4): teacher + sensitivity -> LoRA factors shaped for the student.

For each student module that holds a selected role, every role part is cut out of the
teacher's matching matrix in the selected teacher layer (by the reduction strategy), the parts
are stacked in the student module's row layout, and the stacked block is factorized at rank r.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch

from paratransfer import align, factorize
from paratransfer.arch import ArchSpec, ModuleSpec, arch_for, parse_roles
from paratransfer.errors import UserError
from paratransfer.models import canonical_names


@dataclass(frozen=True)
class ExtractSettings:
    """Every choice of the extraction step; defaults are the paper's."""

    rank: int = 16
    alpha: float = 16.0
    layers: str = "sensitivity"
    reduce: str = "window"
    modules: tuple[str, ...] = ("embed", "q", "k", "v", "o", "gate", "up", "down", "head")
    svd: str = "exact"
    seed: int = 0
    dropout: float = 0.05

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UserError(f"--rank: must be at least 1 (got {self.rank})")
        if self.alpha <= 0:
            raise UserError(f"--alpha: must be positive (got {self.alpha})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout: must be in [0, 1) (got {self.dropout})")
        object.__setattr__(self, "modules", parse_roles(self.modules))
        if self.layers not in align.LAYER_SELECTORS:
            raise UserError(f"--layers: unknown strategy {self.layers!r} "
                            f"(expected one of: {', '.join(align.LAYER_SELECTORS)})")
        if self.reduce not in align.REDUCERS:
            raise UserError(f"--reduce: unknown strategy {self.reduce!r} "
                            f"(expected one of: {', '.join(align.REDUCERS)})")
        if self.svd not in factorize.FACTORIZERS:
            raise UserError(f"--svd: unknown method {self.svd!r} "
                            f"(expected one of: {', '.join(factorize.FACTORIZERS)})")


@dataclass
class ModuleFactors:
    """The LoRA pair for one student module, in `[out, in]` orientation: delta = B @ A."""

    spec: ModuleSpec
    module_name: str
    B: torch.Tensor
    A: torch.Tensor
    energy: float


@dataclass
class Extraction:
    """What `extract` produced: the factors and the report that goes into transfer.json."""

    factors: list[ModuleFactors]
    selected_layers: list[int]
    layer_scores: list[float]
    entries: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def _module_seed(seed: int, index: int) -> int:
    """A distinct, reproducible seed per extracted matrix for the random strategies."""
    return (seed * 1_000_003 + index) % (2**63 - 1)


def _check_pair(teacher_arch: ArchSpec, student_arch: ArchSpec, teacher, student) -> None:
    if teacher_arch is not student_arch:
        raise UserError(f"teacher family {teacher_arch.family!r} and student family "
                        f"{student_arch.family!r} differ: transfer across families is not "
                        "supported yet")
    tv = teacher.get_input_embeddings().weight.shape[0]
    sv = student.get_input_embeddings().weight.shape[0]
    if tv != sv:
        raise UserError(f"teacher vocabulary ({tv} tokens) and student vocabulary ({sv}) differ: "
                        "embed and head need the same vocabulary (drop them with "
                        "--modules attn,mlp)")


def _tied_head(model) -> bool:
    return model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight)


def extract(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    sensitivity: Mapping[str, torch.Tensor],
    settings: ExtractSettings,
) -> Extraction:
    """Select teacher layers, cut each selected matrix to the student's shape, factorize it."""
    t_arch, s_arch = arch_for(teacher), arch_for(student)
    _check_pair(t_arch, s_arch, teacher, student)
    t_params = dict(teacher.named_parameters(remove_duplicate=False))
    s_params = dict(student.named_parameters(remove_duplicate=False))
    t_canon = canonical_names(teacher)

    def teacher_sens(name: str) -> torch.Tensor:
        key = t_canon.get(name, name)
        if key not in sensitivity:
            raise UserError(f"sensitivity has no entry for teacher parameter {key!r} "
                            "(was it computed for this teacher?)")
        return sensitivity[key]

    n_teacher, n_student = t_arch.num_layers(teacher), s_arch.num_layers(student)
    from paratransfer.sensitivity import layer_scores

    scores = layer_scores(sensitivity, t_arch.layer_of, n_teacher)
    selected = align.select_layers(settings.layers, scores, n_student, seed=settings.seed)

    result = Extraction(factors=[], selected_layers=selected, layer_scores=scores)
    roles = set(settings.modules)
    index = 0
    for spec in s_arch.modules_for(roles):
        if spec.roles == ("head",) and _tied_head(student):
            result.skipped.append({"role": "head", "reason": "the student's lm_head is tied to "
                                   "its embedding; the embed adapter covers both"})
            continue
        student_layers = range(n_student) if spec.in_layer else [None]
        for s_layer in student_layers:
            t_layer = selected[s_layer] if s_layer is not None else None
            s_name = spec.param_name(s_arch.layers, s_layer)
            t_name = spec.param_name(t_arch.layers, t_layer)
            s_weight = spec.to_linear(s_params[s_name])
            t_weight = spec.to_linear(t_params[t_name]).detach()
            t_sens = spec.to_linear(teacher_sens(t_name))
            s_rows = s_arch.role_rows(spec, student.config, tuple(s_weight.shape))
            t_rows = t_arch.role_rows(spec, teacher.config, tuple(t_weight.shape))
            parts, entries = [], []
            for role in spec.roles:
                s_start, s_size = s_rows[role]
                n_cols = s_weight.shape[1]
                if role not in roles:
                    parts.append(torch.zeros(s_size, n_cols, dtype=torch.float32))
                    continue
                t_start, t_size = t_rows[role]
                t_block = t_weight[t_start:t_start + t_size]
                t_block_sens = t_sens[t_start:t_start + t_size]
                where = f"{s_name} ({role}) from {t_name}"
                if t_size < s_size or t_block.shape[1] < n_cols:
                    raise UserError(f"{where}: teacher matrix {list(t_block.shape)} is smaller "
                                    f"than the student's {[s_size, n_cols]} in some dimension")
                sel = align.reduce(settings.reduce, t_block_sens.float(), s_size, n_cols,
                                   seed=_module_seed(settings.seed, index))
                index += 1
                parts.append(sel.take(t_block.float()))
                entries.append({
                    "name": s_name,
                    "role": role,
                    "teacher_name": t_name,
                    "teacher_layer": t_layer,
                    "student_layer": s_layer,
                    "teacher_shape": list(t_block.shape),
                    "student_shape": [s_size, n_cols],
                    "window": list(sel.window) if sel.window is not None else None,
                    "orientation": "[embedding dim, vocab] (transposed)" if spec.embedding
                    else "[out, in]",
                    **({"student_rows": [s_start, s_start + s_size],
                        "teacher_rows": [t_start, t_start + t_size]} if spec.fused else {}),
                })
            block = torch.cat(parts, dim=0)
            if settings.rank > min(block.shape):
                raise UserError(f"--rank: {settings.rank} is above the smaller side "
                                f"({min(block.shape)}) of the {list(block.shape)} block for "
                                f"{s_name}")
            fac = factorize.factorize(block, settings.rank, settings.svd, seed=settings.seed)
            for e in entries:
                e["energy"] = fac.energy
            result.entries.extend(entries)
            result.factors.append(ModuleFactors(spec, spec.module_name(s_arch.layers, s_layer),
                                                fac.B, fac.A, fac.energy))
    present = {r for spec in s_arch.modules() for r in spec.roles}
    for role in sorted(roles - present):
        result.skipped.append({"role": role, "reason": f"the {s_arch.family} family has no {role}"})
    return result


def settings_dict(settings: ExtractSettings) -> dict:
    d = asdict(settings)
    d["modules"] = list(settings.modules)
    return d
