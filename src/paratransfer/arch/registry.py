"""The registry of supported families: filled by `families.py` (imported by the package's
`__init__`), read by `arch_for`. It imports no family itself."""

from __future__ import annotations

from paratransfer.arch.spec import ArchSpec
from paratransfer.io.errors import UserError

_REGISTRY: list[ArchSpec] = []


def register(spec: ArchSpec) -> ArchSpec:
    """Add a family; one place to touch when supporting a new one."""
    _REGISTRY.append(spec)
    return spec


def supported_model_types() -> list[str]:
    return sorted(t for s in _REGISTRY for t in s.model_types)


def arch_for(model_or_config: object) -> ArchSpec:
    """The family description for a model (or its config); a clear error when unsupported."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for spec in _REGISTRY:
        if model_type in spec.model_types:
            return spec
    raise UserError(
        f"unsupported architecture: model_type {model_type!r} "
        f"(supported: {', '.join(supported_model_types())})"
    )
