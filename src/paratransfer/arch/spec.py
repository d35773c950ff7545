"""Architecture adapters: a declarative description of where each role's matrix lives.

A *role* is one of q, k, v, o (attention), gate, up, down (MLP), embed and head. A
*module* is one weight matrix of the model that PEFT can wrap with LoRA; a fused module
(GPT-2's `c_attn`, Phi-3's `qkv_proj`) holds several roles along its output rows, stacked or
interleaved as its `FusedLayout` says. Roles, not names, connect two families: a teacher role
is split out of whatever matrix holds it and fused into wherever the student keeps it.

Matrices are always handled in `nn.Linear` orientation `[out, in]`: Conv1D weights (stored
`[in, out]`) are transposed, and the token embedding `[vocab, d]` is handled as `[d, vocab]`,
matching PEFT's `lora_embedding_B @ lora_embedding_A`. Sizes come from the weights and the
model's config, never from a table of model sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from paratransfer.io.errors import UserError

ROLES: tuple[str, ...] = ("embed", "q", "k", "v", "o", "gate", "up", "down", "head")
ROLE_GROUPS: dict[str, tuple[str, ...]] = {
    "embed": ("embed",),
    "attn": ("q", "k", "v", "o"),
    "mlp": ("gate", "up", "down"),
    "head": ("head",),
}


def parse_roles(spec: str | Iterable[str]) -> tuple[str, ...]:
    """`"embed,attn,mlp,head"` or roles like `"q,v"` -> the roles, in canonical order."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    roles: set[str] = set()
    for item in (i.strip() for i in items):
        if not item:
            continue
        if item in ROLE_GROUPS:
            roles.update(ROLE_GROUPS[item])
        elif item in ROLES:
            roles.add(item)
        else:
            known = ", ".join([*ROLE_GROUPS, *[r for r in ROLES if r not in ROLE_GROUPS]])
            raise UserError(f"--modules: unknown module {item!r} (expected some of: {known})")
    if not roles:
        raise UserError("--modules: no module named (expected e.g. embed,attn,mlp,head)")
    return tuple(r for r in ROLES if r in roles)


