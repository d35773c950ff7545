"""Extraction (docs/method.md §2–4): teacher + sensitivity -> LoRA factors shaped for the student.

For each student module that holds a selected role, every role part is cut out of the
teacher's matrix for that role in the selected teacher layer (by the reduction strategy), the
parts are fused in the student module's row layout, and the fused block is factorized at rank r.

Teacher and student may be of different families: roles, not names, connect them (the
teacher's fused matrices are split, the student's fused ones are written as a whole). They may
have different tokenizers: embed and head rows are gathered into the student's vocabulary
order first (`extract/vocab.py`). The teacher is read through a `TeacherWeights` source, one matrix at
a time, so a lazy checkpoint reader can stand in for a model in memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from paratransfer.adapter.factors import ModuleFactors
from paratransfer.adapter.lora import lora_targets
from paratransfer.arch import ArchSpec, HeadLayout, ModuleSpec, arch_for
from paratransfer.extract import factorize
from paratransfer.extract import strategies as align
from paratransfer.extract.settings import ExtractSettings
from paratransfer.extract.vocab import VocabAlignment, align_vocabularies, identity_alignment
from paratransfer.io.checks import rank_fits
from paratransfer.io.errors import UserError
from paratransfer.teacher.weights import TeacherWeights, as_teacher_weights

#: Roles whose matrices hold attention heads (rows for q, k, v; columns for o).
HEAD_ROLES = ("q", "k", "v", "o")
#: Roles indexed by the vocabulary, and the dimension of their `[out, in]` matrix that is.
VOCAB_DIM = {"embed": 1, "head": 0}


@dataclass
class Extraction:
    """What `extract` produced: the factors and the report that goes into transfer.json."""

    factors: list[ModuleFactors]
    selected_layers: list[int]
    layer_scores: list[float]
    entries: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    padded: list[dict] = field(default_factory=list)
    vocab: dict | None = None  # the vocabulary alignment's report, when embed/head were extracted
    layer_rule: str = "sensitivity"  # the rule that mapped teacher layers (`align.layer_rule`)


def _module_seed(seed: int, index: int) -> int:
    """A distinct, reproducible seed per extracted matrix for the random strategies."""
    return (seed * 1_000_003 + index) % (2**63 - 1)


def _vocab_size(config) -> int:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(config.vocab_size)


def head_units(role: str, teacher: HeadLayout, student: HeadLayout, teacher_shape: tuple[int, int],
               student_shape: tuple[int, int], where: str = "") -> tuple[int, int]:
    """(row unit, column unit) that keep a `window-heads` block on whole attention heads.

    q, k, v hold heads along their rows (k and v: the key/value heads of grouped-query
    attention), o along its columns. Along that dimension the block starts on a teacher head
    boundary and spans a whole number of teacher heads (so it also ends on one); being the
    student's size, it starts and ends on the student's head boundaries too. Where the teacher
    dimension is not larger than the student's (equal, or zero-padded), every teacher head is
    inside the block and the unit is 1.
    """
    if role not in HEAD_ROLES:
        return 1, 1
    dim = 1 if role == "o" else 0
    t_count = teacher.kv_heads if role in ("k", "v") else teacher.heads
    s_count = student.kv_heads if role in ("k", "v") else student.heads
    t_size, s_size = teacher_shape[dim], student_shape[dim]
    for who, size, count, heads in (("teacher", t_size, t_count, teacher),
                                    ("student", s_size, s_count, student)):
        if size != count * heads.head_dim:
            raise UserError(f"--reduce window-heads: {where}: the {who}'s config gives {count} heads"
                            f" of width {heads.head_dim}, but the matrix has {size} "
                            f"{'columns' if dim else 'rows'} for {role}")
    if t_size <= s_size:
        return 1, 1
    if s_size % teacher.head_dim:
        raise UserError(f"--reduce window-heads: {where}: the student's {s_count} {role} heads of "
                        f"width {student.head_dim} ({s_size}) are not a whole number of the "
                        f"teacher's heads of width {teacher.head_dim}; use --reduce window")
    units = [1, 1]
    units[dim] = teacher.head_dim
    return units[0], units[1]


def reduce_part(strategy: str, role: str, sens: torch.Tensor, rows: int, cols: int,
                units: tuple[int, int], seed: int) -> align.Selection:
    """The role part's selection; `window-heads` is the plain window outside q, k, v, o."""
    if strategy in align.REDUCERS and align.REDUCERS[strategy].head_aware and role not in HEAD_ROLES:
        strategy = "window"
    return align.reduce(strategy, sens, rows, cols, seed=seed, units=units)


