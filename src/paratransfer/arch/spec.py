"""Architecture adapters: a declarative description of where each role's matrix lives.

A *role* is one of q, k, v, o (attention), gate, up, down (MLP), embed and head. A
*module* is one weight matrix of the model that PEFT can wrap with LoRA; a fused module
(GPT-2's `c_attn`) holds several roles stacked along its output rows.

Matrices are always handled in `nn.Linear` orientation `[out, in]`: Conv1D weights (stored
`[in, out]`) are transposed, and the token embedding `[vocab, d]` is handled as `[d, vocab]`,
matching PEFT's `lora_embedding_B @ lora_embedding_A`. Sizes come from the weights and the
model's config, never from a table of model sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from paratransfer.errors import UserError

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


def equal_split(config: object, shape: tuple[int, int], parts: int) -> tuple[int, ...]:
    """Rows split into equal parts (GPT-2 `c_attn`: q | k | v, each `n_embd`)."""
    if shape[0] % parts:
        raise UserError(f"fused matrix of shape {list(shape)} does not split into {parts} parts")
    return (shape[0] // parts,) * parts


@dataclass(frozen=True)
class ArchSpec:
    """Where a model family keeps its decoder layers and each role's matrix."""

    family: str
    model_types: tuple[str, ...]
    layers: str
    embed: ModuleSpec
    head: ModuleSpec
    layer_modules: tuple[ModuleSpec, ...]
    fused_sizes: dict[str, SizeRule] = field(default_factory=dict)

    def modules(self) -> tuple[ModuleSpec, ...]:
        """Every module spec: embed, the per-layer ones, head."""
        return (self.embed, *self.layer_modules, self.head)

    def modules_for(self, roles: Iterable[str]) -> list[ModuleSpec]:
        """The module specs that hold at least one of `roles`, in model order."""
        wanted = set(roles)
        return [m for m in self.modules() if wanted.intersection(m.roles)]

    def roles(self) -> set[str]:
        return {r for m in self.modules() for r in m.roles}

    def role_rows(self, module: ModuleSpec, config: object, shape: tuple[int, int]) -> dict[str, tuple[int, int]]:
        """Each role's `(first row, row count)` inside the module's `[out, in]` matrix."""
        if not module.fused:
            return {module.roles[0]: (0, shape[0])}
        rule = self.fused_sizes.get(module.path)
        sizes = rule(config, shape) if rule else equal_split(config, shape, len(module.roles))
        out, start = {}, 0
        for role, size in zip(module.roles, sizes, strict=True):
            out[role] = (start, size)
            start += size
        return out

    def num_layers(self, model: torch.nn.Module) -> int:
        return len(model.get_submodule(self.layers))

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


_REGISTRY: list[ArchSpec] = []


def register(spec: ArchSpec) -> ArchSpec:
    """Add a family; one place to touch when supporting a new one."""
    _REGISTRY.append(spec)
    return spec


def supported_model_types() -> list[str]:
    return sorted(t for s in _REGISTRY for t in s.model_types)


def arch_for(model_or_config: object) -> ArchSpec:
    """The family description for a model (or its config); a clear error when unsupported."""
    from paratransfer.arch import families  # noqa: F401  (registers the families)

    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for spec in _REGISTRY:
        if model_type in spec.model_types:
            return spec
    raise UserError(
        f"unsupported architecture: model_type {model_type!r} "
        f"(supported: {', '.join(supported_model_types())})"
    )
