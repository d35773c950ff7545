"""LoRA fine-tuning of the student (METHOD.md §6): setup -> train -> save.

The transfer arm and the standard (baseline) arm run every line here; they differ only in
`init_lora`: the standard arm keeps PEFT's default init (A random, B zero), the transfer arm
loads the extracted factors and subtracts them from the base weights (`inject.py`).

Loss. Answer-only token cross-entropy, *summed* over the answer tokens of every micro-batch of
an optimizer step (on every process) and divided by the number of answer tokens in the whole
effective batch: the step's gradient is that of the mean token loss over the effective batch,
whatever the micro-batch size or the number of processes. (HF Trainer instead averages
per-micro-batch means, which gives the tokens of short answers more weight.)

Determinism. The examples of epoch e come in the order `randperm(n, Generator(seed, e))`, a
function of the seed and the data size only: both arms see the same batches in the same
order. The global RNG (LoRA dropout) is reseeded from (seed, step, rank) at every step, so a
resumed run continues exactly and a checkpoint needs no RNG state.

Data parallel. Under `torchrun --nproc_per_node N` or `accelerate launch` (WORLD_SIZE > 1) each
process takes every N-th example of each effective batch; gradients and the loss are summed
across processes with one all-reduce per step (gloo on CPU, nccl on GPU). Rank 0 writes.

RUN_DIR holds, once done: a plain LoRA adapter for the unmodified student (rank 2r for a
transfer run, r for a standard run), `train.json`, `loss.png`, `initial/` (the adapter as it
was after the init) and `checkpoints/step-NNNNNN/` (the last few).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from paratransfer import __version__
from paratransfer.errors import UserError
from paratransfer.outputs import atomic_dir, write_json

INITS = ("transfer", "standard")
CHECKPOINTS = "checkpoints"
TRAIN_JSON = "train.json"
#: Settings that may differ between a run and its resumption (they do not change the result).
_RESUMABLE_CHANGES = {"checkpoint_every", "keep_checkpoints"}


@dataclass(frozen=True)
class TrainSettings:
    """Every choice of a training run; the defaults are the paper's recipe (METHOD.md §6)."""

    init: str = "transfer"  # transfer (extracted factors, residual base) | standard (PEFT default)
    epochs: int = 3
    lr: float = 3e-4
    batch_size: int = 64  # effective batch: examples per optimizer step over all processes
    micro_batch_size: int = 8  # examples per forward pass on one process
    max_length: int = 2048  # tokens per example (prompt + answer), longer ones are cut
    max_steps: int | None = None  # stop (and schedule) after this many steps instead of epochs
    seed: int = 1
    rank: int | None = None  # LoRA r; None: the adapter's, else 16
    alpha: float | None = None  # LoRA alpha (scale alpha/r); None: the adapter's, else 16
    dropout: float = 0.05
    modules: tuple[str, ...] | None = None  # roles; None: the adapter's, else all
    warmup_ratio: float = 0.03  # linear warmup over ceil(ratio * steps), then linear decay to 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping as HF Trainer's default; 0 turns it off
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    prompt_format: str = "tulu"
    checkpoint_every: int = 10  # steps
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        from paratransfer.arch import parse_roles
        from paratransfer.data import PROMPT_FORMATS

        if self.init not in INITS:
            raise UserError(f"--init: {self.init!r} is not known (expected one of: {', '.join(INITS)})")
        for flag, value, least in (("--epochs", self.epochs, 1), ("--batch-size", self.batch_size, 1),
                                   ("--micro-batch-size", self.micro_batch_size, 1),
                                   ("--max-length", self.max_length, 2),
                                   ("--checkpoint-every", self.checkpoint_every, 1),
                                   ("--max-steps", self.max_steps, 1), ("--rank", self.rank, 1),
                                   ("keep_checkpoints", self.keep_checkpoints, 1)):
            if value is not None and value < least:
                raise UserError(f"{flag}: must be at least {least} (got {value})")
        if self.micro_batch_size > self.batch_size:
            raise UserError(f"--micro-batch-size ({self.micro_batch_size}) must not exceed "
                            f"--batch-size ({self.batch_size})")
        if not self.lr > 0:
            raise UserError(f"--lr: must be positive (got {self.lr})")
        if self.alpha is not None and not self.alpha > 0:
            raise UserError(f"--alpha: must be positive (got {self.alpha})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout: must be in [0, 1) (got {self.dropout})")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"warmup_ratio: must be in [0, 1) (got {self.warmup_ratio})")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise UserError("max_grad_norm and weight_decay must not be negative")
        if self.prompt_format not in PROMPT_FORMATS:
            raise UserError(f"--prompt-format: {self.prompt_format!r} is not known "
                            f"(expected one of: {', '.join(PROMPT_FORMATS)})")
        if self.modules is not None:
            object.__setattr__(self, "modules", parse_roles(self.modules))
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["modules"] = list(self.modules) if self.modules is not None else None
        d["adam_betas"] = list(self.adam_betas)
        return d