def _pad(matrix: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero rows / columns appended so the matrix is at least rows x cols."""
    m, n = matrix.shape
    if m >= rows and n >= cols:
        return matrix
    out = matrix.new_zeros(max(m, rows), max(n, cols))
    out[:m, :n] = matrix
    return out


class _TeacherParts:
    """The teacher's role parts, read one matrix at a time (the last one's split is kept)."""

    def __init__(self, weights: TeacherWeights, arch: ArchSpec, sensitivity: Mapping[str, torch.Tensor]):
        self.weights, self.arch, self.sensitivity = weights, arch, sensitivity
        self._name: str | None = None
        self._parts: tuple[dict, dict] = ({}, {})
        self.shape: tuple[int, int] = (0, 0)  # the last matrix's `[out, in]` shape

    def sensitivity_of(self, name: str) -> torch.Tensor:
        key = name
        if key not in self.sensitivity:
            embed = self.arch.embed.param_name(self.arch.layers, None)
            head = self.arch.head.param_name(self.arch.layers, None)
            if name == head and head not in set(self.weights.keys()) and embed in self.sensitivity:
                key = embed  # a tied head: its sensitivity is the embedding's
            else:
                raise UserError(f"sensitivity has no entry for teacher parameter {name!r} "
                                "(was it computed for this teacher?)")
        return self.sensitivity[key]

    def get(self, role: str, layer: int | None) -> tuple[ModuleSpec, str, torch.Tensor, torch.Tensor]:
        """(teacher module, parameter name, role matrix, role sensitivity), `[out, in]`."""
        spec = self.arch.module_for(role)
        name = spec.param_name(self.arch.layers, layer)
        if name != self._name:
            self._name, self._parts = None, ({}, {})  # drop the previous matrix first
            if name not in self.weights:
                raise UserError(f"the teacher has no parameter {name!r} (expected for {role} in "
                                f"the {self.arch.family} family)")
            weight = spec.to_linear(self.weights[name].detach().to("cpu"))
            sens = spec.to_linear(self.sensitivity_of(name))
            if tuple(sens.shape) != tuple(weight.shape):
                raise UserError(f"sensitivity of {name} has shape {list(sens.shape)}, the weight "
                                f"{list(weight.shape)} (was it computed for this teacher?)")
            config = self.weights.config
            self._parts = (self.arch.split(spec, config, weight), self.arch.split(spec, config, sens))
            self._name, self.shape = name, tuple(weight.shape)
        return spec, name, self._parts[0][role], self._parts[1][role]


def _rows_report(arch: ArchSpec, spec: ModuleSpec, config, shape, role: str, prefix: str) -> dict:
    """Where a role sits inside a fused module, for transfer.json."""
    if not spec.fused:
        return {}
    if not arch.layout(spec).contiguous:
        return {f"{prefix}_layout": "interleaved per head"}
    start, size = arch.role_rows(spec, config, shape)[role]
    return {f"{prefix}_rows": [start, start + size]}


def _plan(t_arch: ArchSpec, s_arch: ArchSpec, student,
          roles: set[str]) -> tuple[list[ModuleSpec], list[ModuleSpec], list[dict]]:
    """The student modules to extract; those the teacher has nothing for (no gate in GPT-2),
    which get the standard LoRA init; and each wanted role that cannot be extracted, with why."""
    targets = lora_targets(student, roles, s_arch)
    skipped = targets.missing + targets.tied_head
    t_roles = t_arch.roles()
    specs, standard = [], []
    for spec in targets.specs:
        wanted = [r for r in spec.roles if r in roles]
        found = [r for r in wanted if r in t_roles]
        for role in wanted:
            if role not in t_roles:
                what = (f"its rows in the student's {spec.path} are left zero" if found
                        else f"the student's {spec.path} gets the standard LoRA init (A random, "
                        "B zero), as in the baseline arm")
                skipped.append({"role": role, "reason": f"the teacher's {t_arch.family} family "
                                f"has no {role}: {what}"})
        (specs if found else standard).append(spec)
    return specs, standard, skipped


def standard_factors(spec: ModuleSpec, module_name: str, shape: tuple[int, int], rank: int,
                     seed: int) -> ModuleFactors:
    """PEFT's default LoRA init (A Kaiming-uniform, B zero) for a module with nothing to transfer.

    The adapter then covers every module the student's LoRA targets, so the transfer arm trains
    the same modules as the baseline; B = 0 leaves the residual base weight unchanged.
    """
    a = torch.empty(rank, shape[1])
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
    return ModuleFactors(spec, module_name, torch.zeros(shape[0], rank), a, 1.0)


def vocabulary_for(teacher_config, student: torch.nn.Module, settings: ExtractSettings,
                   teacher_tokenizer=None, student_tokenizer=None) -> VocabAlignment | None:
    """The vocabulary alignment embed and head need (None when neither is extracted).

    Refuses (UserError) when coverage is below `settings.min_vocab_coverage`, or when the
    vocabulary sizes differ and no tokenizers were given. Cheap: call it before any heavy work.
    """
    specs, _, _ = _plan(arch_for(teacher_config), arch_for(student), student, set(settings.modules))
    if not any(set(spec.roles) & VOCAB_DIM.keys() for spec in specs):
        return None
    t_rows = _vocab_size(teacher_config)
    s_rows = student.get_input_embeddings().weight.shape[0]
    if teacher_tokenizer is not None and student_tokenizer is not None:
        alignment = align_vocabularies(teacher_tokenizer, student_tokenizer, t_rows, s_rows)
    elif t_rows == s_rows:
        alignment = identity_alignment(s_rows)  # no tokenizers: the one vocabulary is assumed
    else:
        raise UserError(f"teacher vocabulary ({t_rows} tokens) and student vocabulary ({s_rows}) "
                        "differ and no tokenizers were given to align them (drop embed and head "
                        "with --modules attn,mlp)")
    if alignment.coverage < settings.min_vocab_coverage:
        raise UserError(
            f"vocabulary coverage {alignment.coverage:.1%}: only {alignment.matched} of the "
            f"student's {alignment.student_vocab_size} tokens are in the teacher's vocabulary, "
            f"below --min-vocab-coverage {settings.min_vocab_coverage:g}; embed and head would "
            "be mostly zero rows (drop them with --modules attn,mlp, or lower the threshold)")
    return alignment


@dataclass
class _Setup:
    """What every step of `extract` reads: both architectures, the student's parameters, the
    modules planned, the teacher layers selected, the vocabulary and head layouts; and the
    result the steps fill in."""

    weights: TeacherWeights
    t_arch: ArchSpec
    s_arch: ArchSpec
    s_config: object  # the student's config
    s_params: dict[str, torch.Tensor]
    n_student: int
    settings: ExtractSettings
    specs: list[ModuleSpec]  # student modules with something to transfer
    standard: list[ModuleSpec]  # student modules that get PEFT's standard init
    vocab: VocabAlignment | None
    heads: tuple[HeadLayout, HeadLayout] | None  # teacher's, student's (head-aware reductions)
    teacher_parts: _TeacherParts
    result: Extraction
    index: int = 0  # role parts reduced so far: each random reduction's own seed

    @property
    def t_config(self):
        return self.weights.config

    def student_shape(self, spec: ModuleSpec, s_layer: int | None) -> tuple[int, int]:
        return tuple(spec.to_linear(self.s_params[spec.param_name(self.s_arch.layers,
                                                                   s_layer)]).shape)


def _setup(weights: TeacherWeights, student: torch.nn.Module,
           sensitivity: Mapping[str, torch.Tensor], settings: ExtractSettings,
           vocab: VocabAlignment | None, teacher_tokenizer, student_tokenizer) -> _Setup:
    """Plan the modules, align the vocabularies, select the teacher layers (step 1)."""
    from paratransfer.sensitivity.accumulate import layer_scores

    t_arch, s_arch = arch_for(weights.config), arch_for(student)
    n_teacher = t_arch.count_layers(weights.keys())
    n_student = s_arch.num_layers(student)
    specs, standard, skipped = _plan(t_arch, s_arch, student, set(settings.modules))
    if vocab is None:
        vocab = vocabulary_for(weights.config, student, settings, teacher_tokenizer,
                               student_tokenizer)
    scores = layer_scores(sensitivity, t_arch.layer_of, n_teacher)
    selected = align.select_layers(settings.layers, scores, n_student, seed=settings.seed)
    result = Extraction(factors=[], selected_layers=selected, layer_scores=scores,
                        skipped=skipped, vocab=vocab.report() if vocab is not None else None,
                        layer_rule=align.layer_rule(settings.layers, n_teacher, n_student))
    heads = None
    if align.REDUCERS[settings.reduce].head_aware:
        heads = (t_arch.heads(weights.config), s_arch.heads(student.config))
    return _Setup(weights, t_arch, s_arch, student.config,
                  dict(student.named_parameters(remove_duplicate=False)), n_student, settings,
                  specs, standard, vocab, heads, _TeacherParts(weights, t_arch, sensitivity),
                  result)


def _select_part(setup: _Setup, spec: ModuleSpec, s_name: str, s_shape: tuple[int, int],
                 role: str, s_size: int, s_layer: int | None) -> tuple[torch.Tensor, dict]:
    """The student-sized block of one role's teacher matrix (step 2: gather the vocabulary,
    pad if allowed, reduce by the strategy), and its report entry."""
    settings, result = setup.settings, setup.result
    n_cols = s_shape[1]
    t_layer = result.selected_layers[s_layer] if s_layer is not None else None
    t_spec, t_name, t_part, t_sens = setup.teacher_parts.get(role, t_layer)
    where = f"{s_name} ({role}) from {t_name}"
    t_shape = tuple(t_part.shape)
    entry = {
        "name": s_name,
        "role": role,
        "teacher_name": t_name,
        "teacher_layer": t_layer,
        "student_layer": s_layer,
        "teacher_shape": list(t_shape),
        "student_shape": [s_size, n_cols],
    }
    if role in VOCAB_DIM:
        dim = VOCAB_DIM[role]
        if not setup.vocab.is_identity(t_shape[dim]):
            t_part, t_sens = setup.vocab.gather(t_part, dim), setup.vocab.gather(t_sens, dim)
            entry["vocab_gathered"] = True
    units = (head_units(role, *setup.heads, t_shape, (s_size, n_cols), where)
             if setup.heads is not None else (1, 1))
    m, n = t_part.shape
    if m < s_size or n < n_cols:
        if not settings.allow_pad:
            raise UserError(f"{where}: teacher matrix {[m, n]} is smaller than the "
                            f"student's {[s_size, n_cols]} in some dimension (pass "
                            "--allow-pad to zero-pad it)")
        t_part, t_sens = _pad(t_part, s_size, n_cols), _pad(t_sens, s_size, n_cols)
        pad = {"rows": max(0, s_size - m), "cols": max(0, n_cols - n)}
        entry["padded"] = pad
        result.padded.append({"name": s_name, "role": role, **pad})
    sel = reduce_part(settings.reduce, role, t_sens.float(), s_size, n_cols, units,
                      seed=_module_seed(settings.seed, setup.index))
    setup.index += 1
    entry.update({
        "window": list(sel.window) if sel.window is not None else None,
        "orientation": "[embedding dim, vocab] (transposed)" if spec.embedding
        else "[out, in]",
        **_rows_report(setup.s_arch, spec, setup.s_config, s_shape, role, "student"),
        **_rows_report(setup.t_arch, t_spec, setup.t_config, setup.teacher_parts.shape, role,
                       "teacher"),
    })
    return sel.take(t_part.float()), entry


def _select_module(setup: _Setup, spec: ModuleSpec, s_layer: int | None
                   ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Every role part of one student module (step 2): the selected teacher block, or zeros
    for a role not transferred; and their report entries."""
    s_arch, roles = setup.s_arch, set(setup.settings.modules)
    t_roles = setup.t_arch.roles()
    s_name = spec.param_name(s_arch.layers, s_layer)
    s_shape = setup.student_shape(spec, s_layer)
    parts, entries = {}, []
    for role, s_size in s_arch.role_sizes(spec, setup.s_config, s_shape).items():
        if role not in roles or role not in t_roles:
            parts[role] = torch.zeros(s_size, s_shape[1], dtype=torch.float32)
            continue
        parts[role], entry = _select_part(setup, spec, s_name, s_shape, role, s_size, s_layer)
        entries.append(entry)
    return parts, entries


