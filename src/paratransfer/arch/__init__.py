"""Where each role lives in each supported model family (see `families.py`)."""

from paratransfer.arch.spec import (
    ROLE_GROUPS,
    ROLES,
    ArchSpec,
    ModuleSpec,
    arch_for,
    parse_roles,
    supported_model_types,
)

__all__ = [
    "ROLES",
    "ROLE_GROUPS",
    "ArchSpec",
    "ModuleSpec",
    "arch_for",
    "parse_roles",
    "supported_model_types",
]
