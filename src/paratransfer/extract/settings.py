"""Every choice of the extraction step; the defaults are the paper's. Each field is declared
once with `setting`: `paratransfer extract`'s flags (and the extraction flags `stability`
shares), the recipe's extraction keys and transfer.json's `settings` come from it. The strategy
names in the help come from their registries (`strategies`, `factorize`), which import torch
only when extraction runs, so `--help` reads them without torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from paratransfer.extract.factorize import DEFAULT_METHOD, FACTORIZERS, svd_help
from paratransfer.extract.strategies import LAYER_SELECTORS, REDUCERS, layers_help, reduce_help
from paratransfer.io.checks import finite_number, seed_number, whole_number
from paratransfer.io.errors import UserError
from paratransfer.io.settings import from_recipe_keys, setting

ALL_MODULES = ("embed", "q", "k", "v", "o", "gate", "up", "down", "head")


@dataclass(frozen=True)
class ExtractSettings:
    """Every choice of the extraction step; defaults are the paper's."""

    rank: int = setting(16, "LoRA rank r (default {default})", recipe=True)
    alpha: float = setting(16.0, "LoRA alpha (default 16; scale alpha/r)", recipe=True)
    layers: str = setting("sensitivity", layers_help, recipe=True)
    reduce: str = setting("window", reduce_help, recipe=True)
    modules: tuple[str, ...] = setting(
        ALL_MODULES, "groups (embed,attn,mlp,head) or roles (q,k,v,o,gate,up,down); default all",
        recipe=True, recipe_default="embed,attn,mlp,head", parse=lambda text: tuple(text.split(",")))
    svd: str = setting(DEFAULT_METHOD, svd_help, recipe=True)
    #: A recipe's `seeds` list drives it, not a key.
    seed: int = setting(0, "seed for the random strategies")
    dropout: float = setting(0.05, "LoRA dropout recorded in the adapter", recipe=True)
    min_vocab_coverage: float = setting(
        0.5, "refuse embed/head when fewer of the student's tokens are found in the teacher's "
        "vocabulary (default {default})", recipe=True)
    allow_pad: bool = setting(False, "zero-pad teacher matrices narrower than the student's "
                              "instead of refusing", recipe=True)

    def __post_init__(self) -> None:
        from paratransfer.arch import parse_roles

        object.__setattr__(self, "rank", whole_number("--rank", self.rank, 1))
        object.__setattr__(self, "seed", seed_number("--seed", self.seed))
        for name in ("alpha", "dropout", "min_vocab_coverage"):
            object.__setattr__(self, name, finite_number(f"--{name.replace('_', '-')}",
                                                         getattr(self, name)))
        if self.alpha <= 0:
            raise UserError(f"--alpha: must be positive (got {self.alpha})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout: must be in [0, 1) (got {self.dropout})")
        if not 0.0 <= self.min_vocab_coverage <= 1.0:
            raise UserError(f"--min-vocab-coverage: must be in [0, 1] "
                            f"(got {self.min_vocab_coverage})")
        object.__setattr__(self, "modules", parse_roles(self.modules))
        if self.layers not in LAYER_SELECTORS:
            raise UserError(f"--layers: unknown strategy {self.layers!r} "
                            f"(expected one of: {', '.join(LAYER_SELECTORS)})")
        if self.reduce not in REDUCERS:
            raise UserError(f"--reduce: unknown strategy {self.reduce!r} "
                            f"(expected one of: {', '.join(REDUCERS)})")
        if self.svd not in FACTORIZERS:
            raise UserError(f"--svd: unknown method {self.svd!r} "
                            f"(expected one of: {', '.join(FACTORIZERS)})")

    def as_dict(self) -> dict:
        return {**asdict(self), "modules": list(self.modules)}

    @classmethod
    def from_recipe(cls, s: dict, seed: int) -> ExtractSettings:
        """From a recipe's (or arm's) settings, named as the flags; `seed` drives `random`."""
        return from_recipe_keys(cls, s, seed=seed, allow_pad=bool(s["allow_pad"]))