def _factorize_module(setup: _Setup, spec: ModuleSpec, s_layer: int | None,
                      parts: dict[str, torch.Tensor], entries: list[dict],
                      device: torch.device | str | None) -> None:
    """Fuse a module's parts in its row layout and factorize the block at rank r (step 3);
    the factors and the entries go into the result."""
    settings, s_arch = setup.settings, setup.s_arch
    s_name = spec.param_name(s_arch.layers, s_layer)
    block = s_arch.fuse(spec, setup.s_config, parts)
    rank_fits(settings.rank, tuple(block.shape), s_name)
    if device is not None:
        block = block.to(device)
    fac = factorize.factorize(block, settings.rank, settings.svd, seed=settings.seed)
    for e in entries:
        e["energy"] = fac.energy
        e["svd"] = fac.svd
    setup.result.entries.extend(entries)
    setup.result.factors.append(ModuleFactors(spec, spec.module_name(s_arch.layers, s_layer),
                                              fac.B.cpu(), fac.A.cpu(), fac.energy))


def _add_standard(setup: _Setup) -> None:
    """PEFT's standard init for the modules with nothing to transfer (step 4), each seeded
    apart from the transferred ones."""
    settings, s_arch, n_student = setup.settings, setup.s_arch, setup.n_student
    for k, spec in enumerate(setup.standard):
        for s_layer in (range(n_student) if spec.in_layer else [None]):
            setup.result.factors.append(standard_factors(
                spec, spec.module_name(s_arch.layers, s_layer), setup.student_shape(spec, s_layer),
                settings.rank,
                _module_seed(settings.seed, -(1 + k * max(n_student, 1) + (s_layer or 0)))))