@dataclass
class TrainResult:
    """What `run_train` returns: the summary written to train.json and the trained model.

    `model` is the in-memory PEFT model (base weights residual for a transfer run), in eval
    mode; `complete` is False when `stop_after` ended the run early (it can be resumed).
    """

    out: Path
    summary: dict
    model: torch.nn.Module
    complete: bool
    main: bool = True  # rank 0 (the process that writes)


# --------------------------------------------------------------------------- data order


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the n examples in one epoch: depends on (seed, epoch, n) only."""
    return _epoch_order(n, seed, epoch)


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(_mix(seed, epoch))
    return torch.randperm(n, generator=g).tolist()


def _mix(*parts: int) -> int:
    """Distinct reproducible seeds for tuples of small integers."""
    h = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps per epoch; the last batch of an epoch may be smaller."""
    return math.ceil(n / batch_size)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The example indices of the effective batch of (0-based) optimizer step `step`."""
    per_epoch = steps_per_epoch(n, batch_size)
    epoch, pos = divmod(step, per_epoch)
    return epoch_order(n, seed, epoch)[pos * batch_size:(pos + 1) * batch_size]


def micro_batches(indices: list[int], micro_batch_size: int, rank: int = 0,
                  world: int = 1) -> list[list[int]]:
    """This process's share of an effective batch (every world-th example), in micro-batches."""
    share = indices[rank::world]
    return [share[i:i + micro_batch_size] for i in range(0, len(share), micro_batch_size)]


def batch_digest(indices: list[int]) -> str:
    """A short fingerprint of a batch's examples and their order, recorded per step."""
    return hashlib.sha1(",".join(map(str, indices)).encode()).hexdigest()[:12]


def learning_rate(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warmup then linear decay to 0, as transformers' get_linear_schedule_with_warmup."""
    if step < warmup:
        return base * step / max(1, warmup)
    return base * max(0.0, (total - step) / max(1, total - warmup))


@dataclass(frozen=True)
class Example:
    """One tokenized training example."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    answer_tokens: int  # labels that count after the causal shift


def load_examples(path: str | Path, tokenizer, prompt_format: str,
                  max_length: int) -> tuple[list[Example], int]:
    """Tokenize the training file; examples whose answer was cut off are dropped (counted)."""
    from paratransfer.data import IGNORE_INDEX, load_tokenized

    examples, dropped = [], 0
    for tokens in load_tokenized(path, tokenizer, prompt_format, max_length):
        answer = sum(1 for label in tokens["labels"][1:] if label != IGNORE_INDEX)
        if answer == 0:
            dropped += 1
            continue
        examples.append(Example(torch.tensor(tokens["input_ids"]), torch.tensor(tokens["labels"]),
                                answer))
    if not examples:
        raise UserError(f"{path}: no example has an answer token left after truncation to "
                        f"{max_length} tokens")
    return examples, dropped


def collate(examples: list[Example], indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on padding)."""
    from paratransfer.data import IGNORE_INDEX

    rows = [examples[i] for i in indices]
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = r.input_ids, r.labels, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the answer tokens (fp32)."""
    from paratransfer.data import IGNORE_INDEX

    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                           labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel run (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def start_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun / accelerate describe in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not torch.distributed.is_initialized()
    if owns:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, owns), device


def sum_across_processes(tensors: list[torch.Tensor], dist: Dist) -> None:
    """In-place sum over processes with a single all-reduce of one flat buffer."""
    if dist.world == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


# --------------------------------------------------------------------------- setup


def resolve_settings(settings: TrainSettings, adapter, arch) -> TrainSettings:
    """Fill rank, alpha and modules from the adapter when one is given, else 16, 16, all."""
    from paratransfer.arch import ROLES

    if adapter is None:
        return replace(settings, rank=settings.rank or 16, alpha=settings.alpha or 16.0,
                       modules=settings.modules or ROLES)
    if settings.init == "transfer" and settings.rank not in (None, adapter.rank):
        raise UserError(f"--rank: {settings.rank} differs from the adapter's rank {adapter.rank} "
                        f"({adapter.folder}); the extracted factors fix the rank")
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
    """The module specs to wrap, and what was skipped (a tied head: the embedding covers it)."""
    from paratransfer.arch import arch_for
    from paratransfer.inject import is_tied

    arch = arch_for(student)
    specs, skipped = [], []
    for spec in arch.modules_for(roles):
        if spec.roles == ("head",) and is_tied(student):
            skipped.append({"role": "head", "reason": "the student's lm_head is tied to its "
                            "embedding; the embed adapter covers both"})
            continue
        specs.append(spec)
    for role in sorted(set(roles) - arch.roles()):
        skipped.append({"role": role, "reason": f"the {arch.family} family has no {role}"})
    if not specs:
        raise UserError(f"--modules: none of {', '.join(roles)} can be trained on this student")
    return specs, skipped


def build_lora_model(student, specs: list, settings: TrainSettings, student_id: str):
    """Wrap the student with PEFT LoRA (default init, seeded): the same in both arms."""
    from peft import LoraConfig, get_peft_model

    from paratransfer.arch import arch_for

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=arch_for(student).peft_targets(specs),
                        fan_in_fan_out=any(s.conv1d for s in specs), bias="none",
                        task_type="CAUSAL_LM", base_model_name_or_path=student_id)
    torch.manual_seed(settings.seed)
    return get_peft_model(student, config)


def init_lora(peft_model, settings: TrainSettings, adapter) -> dict | None:
    """The one place the arms differ: transfer loads the factors and makes the base residual."""
    if settings.init == "standard":
        return None
    from paratransfer.inject import inject_transfer_init

    return inject_transfer_init(peft_model, adapter)


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

    @property
    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]


def check_output(out: Path, resume: bool, overwrite: bool) -> Path | None:
    """Refuse what cannot be done before any work; returns the checkpoint to resume from."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other (give one)")
    if resume:
        last = last_checkpoint(out)
        if last is None:
            raise UserError(f"--resume: nothing to resume in {out} (no checkpoint in "
                            f"{out / CHECKPOINTS})")
        return last
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists (pass --resume to continue that run, or "
                        "--overwrite to replace it)")
    return None


