"""LaTen's settings, with the published defaults (docs/method.md, "LaTen"); one place for them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from paratransfer.io.errors import UserError
from paratransfer.io.settings import from_recipe_keys, setting
from paratransfer.tasks.examples import prompt_formats_help

#: The roles LaTen transfers: rows of up and v, columns of down and o (the published choice).
LATEN_ROLES: tuple[str, ...] = ("up", "down", "v", "o")
#: Roles whose neurons are rows of the `[out, in]` matrix; the others' are columns.
ROW_ROLES = frozenset({"up", "v", "gate", "q", "k"})


def _roles(text: str) -> tuple[str, ...]:
    """`--modules up,down` -> ("up", "down")."""
    return tuple(r.strip() for r in text.split(",") if r.strip())


@dataclass(frozen=True)
class LatenSettings:
    """How LaTen locates, aligns and injects; recorded in `laten.json`.

    Each field is declared once with `setting`: `paratransfer laten`'s flags, the recipe's
    `laten_*` keys and `laten.json`'s `settings` come from it. A recipe's `seeds` list gives
    the seed, and its `prompt_format` and `max_length` (the sensitivity step's keys) the rest."""

    rate: float = setting(0.1, "share of each student module's neurons located (default "
                          "{default})", recipe=True, recipe_name="laten_rate")  # and of the teacher's count
    steps: int = setting(8, "translator training steps (default {default})", recipe=True,
                         recipe_name="laten_steps")  # one locating example each
    batch: int = setting(16, "examples per step, the locating one included (default {default})",
                         recipe=True, recipe_name="laten_batch")  # + batch-1 drawn from the data
    lr: float = setting(3e-5, "peak learning rate, one-cycle schedule (default {default:g})",
                        recipe=True, recipe_name="laten_lr")  # the README's; the script's 3e-4
    weight_decay: float = setting(0.05, "AdamW weight decay", flag=False)
    beta1: float = setting(0.9, "AdamW beta1", flag=False)
    beta2: float = setting(0.95, "AdamW beta2", flag=False)
    warmup: float = setting(0.1, "share of the steps spent rising from lr/25 to lr (one-cycle)",
                            flag=False)
    reg_weight: float = setting(1000.0, "weight of the mean square of what is added (default "
                                "{default:g})")  # mean(Δ²), the size of what the translator adds
    init_std: float = setting(1e-5, "translator weights ~ N(0, init_std)", flag=False)
    roles: tuple[str, ...] = setting(
        LATEN_ROLES, f"roles to transfer, some of {','.join(LATEN_ROLES)} (default all)",
        flag_as="modules", parse=_roles)
    seed: int = setting(42, "seed (default {default})")
    prompt_format: str = setting("tulu", prompt_formats_help)
    max_length: int = setting(1024, "truncate examples to this many tokens (default {default})")

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
        return from_recipe_keys(cls, s, seed=seed, prompt_format=s["prompt_format"],
                                max_length=s["max_length"])

    def record(self) -> dict:
        """The settings as `laten.json` keeps them."""
        out = asdict(self)
        out["roles"] = list(self.roles)
        return out
