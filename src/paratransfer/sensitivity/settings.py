"""How seed samples become sensitivity (`paratransfer sensitivity`, and extraction when it
computes it). Each field is declared once with `setting`: the `--prompt-format`,
`--max-length` and `--max-samples` flags and the recipe's sensitivity keys come from it.
Standard library only, so `--help` reads it without torch."""

from __future__ import annotations

from dataclasses import dataclass

from paratransfer.io.errors import UserError
from paratransfer.io.settings import from_recipe_keys, setting
from paratransfer.tasks.examples import prompt_formats_help


@dataclass(frozen=True)
class SensitivitySettings:
    """How seed samples become sensitivity; recorded in the file's metadata."""

    prompt_format: str = setting("tulu", prompt_formats_help, recipe=True)
    max_length: int = setting(2048, "truncate samples to this many tokens", recipe=True)
    max_samples: int | None = setting(None, "use at most this many seed samples", recipe=True)

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise UserError(f"--max-length: must be at least 2 (got {self.max_length})")
        if self.max_samples is not None and self.max_samples < 1:
            raise UserError(f"--max-samples: must be at least 1 (got {self.max_samples})")

    @classmethod
    def from_recipe(cls, s: dict) -> SensitivitySettings:
        """From a recipe's settings, named as the flags."""
        return from_recipe_keys(cls, s)
