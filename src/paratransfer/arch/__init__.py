"""Where each role lives in each supported model family.

`spec.py` describes a family, `families.py` declares the supported ones (each registers itself
in `registry.py` when imported — here, once), `registry.py` answers `arch_for`.
"""

from paratransfer.arch import families  # noqa: F401  (fills the registry)
from paratransfer.arch.registry import arch_for, supported_model_types
from paratransfer.arch.spec import (
    ROLE_GROUPS,
    ROLES,
    ArchSpec,
    FusedLayout,
    HeadLayout,
    ModuleSpec,
    parse_roles,
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
