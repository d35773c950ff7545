"""Held-out loss during training: the answer-only loss on a fixed set of examples, every K steps.

An initialization's effect shows first in how fast the loss on examples it never trains on
falls; this records that curve (step 0, every `eval_every` steps, and the last step) in
train.json. The model is scored in eval mode without gradients, so it draws nothing from the
random stream: a run with held-out scoring trains exactly as the same run without it.
"""

from __future__ import annotations

import torch

from paratransfer.io.distributed import sum_across_processes
from paratransfer.train.batches import answer_loss_sum, collate, micro_batches
from paratransfer.train.state import Run


def heldout_loss(run: Run) -> float:
    """Mean answer-token loss over the held-out examples (every process scores its share)."""
    examples = run.heldout
    was_training = run.model.training
    run.model.eval()
    loss_sum = torch.zeros((), device=run.device, dtype=torch.float64)
    tokens = torch.zeros((), device=run.device, dtype=torch.float64)
    indices = list(range(len(examples)))
    with torch.no_grad():
        for mb in micro_batches(indices, run.settings.micro_batch_size, run.dist.rank,
                                run.dist.world):
            batch = {k: v.to(run.device) for k, v in collate(examples, mb, run.pad_id).items()}
            logits = run.model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
            loss_sum += answer_loss_sum(logits, batch["labels"]).double()
            tokens += sum(examples[i].answer_tokens for i in mb)
    sum_across_processes([loss_sum, tokens], run.dist)
    if was_training:
        run.model.train()
    return float(loss_sum / tokens)


def due(run: Run, done: int, end: int) -> bool:
    """Whether the held-out loss is recorded after `done` steps: at 0, every K, and the last."""
    every = run.settings.eval_every
    return bool(run.heldout) and every is not None and (done % every == 0 or done == end)


def record(run: Run, done: int) -> None:
    """Score the held-out set now and append it to the run's held-out curve."""
    run.heldout_history.append({"step": done, "loss": heldout_loss(run)})
