"""Setup: read and check every input, wrap the student with LoRA and initialize it for the arm,
build the optimizer. The arms differ only in `init_lora`."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from paratransfer import __version__
from paratransfer.io.distributed import Dist
from paratransfer.io.errors import UserError
from paratransfer.io.threads import runtime
from paratransfer.train.batches import load_examples, steps_per_epoch
from paratransfer.train.checkpoints import CHECKPOINTS, last_checkpoint, restore_checkpoint
from paratransfer.train.inits import INITS
from paratransfer.train.objectives import CrossEntropy
from paratransfer.train.settings import TrainSettings
from paratransfer.train.state import Run


def resolve_settings(settings: TrainSettings, adapter, arch) -> TrainSettings:
    """Fill rank, alpha and modules from the adapter when one is given, else 16, 16, all."""
    from paratransfer.arch import ROLES

    if adapter is None:
        return replace(settings, rank=settings.rank or 16, alpha=settings.alpha or 16.0,
                       modules=settings.modules or ROLES)
    if INITS[settings.init].needs_adapter and settings.rank not in (None, adapter.rank):
        raise UserError(f"--rank: {settings.rank} differs from the adapter's rank {adapter.rank} "
                        f"({adapter.folder}); --init {settings.init} takes the rank of the "
                        "extracted factors")
    return replace(settings, rank=settings.rank or adapter.rank,
                   alpha=settings.alpha or adapter.alpha,
                   modules=settings.modules or adapter_roles(adapter, arch))


def adapter_roles(adapter, arch) -> tuple[str, ...]:
    """The roles an adapter's target modules hold in the student's family."""
    from paratransfer.arch import ROLES

    by_path = {m.path: m for m in arch.modules()}
    roles: set[str] = set()
    for target in adapter.targets:
        if target not in by_path:
            raise UserError(f"{adapter.folder}: the adapter targets {target!r}, which {arch.family} "
                            "students do not have (was it extracted for this student?)")
        roles.update(by_path[target].roles)
    return tuple(r for r in ROLES if r in roles)


def lora_targets(student, roles: tuple[str, ...]) -> tuple[list, list[dict]]:
    """The module specs to wrap (`adapter.lora`, as extraction wraps them), and what was skipped;
    refused when nothing is left to train."""
    from paratransfer.adapter.lora import lora_targets as student_targets

    targets = student_targets(student, roles)
    if not targets.specs:
        raise UserError(f"--modules: none of {', '.join(roles)} can be trained on this student")
    return targets.specs, targets.tied_head + targets.missing


def check_rank(student, specs: list, rank: int) -> None:
    """The rank fits every matrix LoRA will adapt, as extraction requires (`checks.rank_fits`)."""
    from paratransfer.arch import arch_for
    from paratransfer.io.checks import rank_fits

    arch = arch_for(student)
    params = dict(student.named_parameters(remove_duplicate=False))
    for spec in specs:
        for layer in (range(arch.num_layers(student)) if spec.in_layer else [None]):
            name = spec.param_name(arch.layers, layer)
            rank_fits(rank, tuple(spec.to_linear(params[name]).shape), name)


def build_lora_model(student, specs: list, settings: TrainSettings, student_id: str,
                     data=None):
    """Wrap the student with PEFT LoRA, seeded; the arm's init says how PEFT fills the factors
    (its default for most, PiSSA for `pissa`) and what it does first (`prepare`, with the
    training data `data` for the inits that need it)."""
    from peft import get_peft_model

    from paratransfer.adapter.lora import lora_config

    init = INITS[settings.init]
    config = lora_config(student, specs, settings.rank, settings.alpha, settings.dropout,
                         base_model_name_or_path=student_id, init_lora_weights=init.peft_init,
                         **(init.lora_kwargs() if init.lora_kwargs is not None else {}))
    if init.needs_data and data is None:
        raise ValueError(f"init {init.name} reads the training data: pass `data`")
    if init.prepare is not None:
        init.prepare(student, config, data)
    torch.manual_seed(settings.seed)
    return get_peft_model(student, config)


def init_lora(peft_model, settings: TrainSettings, adapter, data=None) -> dict | None:
    """The one place the arms differ: the named init sets the factors (train/inits.py)."""
    init = INITS[settings.init]
    if init.apply is None:
        return None
    extra = {"data": data} if init.needs_data else {}
    return init.apply(peft_model, adapter, settings.seed, **extra)


def data_for_init(examples: list, settings: TrainSettings, pad_id: int, device, total: int):
    """The training data a data-driven init reads (None for the others): the first
    `init_batches` effective batches of training, at most the run's steps."""
    if not INITS[settings.init].needs_data:
        return None
    from paratransfer.train.data_inits import init_data

    return init_data(examples, settings.batch_size, settings.micro_batch_size, settings.seed,
                     min(settings.init_batches, total), pad_id, device)


