"""The loop: one optimizer step over one effective batch, and the run from where it stands.

Loss. Answer-only token cross-entropy, *summed* over the answer tokens of every micro-batch of
an optimizer step (on every process) and divided by the number of answer tokens in the whole
effective batch: the step's gradient is that of the mean token loss over the effective batch,
whatever the micro-batch size or the number of processes. (HF Trainer instead averages
per-micro-batch means, which gives the tokens of short answers more weight.)

The global RNG (LoRA dropout) is reseeded from (seed, step, rank) at every step, so a resumed
run continues exactly and a checkpoint needs no RNG state.
"""

from __future__ import annotations

import contextlib
import time

import torch

from paratransfer.io.distributed import sum_across_processes
from paratransfer.train.batches import (
    batch_digest,
    batch_indices,
    collate,
    micro_batches,
    mix_seed,
    steps_per_epoch,
)
from paratransfer.train.checkpoints import save_checkpoint
from paratransfer.train.heldout import due, record
from paratransfer.train.state import Run


def learning_rate(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warmup then linear decay to 0, as transformers' get_linear_schedule_with_warmup."""
    if step < warmup:
        return base * step / max(1, warmup)
    return base * max(0.0, (total - step) / max(1, total - warmup))


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
    torch.manual_seed(mix_seed(s.seed, step, dist.rank))  # LoRA dropout: same masks when resumed
    loss_sum = torch.zeros((), device=run.device)
    part_sums = {name: torch.zeros((), device=run.device) for name in run.objective.parts}
    teacher_seconds = getattr(run.objective, "seconds", 0.0)
    tokens = 0
    for mb in micro_batches(indices, s.micro_batch_size, dist.rank, dist.world):
        batch = {k: v.to(run.device) for k, v in collate(run.examples, mb, run.pad_id).items()}
        with _autocast(run):
            logits = run.model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
        part, parts = run.objective(logits, batch)
        scaler.scale(part / answer_total).backward()
        loss_sum += part.detach()
        for name, value in parts.items():
            part_sums[name] += value.float()
        tokens += int(batch["attention_mask"].sum())
    params = [p for _, p in run.trainable]
    for p in params:
        if p.grad is None:  # a process with no example in a short last batch
            p.grad = torch.zeros_like(p)
    counts = torch.tensor([float(tokens)], device=run.device)
    sum_across_processes([p.grad for p in params] + [loss_sum, counts, *part_sums.values()], dist)
    check_finite(run, step, "loss", float(loss_sum) / answer_total)
    scaler.unscale_(run.optimizer)
    if s.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
    lr = learning_rate(step, run.total_steps, run.warmup_steps, s.lr)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    scaler.step(run.optimizer)
    scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    check_finite(run, step, "LoRA weights after the update", params)
    per_epoch = steps_per_epoch(len(run.examples), s.batch_size)
    entry = {"step": step + 1, "epoch": step // per_epoch, "loss": float(loss_sum) / answer_total,
             **{name: float(v) / answer_total for name, v in part_sums.items()},
             "lr": lr, "tokens": int(counts.item()), "answer_tokens": answer_total,
             "batch": batch_digest(indices)}
    if hasattr(run.objective, "seconds"):  # the distillation teacher's forward passes
        entry["teacher_seconds"] = round(run.objective.seconds - teacher_seconds, 6)
    return entry


def check_finite(run: Run, step: int, what: str, value: float | list[torch.Tensor]) -> None:
    """Stop the run with a one-line error at the first non-finite loss or weight: nothing of
    this step is saved, the last checkpoint stays the last good state."""
    import math

    from paratransfer.io.errors import UserError
    from paratransfer.train.checkpoints import last_checkpoint

    if isinstance(value, float):
        bad = not math.isfinite(value)
    else:
        bad = not all(bool(torch.isfinite(p).all()) for p in value)
    if bad:
        last = last_checkpoint(run.out)
        kept = (f"the last good checkpoint, {last.name}, is kept" if last is not None
                else "no checkpoint was written yet")
        raise UserError(f"step {step + 1}: the {what} became non-finite"
                        f"{f' ({value})' if isinstance(value, float) else ''}; training stopped "
                        f"and {kept} (lower --lr, or check the data)")


def train(run: Run, progress: bool, stop_after: int | None) -> bool:
    """The loop: steps from where the run stands, checkpoints; True when all steps are done."""
    from paratransfer.io.console import progress as progress_bar

    s = run.settings
    end = run.total_steps if stop_after is None else min(run.total_steps, stop_after)
    scaler = torch.amp.GradScaler("cuda", enabled=run.device.type == "cuda"
                                  and run.dtype == torch.float16)
    if run.start_step == 0 and due(run, 0, end):
        record(run, 0)
    run.model.train()
    bar = progress_bar(total=run.total_steps, initial=run.start_step, desc=f"train ({s.init})",
                       unit="step", enabled=progress and run.dist.main)
    for step in range(run.start_step, end):
        started = time.perf_counter()
        entry = train_step(run, step, scaler)
        seconds = round(time.perf_counter() - started, 6)
        run.seconds += seconds
        run.step_seconds.append(seconds)
        if "teacher_seconds" in entry:  # wall-clock time: with the run's timing, not its history
            run.teacher_seconds.append(entry.pop("teacher_seconds"))
        run.history.append(entry)
        bar.update(1)
        bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}")
        if due(run, step + 1, run.total_steps):
            record(run, step + 1)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", heldout=f"{run.heldout_history[-1]['loss']:.4f}")
        if (step + 1) % s.checkpoint_every == 0 or step + 1 == end:
            if run.dist.main:
                save_checkpoint(run, step + 1)
            run.dist.barrier()
    bar.close()
    run.model.eval()
    return end == run.total_steps
