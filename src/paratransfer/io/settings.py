"""A step setting declared once: a dataclass field carrying its default, its help, whether it
is a command-line flag and whether it is a recipe key. The CLI flags (`cli.options`), the
recipe's step keys (`experiment.recipe.STEP_KEYS`) and the recorded settings (`as_dict`) are
all derived from these fields, so a new setting is one declaration."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str}


def setting(default: Any, help: str, *, flag: bool = True, recipe: bool = False,
            recipe_default: Any = dataclasses.MISSING, parse: Callable[[str], Any] | None = None,
            **cli: Any) -> Any:
    """A settings field. `help` may name `{default}`; `recipe_default` is the recipe key's
    default when it differs from the field's (e.g. a boolean standing for a path); `parse`
    turns the flag's text into the value (default: from the field's annotation); `cli` goes
    to `add_argument` (choices, metavar)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "flag": flag, "recipe": recipe, "recipe_default": recipe_default,
        "parse": parse, "cli": cli})


def flag_fields(cls) -> list[dataclasses.Field]:
    """The fields of a settings class that are command-line flags, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag")]


def flag_name(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def add_setting_flags(p: argparse.ArgumentParser, cls) -> None:
    """One flag per flag field of `cls`, with the field's default, type and help."""
    for f in flag_fields(cls):
        meta = f.metadata
        kind = meta["parse"] or _TYPES[str(f.type).split(" |")[0]]
        p.add_argument(flag_name(f), type=kind, default=f.default,
                       help=meta["help"].format(default=f.default), **meta["cli"])


def from_args(cls, args: argparse.Namespace, **more: Any):
    """The settings the parsed flags of `cls` give (plus `more`, for fields without a flag)."""
    return cls(**{f.name: getattr(args, f.name) for f in flag_fields(cls)}, **more)


def recipe_keys(cls) -> dict[str, Any]:
    """The recipe keys of a settings class -> their defaults, in declaration order."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("recipe"):
            default = f.metadata["recipe_default"]
            out[f.name] = f.default if default is dataclasses.MISSING else default
    return out