@dataclass(frozen=True)
class ModuleSpec:
    """One LoRA-wrappable matrix: its path and the roles stacked along its output rows."""

    path: str  # relative to a decoder layer, or absolute for embed/head
    roles: tuple[str, ...]
    conv1d: bool = False  # weight stored [in, out] (GPT-2 Conv1D)
    embedding: bool = False
    in_layer: bool = True

    @property
    def fused(self) -> bool:
        return len(self.roles) > 1

    def param_name(self, layers_path: str, layer: int | None) -> str:
        """The weight's parameter name in the model's state dict."""
        if self.in_layer:
            return f"{layers_path}.{layer}.{self.path}.weight"
        return f"{self.path}.weight"

    def module_name(self, layers_path: str, layer: int | None) -> str:
        """The module's name as `named_modules()` gives it (what PEFT wraps)."""
        return self.param_name(layers_path, layer)[: -len(".weight")]

    def to_linear(self, weight: torch.Tensor) -> torch.Tensor:
        """The stored weight (or a tensor of its shape) in `[out, in]` orientation (a view)."""
        return weight.t() if (self.conv1d or self.embedding) else weight

    def from_linear(self, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_linear`: back to the stored orientation (a view)."""
        return matrix.t() if (self.conv1d or self.embedding) else matrix


#: Computes the output-row sizes of a fused module's roles from the model config and the
#: module's `[out, in]` shape.
SizeRule = Callable[[object, tuple[int, int]], tuple[int, ...]]
#: (config, `[out, in]` matrix, role row sizes) -> one `[size, in]` matrix per role, in role order.
SplitFn = Callable[[object, torch.Tensor, tuple[int, ...]], list[torch.Tensor]]
#: (config, one `[size, in]` matrix per role) -> the fused `[out, in]` matrix; inverse of SplitFn.
FuseFn = Callable[[object, Sequence[torch.Tensor]], torch.Tensor]


def equal_split(config: object, shape: tuple[int, int], parts: int) -> tuple[int, ...]:
    """Rows split into equal parts (GPT-2 `c_attn`: q | k | v, each `n_embd`)."""
    if shape[0] % parts:
        raise UserError(f"fused matrix of shape {list(shape)} does not split into {parts} parts")
    return (shape[0] // parts,) * parts


def split_stacked(config: object, matrix: torch.Tensor, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    """Roles one after another along the rows ([q | k | v]): views of the matrix."""
    return list(matrix.split(list(sizes), dim=0))


def fuse_stacked(config: object, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of `split_stacked`."""
    return torch.cat(list(parts), dim=0)


@dataclass(frozen=True)
class FusedLayout:
    """How a fused module's roles share its output rows; `split` and `fuse` are inverses.

    `sizes` gives each role's row count (None: equal parts); `contiguous` says whether each
    role's rows form one range (stacked) so that `ArchSpec.role_rows` can name them.
    """

    sizes: SizeRule | None = None
    split: SplitFn = split_stacked
    fuse: FuseFn = fuse_stacked
    contiguous: bool = True


STACKED = FusedLayout()


@dataclass(frozen=True)
class HeadLayout:
    """Attention heads of a model: query heads, key/value heads (grouped-query), head width."""

    heads: int
    kv_heads: int
    head_dim: int


def config_heads(config: object) -> HeadLayout:
    """Head counts from a Hugging Face config (the common attribute names, GPT-2's mapped)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(config.num_attention_heads)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return HeadLayout(heads, int(kv_heads), int(head_dim))


@dataclass(frozen=True)
class ArchSpec:
    """Where a model family keeps its decoder layers and each role's matrix."""

    family: str
    model_types: tuple[str, ...]
    layers: str
    embed: ModuleSpec
    head: ModuleSpec
    layer_modules: tuple[ModuleSpec, ...]
    fused: dict[str, FusedLayout] = field(default_factory=dict)  # by path; default STACKED
    head_layout: Callable[[object], HeadLayout] = config_heads
    final_norm: str = ""  # the norm between the last layer and the head ("" when unknown)
    #: Norms a layer applies to its attention and MLP outputs before adding them to the stream
    #: (paths inside a layer), or None when the outputs are added as they are (pre-norm only).
    post_norms: Callable[[object], tuple[str, str] | None] = lambda config: None

    def modules(self) -> tuple[ModuleSpec, ...]:
        """Every module spec: embed, the per-layer ones, head."""
        return (self.embed, *self.layer_modules, self.head)

    def modules_for(self, roles: Iterable[str]) -> list[ModuleSpec]:
        """The module specs that hold at least one of `roles`, in model order."""
        wanted = set(roles)
        return [m for m in self.modules() if wanted.intersection(m.roles)]

    def roles(self) -> set[str]:
        return {r for m in self.modules() for r in m.roles}

    def module_for(self, role: str) -> ModuleSpec | None:
        """The module that holds `role` (None when the family has no such role)."""
        return next((m for m in self.modules() if role in m.roles), None)

    def layout(self, module: ModuleSpec) -> FusedLayout:
        return self.fused.get(module.path, STACKED)

    def role_sizes(self, module: ModuleSpec, config: object, shape: tuple[int, int]) -> dict[str, int]:
        """Each role's row count inside the module's `[out, in]` matrix."""
        if not module.fused:
            return {module.roles[0]: shape[0]}
        rule = self.layout(module).sizes
        sizes = rule(config, shape) if rule else equal_split(config, shape, len(module.roles))
        if sum(sizes) != shape[0]:
            raise UserError(f"{module.path}: the config gives role sizes {list(sizes)}, but the "
                            f"matrix has {shape[0]} rows")
        return dict(zip(module.roles, sizes, strict=True))

    def role_rows(self, module: ModuleSpec, config: object, shape: tuple[int, int]) -> dict[str, tuple[int, int]]:
        """Each role's `(first row, row count)` inside the module's `[out, in]` matrix.

        Only for layouts whose roles are row ranges; use `split` for any layout.
        """
        if module.fused and not self.layout(module).contiguous:
            raise ValueError(f"{module.path}: roles are interleaved, not row ranges (use split)")
        out, start = {}, 0
        for role, size in self.role_sizes(module, config, shape).items():
            out[role] = (start, size)
            start += size
        return out

    def split(self, module: ModuleSpec, config: object, matrix: torch.Tensor) -> dict[str, torch.Tensor]:
        """A module's `[out, in]` matrix (or its sensitivity) -> each role's `[rows, in]` part."""
        if not module.fused:
            return {module.roles[0]: matrix}
        sizes = tuple(self.role_sizes(module, config, tuple(matrix.shape)).values())
        parts = self.layout(module).split(config, matrix, sizes)
        return dict(zip(module.roles, parts, strict=True))

    def fuse(self, module: ModuleSpec, config: object, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of `split`: each role's part -> the module's `[out, in]` matrix."""
        if not module.fused:
            return parts[module.roles[0]]
        return self.layout(module).fuse(config, [parts[r] for r in module.roles])

    def heads(self, config: object) -> HeadLayout:
        """Query heads, key/value heads and head width, from the config."""
        return self.head_layout(config)

    def num_layers(self, model: torch.nn.Module) -> int:
        return len(model.get_submodule(self.layers))

    def count_layers(self, names: Iterable[str]) -> int:
        """The decoder-layer count implied by parameter names (no module needed)."""
        return 1 + max((i for i in map(self.layer_of, names) if i is not None), default=-1)

    def layer_of(self, param_name: str) -> int | None:
        """The decoder-layer index a parameter name lies in, or None."""
        prefix = self.layers + "."
        if not param_name.startswith(prefix):
            return None
        head = param_name[len(prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def peft_targets(self, modules: Iterable[ModuleSpec]) -> list[str]:
        """Names for `LoraConfig(target_modules=...)`: suffixes matching exactly these modules."""
        return [m.path for m in modules]
