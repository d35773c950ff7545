"""What training minimizes on a micro-batch: one home for every loss.

- `CrossEntropy`: the answer-only token cross-entropy (every arm's default).
- `Distillation`: (1 − λ)·CE + λ·τ²·KL(teacher_τ ‖ student_τ) on the same answer tokens, the
  teacher run in eval mode without gradients on the very batch the student sees. Logit
  distillation compares next-token distributions, so teacher and student must share one
  vocabulary (checked in `check_same_vocabulary`).

Each returns the micro-batch's loss *summed* over its answer tokens (the loop divides by the
effective batch's answer tokens, as for the plain loss) and its parts, for the history.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from paratransfer.io.errors import UserError
from paratransfer.tasks.examples import IGNORE_INDEX
from paratransfer.train.batches import answer_loss_sum


class CrossEntropy:
    """The answer-only cross-entropy, summed over the answer tokens."""

    parts: tuple[str, ...] = ()

    def __call__(self, logits: torch.Tensor,
                 batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return answer_loss_sum(logits, batch["labels"]), {}


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
           temperature: float, vocab: int) -> torch.Tensor:
    """Σ over answer positions of KL(p_teacher ‖ p_student) of the next-token distributions,
    both softened by the temperature and restricted to the first `vocab` logits (the shared
    tokenizer's tokens; a model may carry padding rows beyond them). fp32."""
    keep = labels[:, 1:] != IGNORE_INDEX  # position i predicts token i + 1
    s = student_logits[:, :-1][keep][:, :vocab].float() / temperature
    t = teacher_logits[:, :-1][keep][:, :vocab].float() / temperature
    return F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True,
                    reduction="sum")


class Distillation:
    """(1 − λ)·CE + λ·τ²·KL(teacher_τ ‖ student_τ), summed over the answer tokens."""

    parts: tuple[str, ...] = ("ce", "kl")

    def __init__(self, teacher: torch.nn.Module, weight: float, temperature: float, vocab: int):
        self.teacher, self.weight, self.temperature, self.vocab = teacher, weight, temperature, vocab
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.seconds = 0.0  # teacher forward time, summed over the calls

    def __call__(self, logits: torch.Tensor,
                 batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce = answer_loss_sum(logits, batch["labels"])
        started = time.perf_counter()
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=batch["input_ids"],
                                          attention_mask=batch["attention_mask"]).logits
        self.seconds += time.perf_counter() - started
        kl = kl_sum(logits, teacher_logits, batch["labels"], self.temperature, self.vocab)
        total = (1 - self.weight) * ce + self.weight * self.temperature ** 2 * kl
        return total, {"ce": ce.detach(), "kl": kl.detach()}


def check_same_vocabulary(teacher_tokenizer, student_tokenizer, teacher_id: str) -> int:
    """The shared vocabulary's size; a one-line refusal when the tokenizers differ."""
    t, s = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t != s:
        differ = sorted(set(t.items()) ^ set(s.items()), key=lambda kv: kv[1])
        example = f"e.g. token {differ[0][0]!r}" if differ else ""
        raise UserError(f"--distill {teacher_id}: the teacher's tokenizer has another vocabulary "
                        f"({len(t)} tokens) than the student's ({len(s)}; {example}); logit "
                        "distillation compares next-token distributions and needs one vocabulary")
    return len(s)


def output_rows(model: torch.nn.Module) -> int:
    """How many next-token logits `model` gives (its output layer's rows; through a PEFT
    wrapper, the base layer's)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is None and hasattr(head, "base_layer"):
        weight = head.base_layer.weight
    return int(weight.shape[0])


def check_logits_cover(vocab: int, teacher_rows: int, student_rows: int, teacher_id: str) -> None:
    """Both models must give a logit for every token of the shared vocabulary: the KL compares
    the first `vocab` logits of each, so a model with fewer rows (a tokenizer with added tokens
    whose embedding was not resized) would fail at the first step with a shape error."""
    for who, rows in (("the teacher", teacher_rows), ("the student", student_rows)):
        if rows < vocab:
            raise UserError(f"--distill {teacher_id}: {who}'s output layer has {rows} rows for "
                            f"the tokenizer's {vocab} tokens (teacher {teacher_rows}, student "
                            f"{student_rows} rows; expected both to cover the vocabulary, e.g. "
                            "with the embedding resized to the tokenizer)")


def load_distillation(teacher_id: str, student_tokenizer, weight: float, temperature: float,
                      dtype: torch.dtype, device: torch.device,
                      student_rows: int | None = None) -> Distillation:
    """The teacher, loaded in its own dtype on the training device, and the objective;
    `student_rows` is the student's number of logits, checked against the vocabulary too."""
    from paratransfer.teacher.models import load_model, load_tokenizer

    vocab = check_same_vocabulary(load_tokenizer(teacher_id), student_tokenizer, teacher_id)
    teacher = load_model(teacher_id, dtype=dtype, device=device)
    rows = output_rows(teacher)
    check_logits_cover(vocab, rows, rows if student_rows is None else student_rows, teacher_id)
    return Distillation(teacher, weight, temperature, vocab)