def check_output(out: Path, resume: bool, overwrite: bool) -> tuple[Path, Path | None]:
    """Refuse what cannot be done before any work; returns the folder to work in and the
    checkpoint to resume from (None: a fresh run).

    A fresh run works in `out` itself. One that replaces an existing output (`--overwrite`)
    works in `replacing_dir(out)` and is renamed into place only when complete, so the old
    output stays whole until then. `--resume` continues the replacement if there is one, else
    the run in `out`, from its newest intact checkpoint.
    """
    from paratransfer.io.console import notice
    from paratransfer.io.outputs import replacing_dir

    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other (give one)")
    if resume:
        for folder in (replacing_dir(out), out):
            if (folder / CHECKPOINTS).is_dir():
                last = last_checkpoint(folder, say=notice)
                if last is None:
                    raise UserError(f"--resume: no intact checkpoint in {folder / CHECKPOINTS} "
                                    "(start again with --overwrite)")
                return folder, last
        raise UserError(f"--resume: nothing to resume in {out} (no checkpoint in "
                        f"{out / CHECKPOINTS})")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists (pass --resume to continue that run, or "
                        "--overwrite to replace it)")
    return (replacing_dir(out) if out.exists() else out), None


def resumable(out: Path) -> bool:
    """Whether `--resume` would find an intact checkpoint for `out` (in a replacement under
    way, or in `out` itself)."""
    from paratransfer.io.outputs import replacing_dir

    for folder in (replacing_dir(out), out):
        if (folder / CHECKPOINTS).is_dir():
            return last_checkpoint(folder) is not None
    return False


def setup(student_id: str, data_path: str | Path, out: Path, settings: TrainSettings,
          adapter_dir: str | Path | None, dtype: torch.dtype, device: torch.device, dist: Dist,
          resume_from: Path | None, eval_data: str | Path | None = None) -> Run:
    """Read and check every input, build the LoRA model of the chosen arm and the optimizer:
    data, then model, optimizer, metadata and objective, each a step of its own below."""
    from paratransfer.adapter.inject import read_adapter

    if INITS[settings.init].needs_adapter and adapter_dir is None:
        raise UserError(f"--init {settings.init} needs --adapter ADAPTER_DIR (from "
                        "`paratransfer extract`)")
    adapter = read_adapter(adapter_dir) if adapter_dir is not None else None
    tokenizer, examples, dropped, heldout = _setup_data(student_id, data_path, settings, dist,
                                                        eval_data)
    per_epoch = steps_per_epoch(len(examples), settings.batch_size)
    total = settings.max_steps or settings.epochs * per_epoch
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    data = data_for_init(examples, settings, pad_id, device, total)
    model, settings, specs, skipped, injection = _setup_model(student_id, settings, adapter,
                                                             dtype, device, data)
    trainable, optimizer = _setup_optimizer(model, settings, dist)
    if heldout and settings.eval_every is None:  # about ten points on the curve
        settings = replace(settings, eval_every=max(1, math.ceil(total / 10)))
    meta = {
        **_inputs_metadata(student_id, data_path, adapter_dir, settings, dist, dtype, device),
        "examples": len(examples),
        "dropped_no_answer": dropped,
        "steps": total,
        "steps_per_epoch": per_epoch,
        "grad_accumulation": math.ceil(settings.batch_size / (settings.micro_batch_size * dist.world)),
        "warmup_steps": math.ceil(settings.warmup_ratio * total),
        "target_modules": [s.path for s in specs],
        "skipped": skipped,
        "injection": injection,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "heldout": _heldout_metadata(eval_data, heldout, settings),
    }
    objective = _setup_objective(settings, tokenizer, dtype, device, meta, model)
    run = Run(settings, model, optimizer, examples, pad_id, total, meta["warmup_steps"], device,
              dtype, dist, out, meta, heldout=heldout, objective=objective)
    if resume_from is not None:
        restore_checkpoint(run, resume_from)
    return run


def _setup_data(student_id: str, data_path: str | Path, settings: TrainSettings, dist: Dist,
                eval_data: str | Path | None) -> tuple[object, list, int, list]:
    """The student's tokenizer, the training examples (and how many were dropped), the
    held-out examples."""
    from paratransfer.teacher.models import load_tokenizer

    tokenizer = load_tokenizer(student_id)
    examples, dropped = load_examples(data_path, tokenizer, settings.prompt_format,
                                      settings.max_length)
    if dropped and dist.main:
        from paratransfer.io.console import notice

        notice(f"{data_path}: {dropped} of {dropped + len(examples)} examples dropped, no answer "
               f"token left after truncation to --max-length {settings.max_length} "
               "(train.json: dropped_no_answer)")
    heldout: list = []
    if eval_data is not None:
        heldout, _ = load_examples(eval_data, tokenizer, settings.prompt_format, settings.max_length)
    elif settings.eval_every is not None:
        raise UserError("--eval-every: give the held-out examples to score with --eval-data FILE")
    return tokenizer, examples, dropped, heldout


