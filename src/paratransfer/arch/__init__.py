"""Where each role lives in each supported model family (see `families.py`)."""

from paratransfer.arch.spec import (
    ROLE_GROUPS,
    ROLES,
    ArchSpec,
    FusedLayout,
    HeadLayout,
    ModuleSpec,
    arch_for,
    parse_roles,
    supported_model_types,
)

__all__ = [
    "ROLES",
    "ROLE_GROUPS",
    "ArchSpec",
    "FusedLayout",
    "HeadLayout",
    "ModuleSpec",
    "arch_for",
    "parse_roles",
    "supported_model_types",
]
