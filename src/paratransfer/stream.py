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
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from paratransfer.arch import arch_for
from paratransfer.errors import UserError
from paratransfer.sensitivity import _fold

#: Called once per parameter with its finished fp32 sensitivity (canonical parameter name).
Sink = Callable[[str, torch.Tensor], None]


# --------------------------------------------------------------------------- kept activations


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux MemAvailable), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_budget() -> int:
    """In-memory budget for kept activations: a quarter of the available memory (else 2 GiB)."""
    available = available_memory()
    return available // 4 if available else 2 << 30


class ActivationStore:
    """Tensors kept between stages, by key: in memory up to `budget` bytes, beyond it in files.

    Files go to a fresh temporary folder inside `folder` (the system's temporary folder when
    None), removed by `close()`. Tensors are kept on the CPU and come back on `device`.
    """

    def __init__(self, folder: str | Path | None = None, budget: int | None = None,
                 device: torch.device | str = "cpu"):
        self.budget = default_budget() if budget is None else budget
        self.device = torch.device(device)
        self._parent = Path(folder) if folder is not None else None
        self._dir: Path | None = None
        self._memory: dict[tuple, torch.Tensor] = {}
        self._files: dict[tuple, Path] = {}
        self.bytes_in_memory = 0
        self.peak_bytes_in_memory = 0
        self.bytes_written = 0

    def _folder(self) -> Path:
        if self._dir is None:
            if self._parent is not None:
                self._parent.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="paratransfer-activations-",
                                              dir=self._parent))
        return self._dir

    def put(self, key: tuple, tensor: torch.Tensor) -> None:
        from safetensors.torch import save_file

        self.pop(key, missing_ok=True)
        tensor = tensor.detach()
        nbytes = tensor.numel() * tensor.element_size()
        if self.bytes_in_memory + nbytes <= self.budget:
            self._memory[key] = tensor.to("cpu")
            self.bytes_in_memory += nbytes
            self.peak_bytes_in_memory = max(self.peak_bytes_in_memory, self.bytes_in_memory)
            return
        path = self._folder() / ("-".join(str(k) for k in key) + ".safetensors")
        save_file({"t": tensor.to("cpu").contiguous()}, str(path))
        self._files[key] = path
        self.bytes_written += nbytes

    def get(self, key: tuple) -> torch.Tensor:
        from safetensors.torch import load_file

        if key in self._memory:
            return self._memory[key].to(self.device)
        return load_file(str(self._files[key]))["t"].to(self.device)

    def pop(self, key: tuple, missing_ok: bool = False) -> torch.Tensor | None:
        if key in self._memory:
            tensor = self._memory.pop(key)
            self.bytes_in_memory -= tensor.numel() * tensor.element_size()
            return tensor.to(self.device)
        if key in self._files:
            tensor = self.get(key)
            self._files.pop(key).unlink(missing_ok=True)
            return tensor
        if missing_ok:
            return None
        raise KeyError(key)

    def close(self) -> None:
        self._memory.clear()
        self._files.clear()
        self.bytes_in_memory = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- the teacher


class _Stop(Exception):
    """Ends a forward pass once the slots have what they were asked for."""


