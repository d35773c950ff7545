"""Which examples each step trains on, and how they become tensors.

The examples of epoch e come in the order `randperm(n, Generator(seed, e))`, a function of the
seed and the data size only: every arm sees the same batches in the same order. Under data
parallelism each process takes every world-th example of an effective batch.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from paratransfer.io.errors import UserError


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the n examples in one epoch: depends on (seed, epoch, n) only."""
    return _epoch_order(n, seed, epoch)


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(mix_seed(seed, epoch))
    return torch.randperm(n, generator=g).tolist()


def mix_seed(*parts: int) -> int:
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


@dataclass(frozen=True)
class Example:
    """One tokenized training example."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    answer_tokens: int  # labels that count after the causal shift


def load_examples(path: str | Path, tokenizer, prompt_format: str,
                  max_length: int) -> tuple[list[Example], int]:
    """Tokenize the training file; examples whose answer was cut off are dropped (counted)."""
    from paratransfer.tasks.examples import IGNORE_INDEX, load_tokenized

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
    from paratransfer.tasks.examples import IGNORE_INDEX

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
    from paratransfer.tasks.examples import IGNORE_INDEX

    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                           labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