def setup(student_id: str, data_path: str | Path, out: Path, settings: TrainSettings,
          adapter_dir: str | Path | None, dtype: torch.dtype, device: torch.device, dist: Dist,
          resume_from: Path | None) -> Run:
    """Read and check every input, build the LoRA model of the chosen arm and the optimizer."""
    from paratransfer.arch import arch_for
    from paratransfer.data import file_digest
    from paratransfer.inject import check_adapter_shapes, read_adapter
    from paratransfer.models import load_model, load_tokenizer, model_label

    if settings.init == "transfer" and adapter_dir is None:
        raise UserError("--init transfer needs --adapter ADAPTER_DIR (from `paratransfer extract`)")
    adapter = read_adapter(adapter_dir) if adapter_dir is not None else None
    tokenizer = load_tokenizer(student_id)
    examples, dropped = load_examples(data_path, tokenizer, settings.prompt_format,
                                      settings.max_length)
    student = load_model(student_id, dtype=dtype, device=device)
    if adapter is not None:
        check_adapter_shapes(student, adapter)
    settings = resolve_settings(settings, adapter, arch_for(student))
    specs, skipped = lora_targets(student, settings.modules)
    model = build_lora_model(student, specs, settings, student_id)
    injection = init_lora(model, settings, adapter)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if dist.world > 1:  # identical start on every process, whatever each drew at random
        for p in trainable:
            torch.distributed.broadcast(p.data, src=0)
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, betas=settings.adam_betas,
                                  eps=settings.adam_eps, weight_decay=settings.weight_decay)
    per_epoch = steps_per_epoch(len(examples), settings.batch_size)
    total = settings.max_steps or settings.epochs * per_epoch
    meta = {
        "paratransfer_version": __version__,
        "student": model_label(student_id),
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
    }
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    run = Run(settings, model, optimizer, examples, pad_id, total, meta["warmup_steps"], device,
              dtype, dist, out, meta)
    if resume_from is not None:
        restore_checkpoint(run, resume_from)
    return run


