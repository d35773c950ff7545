"""The teacher as streamed sensitivity sees it: its module tree on the meta device, the weights of
one stage (a decoder layer, the embedding, the head) loaded at a time from its safetensors files.

The decoder layers are the model's own modules, called with exactly what the model's forward
gives them (rotary cos/sin, masks, position ids): the forward runs with every layer swapped for
a slot that records those inputs, stops at the first layer, or hands back a kept hidden state.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from paratransfer.arch import arch_for
from paratransfer.io.errors import UserError


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
        from paratransfer.teacher.lazy import meta_model

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
def on_grad(params: Mapping[str, torch.nn.Parameter], fn: Callable[[str, torch.nn.Parameter], None]):
    handles = [p.register_post_accumulate_grad_hook(lambda p, n=n: fn(n, p))
               for n, p in params.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def zero_accumulators(params: Mapping[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
