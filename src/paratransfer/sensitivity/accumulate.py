"""Task sensitivity of every teacher weight: Σ over seed samples of |θ ⊙ ∇θ L| (docs/method.md §1).

Accumulators are fp32 and filled *during* backward: a post-accumulate-grad hook folds each
parameter's gradient into its accumulator and frees it at once, so peak memory is weights +
accumulators + activations, never weights + all gradients + per-sample copies. Accumulators sit
next to their weights, so a teacher spread over devices (`device_map`) works unchanged.

Across processes (torchrun), each process accumulates over its own share of the samples and
`reduce_sensitivity` sums the accumulators into rank 0 once at the end. Teachers bigger than
memory go through `paratransfer.sensitivity.streamed`, which writes each finished accumulator straight into
the file with `SensitivityWriter`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from paratransfer.io.errors import UserError

FORMAT_VERSION = "1"


def fold(acc: torch.Tensor, param: torch.Tensor) -> None:
    """acc += |θ ⊙ g|, reusing the gradient's storage, then free the gradient (streamed path)."""
    grad = param.grad
    if grad is None:
        return
    grad.mul_(param.detach()).abs_()
    acc.add_(grad)
    param.grad = None


def _fold_abs_grad(acc: torch.Tensor, param: torch.Tensor) -> None:
    """acc += |g| (in the gradient's storage), then free the gradient (in-memory path).

    θ is constant over the seed set, so Σ_s |θ ⊙ g_s| = |θ| ⊙ Σ_s |g_s|: the per-sample work
    is one pass less, and the accumulators are multiplied by |θ| once at the end.
    """
    grad = param.grad
    if grad is None:
        return
    acc.add_(grad.abs_())
    param.grad = None


@contextmanager
def _accumulating(model: torch.nn.Module, accumulators: dict[str, torch.Tensor]) -> Iterator[None]:
    """Hooks folding |g| into the accumulators; on the way in and out, convert them between
    Σ|θ⊙g| (what callers hold) and Σ|g| (what the hooks add to), in place."""
    handles = []
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():  # Σ|θ⊙g| -> Σ|g| (0 where θ = 0, which adds nothing)
            acc = accumulators[name]
            if bool(acc.any()):
                acc.div_(p.detach().abs()).nan_to_num_(0.0, 0.0, 0.0)
    for name, p in params.items():
        p.requires_grad_(True)
        acc = accumulators[name]
        handles.append(p.register_post_accumulate_grad_hook(
            lambda p, acc=acc: _fold_abs_grad(acc, p)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, p in params.items():  # Σ|g| -> |θ| ⊙ Σ|g|, without a temporary
                accumulators[name].mul_(p.detach()).abs_()


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
    from paratransfer.io.console import progress as progress_bar

    accumulators = accumulators if accumulators is not None else new_accumulators(model)
    device = model.get_input_embeddings().weight.device  # the first device of a spread model
    used = 0
    was_training = model.training
    model.eval()
    try:
        with _accumulating(model, accumulators), torch.enable_grad():
            for sample in progress_bar(samples, total=total, desc="sensitivity", unit="sample",
                                       enabled=progress):
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


#: Elements widened to float64 at a time by `sum64`: cache-sized, so no float64 copy of a
#: whole matrix is made (torch's float64-accumulating sum of float32 is ~10x slower, measured).
_SUM_BLOCK = 1 << 18


def sum64(tensor: torch.Tensor) -> float:
    """Σ tensor in float64, widening one cache-sized block at a time."""
    flat = tensor.reshape(-1)
    if flat.dtype == torch.float64:
        return float(flat.sum())
    return sum(float(block.to(torch.float64).sum()) for block in flat.split(_SUM_BLOCK))


def layer_scores(sensitivity: Mapping[str, torch.Tensor] | SensitivityFile, layer_of, num_layers: int) -> list[float]:
    """Summed sensitivity of every parameter inside each decoder layer (docs/method.md §2)."""
    scores = [0.0] * num_layers
    for name in sensitivity.keys():
        layer = layer_of(name)
        if layer is not None and layer < num_layers:
            scores[layer] += sum64(sensitivity[name])
    return scores


def reduce_sensitivity(accumulators: Mapping[str, torch.Tensor], dist, used: int,
                       bucket_elements: int = 1 << 24) -> int:
    """Sum every process's accumulators into rank 0's (in place); returns the total sample count.

    Small tensors travel together in flat buckets of about `bucket_elements` values, large ones
    on their own, so the extra memory is one bucket, not a copy of all accumulators.
    """
    if dist is None or dist.world <= 1:
        return used
    import torch.distributed as td

    bucket: list[torch.Tensor] = []

    def flush() -> None:
        if not bucket:
            return
        if len(bucket) == 1:
            td.reduce(bucket[0], dst=0)
        else:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            td.reduce(flat, dst=0)
            if dist.main:
                offset = 0
                for t in bucket:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()
        bucket.clear()

    size = 0
    for t in accumulators.values():
        if bucket and (size + t.numel() > bucket_elements
                       or t.device != bucket[0].device):
            flush()
            size = 0
        bucket.append(t)
        size += t.numel()
    flush()
    device = next(iter(accumulators.values())).device if accumulators else torch.device("cpu")
    total = torch.tensor([used], dtype=torch.int64, device=device)
    td.all_reduce(total)
    return int(total.item())


def _encode_metadata(metadata: Mapping[str, object]) -> dict[str, str]:
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta["paratransfer_sensitivity"] = FORMAT_VERSION
    return meta


def save_sensitivity(path: str | Path, sensitivity: Mapping[str, torch.Tensor], metadata: Mapping[str, object]) -> None:
    """safetensors with string metadata (teacher, data digest, sample count, prompt format...).

    Written one tensor at a time, so accumulators on GPUs never all sit in host memory at once.
    """
    with SensitivityWriter(path, {k: tuple(v.shape) for k, v in sensitivity.items()}, metadata) as w:
        for name, value in sensitivity.items():
            w.write(name, value)


def _layout(shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, object]
            ) -> tuple[bytes, dict[str, tuple[int, tuple[int, ...]]], int]:
    """The header bytes of a sensitivity file (every name and shape, all fp32, the metadata;
    padded so tensors start 8-byte aligned), each tensor's place, and the data's size."""
    header: dict[str, object] = {"__metadata__": _encode_metadata(metadata)}
    places: dict[str, tuple[int, tuple[int, ...]]] = {}
    offset = 0
    for name, shape in shapes.items():
        nbytes = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        places[name] = (offset, tuple(shape))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8), places, offset