# --------------------------------------------------------------------------- checkpoints


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    folder = Path(out) / CHECKPOINTS
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def save_checkpoint(run: Run, step: int) -> Path:
    """LoRA factors, AdamW state (tensors) and the rest (JSON), written atomically."""
    from safetensors.torch import save_file

    tensors = {f"param.{n}": p.detach().cpu().clone().contiguous() for n, p in run.trainable}
    state = run.optimizer.state_dict()
    other: dict[str, dict] = {}
    for i, s in state["state"].items():
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{i}.{k}"] = v.detach().cpu().clone().contiguous()
            else:
                other.setdefault(str(i), {})[k] = v
    info = {"step": step, "meta": run.meta, "history": run.history, "seconds": run.seconds,
            "param_names": [n for n, _ in run.trainable],
            "optimizer": {"param_groups": state["param_groups"], "other_state": other}}
    path = run.out / CHECKPOINTS / f"step-{step:06d}"
    with atomic_dir(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        write_json(tmp / "state.json", info)
    old = sorted(p for p in (run.out / CHECKPOINTS).glob("step-*") if p.is_dir())
    for p in old[:-run.settings.keep_checkpoints]:
        shutil.rmtree(p, ignore_errors=True)
    return path


def restore_checkpoint(run: Run, folder: Path) -> None:
    """Load a checkpoint into the run, after checking it belongs to the same settings and data."""
    from safetensors.torch import load_file

    info = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    _check_same_run(info["meta"], run.meta, folder)
    tensors = load_file(str(folder / "state.safetensors"))
    names = [n for n, _ in run.trainable]
    if names != info["param_names"]:
        raise UserError(f"{folder}: its LoRA parameters differ from this run's")
    with torch.no_grad():
        for n, p in run.trainable:
            p.copy_(tensors[f"param.{n}"].to(p.device, p.dtype))
    state: dict = {"state": {}, "param_groups": info["optimizer"]["param_groups"]}
    for key, t in tensors.items():
        if key.startswith("optimizer."):
            _, i, k = key.split(".", 2)
            state["state"].setdefault(int(i), {})[k] = t
    for i, extra in info["optimizer"]["other_state"].items():
        state["state"].setdefault(int(i), {}).update(extra)
    run.optimizer.load_state_dict(state)
    run.history = info["history"]
    run.start_step = info["step"]
    run.seconds = info.get("seconds", 0.0)
    run.meta["resumed_from"] = [*info["meta"].get("resumed_from", []), info["step"]]


def _check_same_run(saved: dict, now: dict, folder: Path) -> None:
    """A resumed run must train the same thing: same student, data, adapter and settings."""
    for key in ("student", "data_sha256", "adapter_sha256", "init"):
        if saved.get(key) != now.get(key):
            raise UserError(f"--resume: {key} is {now.get(key)!r} now but {saved.get(key)!r} in "
                            f"{folder} (give the command that started the run)")
    for key, value in now["settings"].items():
        if key not in _RESUMABLE_CHANGES and saved["settings"].get(key) != value:
            raise UserError(f"--resume: setting {key} is {value!r} now but "
                            f"{saved['settings'].get(key)!r} in {folder} (give the command that "
                            "started the run)")


# --------------------------------------------------------------------------- training


def _autocast(run: Run):
    """Mixed precision on GPU (base weights in bf16/fp16, LoRA factors fp32); none on CPU."""
    if run.device.type == "cuda" and run.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=run.dtype)
    return contextlib.nullcontext()


def train_step(run: Run, step: int, scaler) -> dict:
    """One optimizer step over one effective batch; returns its history entry."""
    s, dist = run.settings, run.dist
    indices = batch_indices(len(run.examples), s.batch_size, s.seed, step)
    answer_total = sum(run.examples[i].answer_tokens for i in indices)
    torch.manual_seed(_mix(s.seed, step, dist.rank))  # LoRA dropout: same masks when resumed
    loss_sum = torch.zeros((), device=run.device)
    tokens = 0
    for mb in micro_batches(indices, s.micro_batch_size, dist.rank, dist.world):
        batch = {k: v.to(run.device) for k, v in collate(run.examples, mb, run.pad_id).items()}
        with _autocast(run):
            logits = run.model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
        part = answer_loss_sum(logits, batch["labels"])
        scaler.scale(part / answer_total).backward()
        loss_sum += part.detach()
        tokens += int(batch["attention_mask"].sum())
    params = [p for _, p in run.trainable]
    for p in params:
        if p.grad is None:  # a process with no example in a short last batch
            p.grad = torch.zeros_like(p)
    counts = torch.tensor([float(tokens)], device=run.device)
    sum_across_processes([p.grad for p in params] + [loss_sum, counts], dist)
    scaler.unscale_(run.optimizer)
    if s.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
    lr = learning_rate(step, run.total_steps, run.warmup_steps, s.lr)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    scaler.step(run.optimizer)
    scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    per_epoch = steps_per_epoch(len(run.examples), s.batch_size)
    return {"step": step + 1, "epoch": step // per_epoch, "loss": float(loss_sum) / answer_total,
            "lr": lr, "tokens": int(counts.item()), "answer_tokens": answer_total,
            "batch": batch_digest(indices)}


