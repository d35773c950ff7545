"""Layer-streamed sensitivity (`--stream`): Σ|θ⊙∇θL| of a teacher that is never whole in memory.

The teacher is the model transformers builds from its config, on the meta device; its weights
come from the safetensors files (`SafetensorsWeights`, by tensor name), one stage at a time:

forward
    embedding: every seed sample -> the first layer's input (kept);
    layer l = 0 .. L-1: load, run every sample's kept input through it (output kept), free;
    head (final norm + lm_head): each sample's loss, backpropagated into the head's weights
    (|θ⊙g| folded per sample) and into the head's input (kept: the incoming gradient).
backward
    layer l = L-1 .. 0: load; for each sample, recompute the layer from its kept input and
    backpropagate that sample's incoming gradient: that one sample's |θ⊙g| is folded into the
    layer's fp32 accumulators, the gradient at the layer's input is kept for the layer below;
    write the accumulators out, free;
    embedding: the same, then write.

Samples stay separate throughout (a batch of one, as in `accumulate_sensitivity`): sensitivity
is a sum over samples of |θ⊙g_sample|, so every sample's gradient is folded on its own.

The decoder layers are the model's own modules, called with exactly what the model's forward
gives them (rotary cos/sin, masks, position ids): the forward runs with every layer swapped for
a slot that records those inputs, stops at the first layer, or hands back a kept hidden state.
Nothing is family-specific beyond where the layers, embedding and head are (`paratransfer.arch`).

Tied embedding and head (GPT-2): a sample's gradient of that weight is the head's part plus the
embedding's part; the head's part is kept per sample until the embedding stage, where the two
are added before |θ⊙g| is taken. Other weights outside the layers (final norm, position
embeddings) are small and stay loaded throughout.

Kept activations (hidden states, incoming gradients) live in an `ActivationStore`: in memory up
to a budget, beyond it in files. Peak memory is about the largest stage (one layer's weights +
its fp32 accumulators + one gradient, or the same for the embedding/head) + one sample's
activations inside one layer + the kept activations held in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from paratransfer.io.errors import UserError
from paratransfer.sensitivity.accumulate import fold
from paratransfer.sensitivity.activations import ActivationStore, offload_folder
from paratransfer.teacher.streamed import StreamedTeacher, on_grad, zero_accumulators

__all__ = ["ActivationStore", "StreamedTeacher", "offload_folder", "sensitivity_shapes",
           "stream_sensitivity", "streamed_sensitivity"]

#: Called once per parameter with its finished fp32 sensitivity (canonical parameter name).
Sink = Callable[[str, torch.Tensor], None]


def stream_sensitivity(
    weights,
    samples: Sequence[Mapping[str, Sequence[int]]],
    sink: Sink,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    store: ActivationStore | None = None,
    dist=None,
    progress: bool = False,
    teacher: StreamedTeacher | None = None,
) -> int:
    """Σ over samples of |θ⊙∇θL|, one stage of the teacher in memory at a time.

    `weights` is a `SafetensorsWeights`; every finished parameter goes to `sink(name, fp32
    tensor)` (under torch.distributed, summed over the processes first and sunk on rank 0 only).
    Returns the number of samples used (those with at least one answer token to predict).
    The stages: forward through embedding and layers (inputs kept), the head (loss, its
    gradient), backward through the layers last to first, the embedding, the resident weights.
    """
    from paratransfer.io.console import progress as progress_bar

    teacher = teacher or StreamedTeacher(weights, dtype, device)
    device = teacher.device
    own_store = store is None
    store = store or ActivationStore(device=device)
    samples = [s for s in samples if any(v != -100 for v in list(s["labels"])[1:])]
    inputs = [(torch.tensor([list(s["input_ids"])], device=device),
               torch.tensor([list(s["labels"])], device=device)) for s in samples]
    bar = progress_bar(total=2 * teacher.num_layers + 4, desc="sensitivity (streamed)",
                       unit="stage", enabled=progress)
    try:
        run = _Stream(teacher, store, inputs, sink, dist, bar)
        run.forward()
        run.head()
        run.layers_backward()
        run.embedding()
        run.resident_weights()
    finally:
        bar.close()
        if own_store:
            store.close()
    return len(inputs)


class _Stream:
    """The state the stages of one `stream_sensitivity` share: the teacher, the kept
    activations and gradients, the resident weights' sums and where they were used."""

    def __init__(self, teacher: StreamedTeacher, store: ActivationStore, inputs: list, sink: Sink,
                 dist, bar) -> None:
        self.teacher, self.store, self.inputs, self.sink, self.dist, self.bar = (
            teacher, store, inputs, sink, dist, bar)
        self.distributed = dist is not None and dist.world > 1
        self.resident = teacher.load(teacher.resident, requires_grad=True)
        self.resident_acc = zero_accumulators(self.resident)
        self.folded: dict[str, set[str]] = {"head": set(), "embedding": set()}
        self.current = 0  # the sample whose backward runs (for the tied head's part)

    def finish(self, accumulators: Mapping[str, torch.Tensor]) -> None:
        for name, acc in accumulators.items():
            if self.distributed:
                torch.distributed.reduce(acc, dst=0)
            if not self.distributed or self.dist.main:
                self.sink(name, acc)

    def fold_resident(self, stage: str):
        def fn(name: str, p: torch.nn.Parameter) -> None:
            self.folded[stage].add(name)
            fold(self.resident_acc[name], p)
        return fn

    def forward(self) -> None:
        """Embedding, then every layer; each one's input is kept."""
        teacher, store, L = self.teacher, self.store, self.teacher.num_layers
        with torch.no_grad():
            teacher.load([teacher.embed])
            for i, (ids, _) in enumerate(self.inputs):
                store.put(("h", 0, i), teacher.embed_forward(ids))
            teacher.free([teacher.embed])
            self.bar.update()
            for layer in range(L):
                teacher.load(teacher.layer_names[layer])
                for i in range(len(self.inputs)):
                    store.put(("h", layer + 1, i),
                              teacher.layer_forward(layer, store.get(("h", layer, i))))
                teacher.free(teacher.layer_names[layer])
                self.bar.update()

    def head(self) -> None:
        """Loss per sample, the head weights' |θ⊙g|, the incoming gradient of each sample."""
        teacher, store, L = self.teacher, self.store, self.teacher.num_layers
        head = teacher.load([teacher.head], requires_grad=True)
        head_acc = zero_accumulators(head) if not teacher.tied else {}

        def head_grad(name: str, p: torch.nn.Parameter) -> None:
            if teacher.tied:  # the embedding stage adds its part before taking |θ⊙g|
                store.put(("tied", self.current), p.grad)
                p.grad = None
            else:
                fold(head_acc[name], p)

        with torch.enable_grad(), on_grad(head, head_grad), \
                on_grad(self.resident, self.fold_resident("head")):
            for i, (_, labels) in enumerate(self.inputs):
                self.current = i
                hidden = store.pop(("h", L, i)).requires_grad_(True)
                loss = teacher.head_loss(hidden, labels)
                if not math.isfinite(loss.item()):
                    raise UserError(f"sample {i + 1}: the teacher's loss is {loss.item()} "
                                    "(try --dtype float32)")
                loss.backward()
                store.put(("g", i), hidden.grad)
                del hidden, loss  # the graph's nodes would keep the head's weight alive
        self.finish(head_acc)
        teacher.free([teacher.head])
        del head
        head_acc.clear()
        self.bar.update()

    def layers_backward(self) -> None:
        """Backward through the layers, last to first, one sample at a time."""
        teacher, store = self.teacher, self.store
        for layer in reversed(range(teacher.num_layers)):
            params = teacher.load(teacher.layer_names[layer], requires_grad=True)
            accs = zero_accumulators(params)
            with torch.enable_grad(), on_grad(params, lambda n, p, a=accs: fold(a[n], p)):
                for i in range(len(self.inputs)):
                    hidden = store.pop(("h", layer, i)).requires_grad_(True)
                    out = teacher.layer_forward(layer, hidden)
                    torch.autograd.backward(out, store.pop(("g", i)))
                    store.put(("g", i), hidden.grad)
                    del hidden, out
            self.finish(accs)
            teacher.free(teacher.layer_names[layer])
            del params, accs
            self.bar.update()

    def embedding(self) -> None:
        """The embedding (plus the head's part of a tied weight)."""
        teacher, store = self.teacher, self.store
        embed = teacher.load([teacher.embed], requires_grad=True)
        embed_acc = zero_accumulators(embed)

        def embed_grad(name: str, p: torch.nn.Parameter) -> None:
            if teacher.tied:
                p.grad.add_(store.pop(("tied", self.current)))
            fold(embed_acc[name], p)

        with torch.enable_grad(), on_grad(embed, embed_grad), \
                on_grad(self.resident, self.fold_resident("embedding")):
            for i, (ids, _) in enumerate(self.inputs):
                self.current = i
                hidden = teacher.embed_forward(ids)
                torch.autograd.backward(hidden, store.pop(("g", i)))
                del hidden
        self.finish(embed_acc)
        teacher.free([teacher.embed])
        del embed
        embed_acc.clear()
        self.bar.update()

    def resident_weights(self) -> None:
        """The resident weights (in memory for the whole run), once every stage added to them."""
        both = self.folded["head"] & self.folded["embedding"]
        if both:
            raise UserError(f"{sorted(both)[0]}: used both before and after the decoder layers; "
                            "streaming cannot keep its per-sample gradient (use the in-memory path)")
        self.finish(self.resident_acc)
        self.teacher.free(self.teacher.resident)
        self.bar.update()


def streamed_sensitivity(weights, samples, **kwargs) -> tuple[dict[str, torch.Tensor], int]:
    """`stream_sensitivity` collected into a dict (name -> fp32 tensor), as `accumulate_sensitivity`."""
    out: dict[str, torch.Tensor] = {}

    def keep(name: str, tensor: torch.Tensor) -> None:
        out[name] = tensor.detach().to("cpu").clone()

    used = stream_sensitivity(weights, samples, keep, **kwargs)
    return out, used


def sensitivity_shapes(weights) -> dict[str, tuple[int, ...]]:
    """Every canonical parameter name and its shape: the tensors of the sensitivity file."""
    return {n: tuple(weights.shape(n)) for n in dict.fromkeys(weights.canonical_names().values())}