def sensitivity_file_bytes(shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, object]) -> int:
    """The exact size of the sensitivity file `SensitivityWriter` writes for these shapes and
    metadata: header included (for a small model it is a good part of the file)."""
    raw, _, data = _layout(shapes, metadata)
    return 8 + len(raw) + data


class SensitivityWriter:
    """Writes a sensitivity file one tensor at a time, in any order, never holding them all.

    The safetensors header (every name and shape, all fp32, and the metadata) is written first,
    since all of it is known before the work starts; each tensor's bytes then go straight to
    their place in the file. Use as a context manager: leaving it checks every tensor was written.
    """

    def __init__(self, path: str | Path, shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, object]):
        self.path = Path(path)
        raw, self._places, offset = _layout(shapes, metadata)
        self._start = 8 + len(raw)
        self._file = self.path.open("wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._file.truncate(self._start + offset)
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Put one parameter's sensitivity in its place (fp32, on any device)."""
        if name not in self._places:
            raise KeyError(f"{name}: not a tensor of this sensitivity file")
        offset, shape = self._places[name]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: shape {list(tensor.shape)}, expected {list(shape)}")
        data = tensor.detach().to("cpu", torch.float32).contiguous().reshape(-1)
        self._file.seek(self._start + offset)
        self._file.write(memoryview(data.numpy()).cast("B"))
        self._written.add(name)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> SensitivityWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        missing = [n for n in self._places if n not in self._written]
        if exc_type is None and missing:
            raise RuntimeError(f"{self.path}: {len(missing)} tensors never written "
                               f"(e.g. {missing[0]!r})")


class SensitivityFile(Mapping[str, torch.Tensor]):
    """A saved sensitivity file, read lazily: one tensor at a time, as extraction asks.

    Each access opens the file, copies the tensor out and closes it again: a long-lived memory
    mapping would keep every page read so far resident (a 70B teacher's file is 280 GB).
    """

    def __init__(self, path: str | Path):
        from paratransfer.io.readers import safetensors_header

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such sensitivity file")
        safetensors_header(self.path)  # whole, not truncated
        try:
            with safe_open(str(self.path), framework="pt") as f:
                raw = f.metadata() or {}
                self._keys = list(f.keys())
        except Exception as e:  # safetensors raises its own error types
            raise UserError(f"{self.path}: not a safetensors file ({e})") from e
        if raw.get("paratransfer_sensitivity") is None:
            raise UserError(f"{self.path}: not a paratransfer sensitivity file "
                            "(metadata key 'paratransfer_sensitivity' missing)")
        self.metadata: dict[str, object] = {}
        for k, v in raw.items():
            try:
                self.metadata[k] = json.loads(v)
            except json.JSONDecodeError:
                self.metadata[k] = v
        self._known = set(self._keys)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(name)

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