def train(run: Run, progress: bool, stop_after: int | None) -> bool:
    """The loop: steps from where the run stands, checkpoints; True when all steps are done."""
    from tqdm.auto import tqdm

    s = run.settings
    end = run.total_steps if stop_after is None else min(run.total_steps, stop_after)
    scaler = torch.amp.GradScaler("cuda", enabled=run.device.type == "cuda"
                                  and run.dtype == torch.float16)
    run.model.train()
    bar = tqdm(total=run.total_steps, initial=run.start_step, desc=f"train ({s.init})",
               disable=not progress or not run.dist.main, dynamic_ncols=True)
    for step in range(run.start_step, end):
        started = time.perf_counter()
        entry = train_step(run, step, scaler)
        entry["seconds"] = round(time.perf_counter() - started, 6)
        run.seconds += entry["seconds"]
        run.history.append(entry)
        bar.update(1)
        bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}")
        if (step + 1) % s.checkpoint_every == 0 or step + 1 == end:
            if run.dist.main:
                save_checkpoint(run, step + 1)
            run.dist.barrier()
    bar.close()
    run.model.eval()
    return end == run.total_steps


# --------------------------------------------------------------------------- save


def summary(run: Run, complete: bool) -> dict:
    """train.json: settings, seed, steps, loss curve, throughput."""
    tokens = sum(h["tokens"] for h in run.history)
    return {
        **run.meta,
        "complete": complete,
        "steps_done": len(run.history),
        "final_loss": run.history[-1]["loss"] if run.history else None,
        "train_seconds": round(run.seconds, 3),
        "tokens_per_second": tokens / run.seconds if run.seconds > 0 else None,
        "adapter_rank": run.settings.rank * (2 if run.settings.init == "transfer" else 1),
        "history": run.history,
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
    from paratransfer.inject import INITIAL_NAME, save_plain_lora

    tmp = Path(tempfile.mkdtemp(prefix=".final.partial-", dir=run.out))
    try:
        initial = None
        if run.settings.init == "transfer":
            initial = tmp / INITIAL_NAME  # PEFT rewrites the config of this folder: use a copy
            shutil.copytree(run.out / INITIAL_NAME, initial)
        save_plain_lora(run.model, tmp / "adapter", initial)
        write_json(tmp / "adapter" / TRAIN_JSON, info)
        plot_loss(run.history, tmp / "adapter" / "loss.png",
                  f"{run.settings.init} init: loss per step ({len(run.history)} steps)")
        names = sorted(p.name for p in (tmp / "adapter").iterdir())
        for name in [n for n in names if n != TRAIN_JSON] + [TRAIN_JSON]:  # train.json last
            os.replace(tmp / "adapter" / name, run.out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_output(run: Run, overwrite: bool) -> None:
    """Create RUN_DIR for a fresh run (replacing an old one with --overwrite); rank 0 only."""
    from paratransfer.inject import INITIAL_NAME

    if run.out.exists() and overwrite:
        shutil.rmtree(run.out)
    run.out.mkdir(parents=True)
    (run.out / CHECKPOINTS).mkdir()
    with atomic_dir(run.out / INITIAL_NAME) as tmp:
        run.model.save_pretrained(str(tmp), save_embedding_layers=False)


def run_train(student_id: str, data_path: str | Path, out: str | Path,
              settings: TrainSettings | None = None, adapter_dir: str | Path | None = None,
              dtype: torch.dtype | None = None, device: torch.device | str | None = None,
              resume: bool = False, overwrite: bool = False, progress: bool = True,
              stop_after: int | None = None) -> TrainResult:
    """`paratransfer train`: LoRA fine-tuning of the student in the transfer or standard arm.

    `stop_after` ends the run (with a checkpoint) once that many steps are done, as an
    interruption would; `resume=True` continues it. Nothing is written before every input has
    been checked.
    """
    from paratransfer.devices import pick_device, pick_dtype

    settings = settings or TrainSettings()
    out = Path(out)
    device = pick_device("auto" if device is None else str(device))
    dist, device = start_distributed(device)
    try:
        dtype = dtype or pick_dtype("auto", device)
        resume_from = check_output(out, resume, overwrite)
        run = setup(student_id, data_path, out, settings, adapter_dir, dtype, device, dist,
                    resume_from)
        if resume_from is None:
            if dist.main:
                prepare_output(run, overwrite)
            dist.barrier()
        complete = train(run, progress, stop_after)
        info = summary(run, complete)
        if complete and dist.main:
            save_outputs(run, info)
        dist.barrier()
        return TrainResult(out, info, run.model, complete, dist.main)
    finally:
        dist.close()
