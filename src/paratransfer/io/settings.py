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


def setting(default: Any, help: str | Callable[[], str], *, flag: bool = True, recipe: bool = False,
            recipe_default: Any = dataclasses.MISSING, recipe_name: str | None = None,
            flag_as: str | None = None, parse: Callable[[str], Any] | None = None,
            **cli: Any) -> Any:
    """A settings field. `help` may name `{default}`, and may be a function giving the text
    when the flags are made (help listing a registry's names reads the registry then); `recipe_default` is the recipe key's
    default when it differs from the field's (e.g. a boolean standing for a path);
    `recipe_name` is the recipe key when two steps' fields share a name with different
    meanings (evaluation's `batch_size` is the recipe's `eval_batch_size`); `flag_as` is the
    flag's name when it is not the field's (LaTen's `roles` is `--modules`, as extraction's
    and training's are); `parse` turns the flag's text into the value (default: from the
    field's annotation; a `bool` field is a switch); `cli` goes to `add_argument` (choices,
    metavar)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "flag": flag, "recipe": recipe, "recipe_default": recipe_default,
        "recipe_name": recipe_name, "flag_as": flag_as, "parse": parse, "cli": cli})


def flag_fields(cls, only: tuple[str, ...] | None = None) -> list[dataclasses.Field]:
    """The fields of a settings class that are command-line flags, in declaration order
    (`only`: those of these names, for a command that takes a few of a step's settings)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag")
            and (only is None or f.name in only)]


def flag_name(f: dataclasses.Field) -> str:
    """The flag of a field: `--` and its name with dashes, unless it declares another."""
    return "--" + (f.metadata.get("flag_as") or f.name).replace("_", "-")


def add_setting_flags(p: argparse.ArgumentParser, cls, only: tuple[str, ...] | None = None) -> None:
    """One flag per flag field of `cls` (or of those named in `only`), with the field's
    default, type and help."""
    for f in flag_fields(cls, only):
        meta = f.metadata
        text = (meta["help"]() if callable(meta["help"]) else meta["help"]).format(
            default=f.default)
        if str(f.type) == "bool" and meta["parse"] is None:
            p.add_argument(flag_name(f), action="store_true", dest=f.name, help=text,
                           **meta["cli"])
            continue
        kind = meta["parse"] or _TYPES[str(f.type).split(" |")[0]]
        cli = meta["cli"]
        if meta.get("flag_as"):  # shown as the flag's name, not the field's
            cli = {"metavar": meta["flag_as"].upper(), **cli}
        p.add_argument(flag_name(f), type=kind, default=f.default, dest=f.name, help=text, **cli)


def from_args(cls, args: argparse.Namespace, only: tuple[str, ...] | None = None, **more: Any):
    """The settings the parsed flags of `cls` give (plus `more`, for fields without a flag)."""
    return cls(**{f.name: getattr(args, f.name) for f in flag_fields(cls, only)
                  if f.name not in more}, **more)


def recipe_keys(cls) -> dict[str, Any]:
    """The recipe keys of a settings class -> their defaults, in declaration order."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("recipe"):
            default = f.metadata["recipe_default"]
            out[recipe_name(f)] = f.default if default is dataclasses.MISSING else default
    return out


def recipe_name(f: dataclasses.Field) -> str:
    """The recipe key of a field: its name, unless it declares another."""
    return f.metadata.get("recipe_name") or f.name


def from_recipe_keys(cls, s: dict[str, Any], **more: Any):
    """The settings a recipe's (or arm's) keys give for the recipe fields of `cls`, plus `more`
    (fields a recipe sets another way, e.g. the seed from the `seeds` list)."""
    return cls(**{f.name: s[recipe_name(f)] for f in dataclasses.fields(cls)
                  if f.metadata.get("recipe") and f.name not in more}, **more)
