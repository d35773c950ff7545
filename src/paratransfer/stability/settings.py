"""What `paratransfer stability` draws: seed-set sizes, draws per size, their seed, and which
extraction choices it can measure. Standard library only, so the command line's help reads the
defaults without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from paratransfer.extract.strategies import REDUCERS
from paratransfer.io.checks import seed_number, whole_number
from paratransfer.io.errors import UserError
from paratransfer.io.settings import from_recipe_keys, recipe_keys, setting

#: Seed-set sizes drawn when none are given (those below the pool size).
DEFAULT_SIZES = (8, 16, 32, 64)
DEFAULT_DRAWS = 20
#: Reductions whose choice is a window, so that window IoU is defined (the registry says which).
WINDOW_REDUCTIONS = tuple(name for name, r in REDUCERS.items() if r.window)


def parse_sizes(text: str | None) -> tuple[int, ...] | None:
    """`"8,16,32"` -> (8, 16, 32); None stays None (the defaults)."""
    if text is None:
        return None
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise UserError(f"--sizes: expected comma-separated whole numbers (got {text!r})") from None


@dataclass(frozen=True)
class StabilitySettings:
    """Which seed-set sizes to draw, how many draws per size, and the seed of the draws. Each
    field is declared once: `paratransfer stability`'s flags and the recipe's `stability:`
    keys come from it."""

    sizes: tuple[int, ...] | None = setting(
        None, "seed-set sizes to draw, comma-separated (default: "
        f"{','.join(map(str, DEFAULT_SIZES))}, those below the pool size)", recipe=True,
        parse=str)  # None: DEFAULT_SIZES below the pool size; text from the flag is parsed below
    draws: int = setting(DEFAULT_DRAWS, "random subsets per size (default {default})",
                         recipe=True)
    seed: int = setting(0, "seed of the random subsets (default {default})", recipe=True)

    def __post_init__(self) -> None:
        if isinstance(self.sizes, str):  # `--sizes 8,16`: its error is a one-line UserError
            object.__setattr__(self, "sizes", parse_sizes(self.sizes))
        object.__setattr__(self, "draws", whole_number("--draws", self.draws, 1))
        object.__setattr__(self, "seed", seed_number("--seed", self.seed))
        if self.sizes is not None:
            sizes = tuple(whole_number("--sizes", k, 1) for k in self.sizes)
            if not sizes:
                raise UserError("--sizes: expected at least one seed-set size")
            if len(set(sizes)) != len(sizes):
                raise UserError(f"--sizes: a size is repeated ({', '.join(map(str, sizes))})")
            object.__setattr__(self, "sizes", tuple(sorted(sizes)))

    def sizes_for(self, pool: int) -> tuple[int, ...]:
        """The sizes to draw from a pool of `pool` usable samples (UserError if one is larger)."""
        if self.sizes is None:
            return tuple(k for k in DEFAULT_SIZES if k < pool) or (max(1, pool // 2),)
        if self.sizes[-1] > pool:
            raise UserError(f"--sizes: {self.sizes[-1]} is larger than the pool ({pool} seed "
                            "samples with an answer to score)")
        return self.sizes

    @classmethod
    def from_recipe(cls, raw: Any) -> StabilitySettings:
        """From a recipe's `stability: {sizes: [...], draws: N, seed: S}` mapping."""
        if not isinstance(raw, dict):
            raise UserError("stability: expected a mapping with sizes and draws (and seed)")
        unknown = sorted(set(raw) - set(RECIPE_KEYS))
        if unknown:
            raise UserError(f"stability.{unknown[0]}: unknown key (expected one of: "
                            f"{', '.join(RECIPE_KEYS)})")
        sizes = raw.get("sizes")
        if sizes is not None and not isinstance(sizes, list):
            raise UserError(f"stability.sizes: expected a list of seed-set sizes (got {sizes!r})")
        try:
            return from_recipe_keys(cls, {**recipe_keys(cls), **raw},
                                    sizes=tuple(sizes) if sizes is not None else None)
        except UserError as e:
            raise UserError(f"stability: {e}") from None


#: The keys of a recipe's `stability:` mapping.
RECIPE_KEYS = tuple(recipe_keys(StabilitySettings))


def check_extract_settings(settings) -> None:
    """Stability is about the method's own choices: sensitivity layers and a window."""
    if settings.layers != "sensitivity":
        raise UserError(f"stability: layers must be 'sensitivity' (got {settings.layers!r}): "
                        "the other layer strategies do not depend on the seed set")
    if settings.reduce not in WINDOW_REDUCTIONS:
        raise UserError(f"stability: reduce must be one of {', '.join(WINDOW_REDUCTIONS)} "
                        f"(got {settings.reduce!r}): window IoU needs a window")
