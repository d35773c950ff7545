"""Training the translator: a few steps, each on one locating example plus examples drawn from
the data, the student's weights frozen and the translated vectors added to its located neurons.

    loss = mean over the batch of the student's answer-token LM loss with W + ΔW
           + reg_weight · Σ_roles mean(T_role²)           (T: what the translator outputs)

AdamW (β 0.9/0.95, weight decay 0.05) with a one-cycle schedule: cosine from lr/25 up to lr
over the first `warmup` share of the steps, cosine back down to lr/25 by the last.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from paratransfer.arch.spec import ArchSpec
from paratransfer.io.errors import UserError
from paratransfer.laten.inject import injected_parameters, weight_deltas
from paratransfer.laten.locate import Located
from paratransfer.laten.settings import LatenSettings
from paratransfer.laten.translator import Translator


@dataclass
class Step:
    """What one optimizer step reads: teacher vectors, where they go, the batch (student tokens)."""

    teacher_vectors: dict[str, torch.Tensor]
    student_located: Located
    batch: list[Mapping[str, Sequence[int]]]


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """The one-cycle multiplier of the peak learning rate at `step` (0-based), in [1/25, 1]."""
    low = 1.0 / 25.0
    rise = max(1, math.ceil(warmup * steps)) if steps > 1 else 0
    if step < rise:
        frac = step / rise
        return low + (1.0 - low) * (1 - math.cos(math.pi * frac)) / 2
    fall = max(1, steps - 1 - rise)
    frac = min(1.0, (step - rise) / fall)
    return low + (1.0 - low) * (1 + math.cos(math.pi * frac)) / 2


def example_loss(student: torch.nn.Module, params: Mapping[str, torch.Tensor] | None,
                 sample: Mapping[str, Sequence[int]]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of one example (weights replaced by `params`)."""
    device = student.get_input_embeddings().weight.device
    inputs = {"input_ids": torch.tensor([list(sample["input_ids"])], device=device),
              "labels": torch.tensor([list(sample["labels"])], device=device), "use_cache": False}
    if not params:
        return student(**inputs).loss
    return torch.func.functional_call(student, dict(params), args=(), kwargs=inputs,
                                      strict=False, tie_weights=False).loss


def regularizer(translated: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Σ over roles of the mean square of what the translator adds."""
    return sum(t.pow(2).mean() for t in translated.values())


def train_translator(student: torch.nn.Module, spec: ArchSpec, translator: Translator,
                     steps: Sequence[Step], settings: LatenSettings,
                     on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """Run the steps; returns the loss curve (one record per step)."""
    for p in student.parameters():
        p.requires_grad_(False)
    student.eval()  # no dropout: the loss is a function of the translator only
    optimizer = torch.optim.AdamW(translator.parameters(), lr=settings.lr,
                                  betas=(settings.beta1, settings.beta2), eps=1e-8,
                                  weight_decay=settings.weight_decay)
    curve = []
    for index, step in enumerate(steps):
        lr = settings.lr * lr_factor(index, len(steps), settings.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        translated = translator(step.teacher_vectors)
        reg = regularizer(translated)
        (settings.reg_weight * reg).backward(retain_graph=True)
        params = injected_parameters(student, spec, weight_deltas(student, spec,
                                                                 step.student_located, translated))
        lm_total = 0.0
        for sample in step.batch:  # one example at a time: memory of one forward
            loss = example_loss(student, params, sample)
            (loss / len(step.batch)).backward(retain_graph=True)
            lm_total += float(loss.detach())
        with torch.no_grad():
            plain = sum(float(example_loss(student, None, s)) for s in step.batch)
        optimizer.step()
        lm = lm_total / len(step.batch)
        record = {"step": index + 1, "lr": lr, "lm_loss": lm, "reg": float(reg.detach()),
                  "loss": lm + settings.reg_weight * float(reg.detach()),
                  "student_lm_loss": plain / len(step.batch)}
        for name, value in record.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"LaTen step {index + 1}: {name} is {value} (lower --lr, or "
                                "use --dtype float32)")
        curve.append(record)
        if on_step is not None:
            on_step(record)
    return curve