class _Slot(torch.nn.Module):
    """Stands in the model's layer list for decoder layer `index`; its owner decides what it does.

    Attribute lookups it cannot answer go to the real layer (e.g. a per-layer `attention_type`),
    which is not registered as a submodule, so the model's parameters are those outside layers.
    """

    def __init__(self, index: int, layer: torch.nn.Module, owner: StreamedTeacher):
        super().__init__()
        self.index = index
        self.__dict__["_layer"] = layer
        self.__dict__["_owner"] = owner

    def forward(self, *args, **kwargs):
        return self.__dict__["_owner"]._slot_call(self.index, args, kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.__dict__.get("_layer")
            if layer is None:
                raise
            return getattr(layer, name)


class StreamedTeacher:
    """The teacher's module tree on the meta device, with weights loaded one stage at a time."""

    def __init__(self, weights, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", extras_cache: int = 4):
        from paratransfer.lazy_weights import meta_model

        self.weights = weights
        self.dtype = dtype
        self.device = torch.device(device)
        self.arch = arch_for(weights.config)
        self.model = meta_model(weights.config, dtype)
        model = self.model

        first: dict[int, str] = {}
        self._places: dict[str, list[tuple[torch.nn.Module, str]]] = {}
        self._meta: dict[str, torch.nn.Parameter] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            canon = first.setdefault(id(p), name)
            owner, _, attr = name.rpartition(".")
            self._places.setdefault(canon, []).append((model.get_submodule(owner), attr))
            self._meta[canon] = p
        missing = [n for n in self._meta if n not in weights]
        if missing:
            raise UserError(f"{weights}: has no tensor for parameter {missing[0]!r}")
        self.names = list(self._meta)  # canonical, in named_parameters() order

        container = model.get_submodule(self.arch.layers)
        self.layers = list(container)
        self.num_layers = len(self.layers)
        prefix = self.arch.layers + "."
        self.layer_names: list[list[str]] = [[] for _ in self.layers]
        for name in self.names:
            layer = self.arch.layer_of(name)
            if layer is not None:
                self.layer_names[layer].append(name)
        canon = {n: first[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
        self.embed = canon[self.arch.embed.param_name(self.arch.layers, None)]
        self.head = canon[self.arch.head.param_name(self.arch.layers, None)]
        self.tied = self.head == self.embed
        self.resident = [n for n in self.names if not n.startswith(prefix)
                         and n not in (self.embed, self.head)]
        for i, layer in enumerate(self.layers):
            container[i] = _Slot(i, layer, self)
        for module in model.modules():
            for key, buf in module._buffers.items():
                if buf is not None:
                    if buf.device.type == "meta":
                        raise UserError(f"{weights}: buffer {key!r} of {type(module).__name__} "
                                        "has no value outside the checkpoint; streaming does "
                                        "not support this model")
                    module._buffers[key] = buf.to(self.device)

        self._mode = "idle"
        self._record: list = []
        self._caught: torch.Tensor | None = None
        self._inject: torch.Tensor | None = None
        self._extras: OrderedDict[int, list] = OrderedDict()
        self._extras_cache = extras_cache
        self.loads = 0
        self.max_live_layers = 0

    # ------------------------------------------------------------------ weights

    def load(self, names: Sequence[str], requires_grad: bool = False) -> dict[str, torch.nn.Parameter]:
        """Read these parameters from the files into the model; returns them by name."""
        out = {}
        for name in names:
            meta = self._meta[name]
            tensor = self.weights[name].to(device=self.device, dtype=meta.dtype)
            param = torch.nn.Parameter(tensor, requires_grad=requires_grad)
            for module, attr in self._places[name]:
                module._parameters[attr] = param
            out[name] = param
        self.loads += 1
        self.max_live_layers = max(self.max_live_layers, self.live_layers())
        return out

    def free(self, names: Sequence[str]) -> None:
        """Put the meta placeholders back: the loaded tensors go as soon as nothing holds them."""
        for name in names:
            for module, attr in self._places[name]:
                module._parameters[attr] = self._meta[name]

    def live_layers(self) -> int:
        """How many decoder layers have any weight loaded right now."""
        return sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in self.layers)

    # ------------------------------------------------------------------ passes through the model

    def _slot_call(self, index: int, args: tuple, kwargs: dict):
        if args:
            hidden, rest = args[0], args[1:]
        else:  # hidden states passed by name
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        mode = self._mode
        if mode == "catch":  # the embedding's output, as the first layer receives it
            self._caught = hidden
            raise _Stop
        if mode == "record":  # what every layer receives besides the hidden states
            self._record[index] = (rest, kwargs)
            if index == self.num_layers - 1:
                raise _Stop
            return hidden
        if mode == "inject":  # the last layer's output, handed to the final norm and head
            return self._inject if index == 0 else hidden
        raise RuntimeError(f"decoder layer {index} called outside a streamed pass")

    @contextmanager
    def _pass(self, mode: str) -> Iterator[None]:
        self._mode = mode
        try:
            yield
        finally:
            self._mode = "idle"
            self._caught = self._inject = None

    def _zeros(self, length: int) -> torch.Tensor:
        hidden = self._meta[self.embed].shape[1]
        return torch.zeros(1, length, hidden, dtype=self._meta[self.embed].dtype, device=self.device)

    def layer_inputs(self, length: int) -> list[tuple[tuple, dict]]:
        """Per layer, the (args, kwargs) the model passes besides the hidden states (per length)."""
        if length in self._extras:
            self._extras.move_to_end(length)
            return self._extras[length]
        self._record = [None] * self.num_layers
        with self._pass("record"), torch.no_grad():
            try:
                self.model(inputs_embeds=self._zeros(length), use_cache=False)
            except _Stop:
                pass
        if any(r is None for r in self._record):
            raise UserError(f"{self.arch.family}: the model did not call all its decoder layers")
        self._extras[length] = self._record
        while len(self._extras) > self._extras_cache:
            self._extras.popitem(last=False)
        return self._record

    def embed_forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The first decoder layer's input for `ids` (needs the embedding loaded)."""
        with self._pass("catch"):
            try:
                self.model(input_ids=ids, use_cache=False)
            except _Stop:
                return self._caught
        raise RuntimeError("the model never reached its first decoder layer")

    def layer_forward(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder layer `index` (loaded) on one sample's hidden states."""
        args, kwargs = self.layer_inputs(hidden.shape[1])[index]
        out = self.layers[index](hidden, *args, **kwargs)
        if isinstance(out, tuple):
            raise UserError(f"{type(self.layers[index]).__name__} returns a tuple; streaming needs "
                            "decoder layers that return the hidden states (transformers 5.x)")
        return out

    def head_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss from the last layer's output (needs the head loaded)."""
        with self._pass("inject"):
            self._inject = hidden
            return self.model(inputs_embeds=self._zeros(hidden.shape[1]), labels=labels,
                              use_cache=False).loss


@contextmanager
def _on_grad(params: Mapping[str, torch.nn.Parameter], fn: Callable[[str, torch.nn.Parameter], None]):
    handles = [p.register_post_accumulate_grad_hook(lambda p, n=n: fn(n, p))
               for n, p in params.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _zeros_like(params: Mapping[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}


# --------------------------------------------------------------------------- the algorithm


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
    """
    from tqdm.auto import tqdm

    teacher = teacher or StreamedTeacher(weights, dtype, device)
    device = teacher.device
    own_store = store is None
    store = store or ActivationStore(device=device)
    samples = [s for s in samples if any(v != -100 for v in list(s["labels"])[1:])]
    inputs = [(torch.tensor([list(s["input_ids"])], device=device),
               torch.tensor([list(s["labels"])], device=device)) for s in samples]
    distributed = dist is not None and dist.world > 1

    def finish(accumulators: Mapping[str, torch.Tensor]) -> None:
        for name, acc in accumulators.items():
            if distributed:
                torch.distributed.reduce(acc, dst=0)
            if not distributed or dist.main:
                sink(name, acc)

    L = teacher.num_layers
    bar = tqdm(total=2 * L + 4, desc="sensitivity (streamed)", unit="stage", disable=not progress)
    try:
        resident = teacher.load(teacher.resident, requires_grad=True)
        resident_acc = _zeros_like(resident)
        folded: dict[str, set[str]] = {"head": set(), "embedding": set()}

        def fold_resident(stage: str):
            def fn(name: str, p: torch.nn.Parameter) -> None:
                folded[stage].add(name)
                _fold(resident_acc[name], p)
            return fn

        # ---- forward: embedding, then every layer; each one's input is kept
        with torch.no_grad():
            teacher.load([teacher.embed])
            for i, (ids, _) in enumerate(inputs):
                store.put(("h", 0, i), teacher.embed_forward(ids))
            teacher.free([teacher.embed])
            bar.update()
            for layer in range(L):
                teacher.load(teacher.layer_names[layer])
                for i in range(len(inputs)):
                    store.put(("h", layer + 1, i),
                              teacher.layer_forward(layer, store.get(("h", layer, i))))
                teacher.free(teacher.layer_names[layer])
                bar.update()

        # ---- head: loss per sample, its weights' |θ⊙g|, the incoming gradient of each sample
        current = {"i": 0}
        head = teacher.load([teacher.head], requires_grad=True)
        head_acc = _zeros_like(head) if not teacher.tied else {}

        def head_grad(name: str, p: torch.nn.Parameter) -> None:
            if teacher.tied:  # the embedding stage adds its part before taking |θ⊙g|
                store.put(("tied", current["i"]), p.grad)
                p.grad = None
            else:
                _fold(head_acc[name], p)

        with torch.enable_grad(), _on_grad(head, head_grad), \
                _on_grad(resident, fold_resident("head")):
            for i, (_, labels) in enumerate(inputs):
                current["i"] = i
                hidden = store.pop(("h", L, i)).requires_grad_(True)
                loss = teacher.head_loss(hidden, labels)
                if not math.isfinite(loss.item()):
                    raise UserError(f"sample {i + 1}: the teacher's loss is {loss.item()} "
                                    "(try --dtype float32)")
                loss.backward()
                store.put(("g", i), hidden.grad)
                del hidden, loss  # the graph's nodes would keep the head's weight alive
        finish(head_acc)
        teacher.free([teacher.head])
        del head
        head_acc.clear()
        bar.update()

        # ---- backward through the layers, last to first, one sample at a time
        for layer in reversed(range(L)):
            params = teacher.load(teacher.layer_names[layer], requires_grad=True)
            accs = _zeros_like(params)
            with torch.enable_grad(), _on_grad(params, lambda n, p, a=accs: _fold(a[n], p)):
                for i in range(len(inputs)):
                    hidden = store.pop(("h", layer, i)).requires_grad_(True)
                    out = teacher.layer_forward(layer, hidden)
                    torch.autograd.backward(out, store.pop(("g", i)))
                    store.put(("g", i), hidden.grad)
                    del hidden, out
            finish(accs)
            teacher.free(teacher.layer_names[layer])
            del params, accs
            bar.update()

        # ---- embedding (plus the head's part of a tied weight)
        embed = teacher.load([teacher.embed], requires_grad=True)
        embed_acc = _zeros_like(embed)

        def embed_grad(name: str, p: torch.nn.Parameter) -> None:
            if teacher.tied:
                p.grad.add_(store.pop(("tied", current["i"])))
            _fold(embed_acc[name], p)

        with torch.enable_grad(), _on_grad(embed, embed_grad), \
                _on_grad(resident, fold_resident("embedding")):
            for i, (ids, _) in enumerate(inputs):
                current["i"] = i
                hidden = teacher.embed_forward(ids)
                torch.autograd.backward(hidden, store.pop(("g", i)))
                del hidden
        finish(embed_acc)
        teacher.free([teacher.embed])
        del embed
        embed_acc.clear()
        bar.update()

        both = folded["head"] & folded["embedding"]
        if both:
            raise UserError(f"{sorted(both)[0]}: used both before and after the decoder layers; "
                            "streaming cannot keep its per-sample gradient (use the in-memory path)")
        finish(resident_acc)
        teacher.free(teacher.resident)
        bar.update()
    finally:
        bar.close()
        if own_store:
            store.close()
    return len(inputs)


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


def offload_folder(out: str | Path, offload_dir: str | Path | None) -> Path:
    """Where spilled activations go: `--offload-dir`, else beside the output file."""
    return Path(offload_dir) if offload_dir is not None else Path(os.path.abspath(out)).parent
