"""Task sensitivity of every teacher weight: Σ over seed samples of |θ ⊙ ∇θ L| (METHOD.md §1).

Accumulators are fp32 and filled *during* backward: a post-accumulate-grad hook folds each
parameter's gradient into its accumulator and frees it at once, so peak memory is weights +
accumulators + activations, never weights + all gradients + per-sample copies.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from paratransfer.errors import UserError

FORMAT_VERSION = "1"


def _fold(acc: torch.Tensor, param: torch.Tensor) -> None:
    """acc += |θ ⊙ g|, reusing the gradient's storage, then free the gradient."""
    grad = param.grad
    if grad is None:
        return
    grad.mul_(param.detach()).abs_()
    acc.add_(grad)
    param.grad = None


@contextmanager
def _accumulating(model: torch.nn.Module, accumulators: dict[str, torch.Tensor]) -> Iterator[None]:
    handles = []
    for name, p in model.named_parameters():
        p.requires_grad_(True)
        acc = accumulators[name]
        handles.append(p.register_post_accumulate_grad_hook(lambda p, acc=acc: _fold(acc, p)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def new_accumulators(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """One fp32 zero tensor per parameter, next to its weight."""
    return {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            for n, p in model.named_parameters()}


def accumulate_sensitivity(
    model: torch.nn.Module,
    samples: Iterable[Mapping[str, Sequence[int]]],
    accumulators: dict[str, torch.Tensor] | None = None,
    progress: bool = False,
    total: int | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Add every sample's |θ ⊙ ∇θL| into the accumulators; returns them and the count used.

    Each sample is its own batch of one (`input_ids`, `labels` with -100 outside the answer);
    the model stays in evaluation mode so the result is deterministic.
    """
    from tqdm.auto import tqdm

    accumulators = accumulators if accumulators is not None else new_accumulators(model)
    device = next(model.parameters()).device
    used = 0
    was_training = model.training
    model.eval()
    try:
        with _accumulating(model, accumulators), torch.enable_grad():
            for sample in tqdm(samples, total=total, desc="sensitivity", unit="sample",
                               disable=not progress):
                ids = torch.tensor([list(sample["input_ids"])], device=device)
                labels = torch.tensor([list(sample["labels"])], device=device)
                if not bool((labels[0, 1:] != -100).any()):
                    continue  # nothing to predict (answer truncated away)
                loss = model(input_ids=ids, labels=labels).loss
                if not math.isfinite(loss.item()):
                    raise UserError(f"sample {used + 1}: the teacher's loss is {loss.item()} "
                                    "(try --dtype float32)")
                loss.backward()
                used += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return accumulators, used


def layer_scores(sensitivity: Mapping[str, torch.Tensor] | SensitivityFile, layer_of, num_layers: int) -> list[float]:
    """Summed sensitivity of every parameter inside each decoder layer (METHOD.md §2)."""
    scores = [0.0] * num_layers
    for name in sensitivity.keys():
        layer = layer_of(name)
        if layer is not None and layer < num_layers:
            scores[layer] += float(sensitivity[name].double().sum())
    return scores


def save_sensitivity(path: str | Path, sensitivity: Mapping[str, torch.Tensor], metadata: Mapping[str, object]) -> None:
    """safetensors with string metadata (teacher, data digest, sample count, prompt format...)."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta["paratransfer_sensitivity"] = FORMAT_VERSION
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sensitivity.items()}
    save_file(tensors, str(path), metadata=meta)


class SensitivityFile(Mapping[str, torch.Tensor]):
    """A saved sensitivity file, read lazily: one tensor at a time, as extraction asks."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such sensitivity file")
        try:
            self._file = safe_open(str(self.path), framework="pt")
        except Exception as e:  # safetensors raises its own error types
            raise UserError(f"{self.path}: not a safetensors file ({e})") from e
        raw = self._file.metadata() or {}
        if raw.get("paratransfer_sensitivity") is None:
            raise UserError(f"{self.path}: not a paratransfer sensitivity file "
                            "(metadata key 'paratransfer_sensitivity' missing)")
        self.metadata: dict[str, object] = {}
        for k, v in raw.items():
            try:
                self.metadata[k] = json.loads(v)
            except json.JSONDecodeError:
                self.metadata[k] = v
        self._keys = list(self._file.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._keys:
            raise KeyError(name)
        return self._file.get_tensor(name)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