def extract(
    teacher: torch.nn.Module | TeacherWeights,
    student: torch.nn.Module,
    sensitivity: Mapping[str, torch.Tensor],
    settings: ExtractSettings,
    *,
    teacher_tokenizer=None,
    student_tokenizer=None,
    vocab: VocabAlignment | None = None,
    device: torch.device | str | None = None,
) -> Extraction:
    """Select teacher layers, cut each selected matrix to the student's shape, factorize it.

    `teacher` is a model or a `TeacherWeights` source. Embed and head need the vocabularies
    aligned: pass both tokenizers, or `vocab` from `vocabulary_for`; with neither, the two
    vocabularies must be one. Blocks are factorized on `device` (a GPU, when there is one, is
    much faster at it), on the CPU when None; the factors come back to the CPU.

    The steps: plan the modules and select the teacher layers (`_setup`) → per student module,
    select each role's block (`_select_module`) → fuse and factorize it (`_factorize_module`)
    → the standard init for the rest (`_add_standard`).
    """
    setup = _setup(as_teacher_weights(teacher), student, sensitivity, settings, vocab,
                   teacher_tokenizer, student_tokenizer)
    for spec in setup.specs:
        for s_layer in (range(setup.n_student) if spec.in_layer else [None]):
            parts, entries = _select_module(setup, spec, s_layer)
            _factorize_module(setup, spec, s_layer, parts, entries, device)
    _add_standard(setup)
    return setup.result