def _setup_model(student_id: str, settings: TrainSettings, adapter, dtype: torch.dtype,
                 device: torch.device, data=None
                 ) -> tuple[object, TrainSettings, list, list[dict], dict | None]:
    """The student wrapped with LoRA and initialized by the arm (`data`: the training batches
    a data-driven init reads); the settings completed from the adapter; the wrapped modules,
    the skipped roles and what the init did."""
    from paratransfer.adapter.inject import check_adapter_shapes
    from paratransfer.arch import arch_for
    from paratransfer.teacher.models import load_model

    student = load_model(student_id, dtype=dtype, device=device)
    if adapter is not None:
        check_adapter_shapes(student, adapter)
    settings = resolve_settings(settings, adapter, arch_for(student))
    specs, skipped = lora_targets(student, settings.modules)
    check_rank(student, specs, settings.rank)
    model = build_lora_model(student, specs, settings, student_id, data)
    injection = init_lora(model, settings, adapter, data)
    return model, settings, specs, skipped, injection


def _setup_optimizer(model, settings: TrainSettings, dist: Dist) -> tuple[list, torch.optim.Optimizer]:
    """The trainable parameters (the same start on every process) and their AdamW."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if dist.world > 1:  # identical start on every process, whatever each drew at random
        for p in trainable:
            torch.distributed.broadcast(p.data, src=0)
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, betas=settings.adam_betas,
                                  eps=settings.adam_eps, weight_decay=settings.weight_decay)
    return trainable, optimizer


def _inputs_metadata(student_id: str, data_path: str | Path, adapter_dir: str | Path | None,
                     settings: TrainSettings, dist: Dist, dtype: torch.dtype,
                     device: torch.device) -> dict:
    """The first part of train.json: what the run read and how it was set."""
    from paratransfer.tasks.examples import file_digest
    from paratransfer.teacher.gguf import gguf_provenance
    from paratransfer.teacher.models import model_label

    return {
        "paratransfer_version": __version__,
        "runtime": runtime(),
        "student": model_label(student_id),
        **gguf_provenance("student", student_id),
        "data": str(Path(data_path).resolve()),
        "data_sha256": file_digest(data_path),
        "adapter": str(Path(adapter_dir).resolve()) if adapter_dir is not None else None,
        "adapter_sha256": (file_digest(Path(adapter_dir) / "adapter_model.safetensors")
                           if adapter_dir is not None else None),
        "init": settings.init,
        "settings": settings.as_dict(),
        "seed": settings.seed,
        "world_size": dist.world,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
    }


def _heldout_metadata(eval_data: str | Path | None, heldout: list,
                      settings: TrainSettings) -> dict | None:
    from paratransfer.tasks.examples import file_digest

    if eval_data is None:
        return None
    return {"data": str(Path(eval_data).resolve()), "data_sha256": file_digest(eval_data),
            "examples": len(heldout), "every": settings.eval_every}


def _setup_objective(settings: TrainSettings, tokenizer, dtype: torch.dtype,
                     device: torch.device, meta: dict, model: torch.nn.Module):
    """Cross-entropy, or distillation from the teacher (recorded in `meta["distill"]`)."""
    if settings.distill is None:
        return CrossEntropy()
    from paratransfer.io.devices import DTYPES
    from paratransfer.teacher.gguf import gguf_provenance
    from paratransfer.teacher.models import model_label
    from paratransfer.train.objectives import load_distillation, output_rows

    teacher_dtype = dtype if settings.teacher_dtype == "auto" else DTYPES[settings.teacher_dtype]
    objective = load_distillation(settings.distill, tokenizer, settings.distill_weight,
                                  settings.distill_temperature, teacher_dtype, device,
                                  student_rows=output_rows(model))
    meta["distill"] = {"teacher": model_label(settings.distill),
                       **gguf_provenance("teacher", settings.distill),
                       "weight": settings.distill_weight,
                       "temperature": settings.distill_temperature,
                       "teacher_dtype": str(teacher_dtype).removeprefix("torch."),
                       "teacher_parameters": sum(p.numel() for p in objective.teacher.parameters()),
                       "vocabulary": objective.vocab}
    return objective
