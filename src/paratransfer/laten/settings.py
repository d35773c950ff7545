"""LaTen's settings, with the published defaults (docs/method.md, "LaTen"); one place for them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from paratransfer.io.errors import UserError

#: The roles LaTen transfers: rows of up and v, columns of down and o (the published choice).
LATEN_ROLES: tuple[str, ...] = ("up", "down", "v", "o")
#: Roles whose neurons are rows of the `[out, in]` matrix; the others' are columns.
ROW_ROLES = frozenset({"up", "v", "gate", "q", "k"})


@dataclass(frozen=True)
class LatenSettings:
    """How LaTen locates, aligns and injects; recorded in `laten.json`."""

    rate: float = 0.1  # share of each student module's neurons located (and of the teacher's count)
    steps: int = 8  # translator optimizer steps, one locating example each
    batch: int = 16  # examples per step: the locating example + batch-1 drawn from the data
    lr: float = 3e-5  # peak learning rate (the README's; the shell script passes 3e-4)
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    warmup: float = 0.1  # share of the steps spent rising from lr/25 to lr (one-cycle)
    reg_weight: float = 1000.0  # weight of mean(Δ²), the size of what the translator adds
    init_std: float = 1e-5  # translator weights ~ N(0, init_std)
    roles: tuple[str, ...] = LATEN_ROLES
    seed: int = 42
    prompt_format: str = "tulu"
    max_length: int = 1024

    def __post_init__(self) -> None:
        if not (isinstance(self.rate, (int, float)) and 0.0 < self.rate <= 1.0):
            raise UserError(f"--rate: must be in (0, 1] (got {self.rate})")
        for name in ("steps", "batch", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"--{name.replace('_', '-')}: must be a whole number of at least "
                                f"1 (got {value!r})")
        for name in ("lr", "init_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"--{name.replace('_', '-')}: must be a positive finite number "
                                f"(got {value})")
        for name in ("weight_decay", "reg_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"--{name.replace('_', '-')}: must be finite and not negative "
                                f"(got {value})")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise UserError(f"AdamW betas must be in [0, 1) (got {self.beta1}, {self.beta2})")
        if not 0.0 <= self.warmup < 1.0:
            raise UserError(f"--warmup: must be in [0, 1) (got {self.warmup})")
        unknown = [r for r in self.roles if r not in LATEN_ROLES]
        if unknown or not self.roles:
            raise UserError(f"--modules: LaTen transfers some of {','.join(LATEN_ROLES)} "
                            f"(got {','.join(self.roles) or 'none'})")

    @classmethod
    def from_recipe(cls, s: dict, seed: int) -> LatenSettings:
        """From a recipe's (or arm's) settings: `laten_*` keys, the recipe's prompt format and
        truncation, the run's seed."""
        return cls(rate=s["laten_rate"], steps=s["laten_steps"], batch=s["laten_batch"],
                   lr=s["laten_lr"], seed=seed, prompt_format=s["prompt_format"],
                   max_length=s["max_length"])

    def record(self) -> dict:
        """The settings as `laten.json` keeps them."""
        out = asdict(self)
        out["roles"] = list(self.roles)
        return out
