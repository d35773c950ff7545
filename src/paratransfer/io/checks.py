"""Validation of numbers given as flags or recipe keys, with one-line messages naming the flag.

A value that would be silently changed (4.7 as a rank) or that poisons every later step (NaN,
infinity) is refused where it enters, before any work.
"""

from __future__ import annotations

import math
from typing import Any

from paratransfer.io.errors import UserError


def whole_number(flag: str, value: Any, least: int | None = None) -> int:
    """`value` as an int: an int, or a float with no fractional part; else a UserError."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{flag}: expected a whole number (got {value!r})")
    if least is not None and value < least:
        raise UserError(f"{flag}: must be at least {least} (got {value})")
    return value


#: The largest seed torch's and NumPy's generators take (a signed 64-bit integer).
MAX_SEED = 2**63 - 1


def seed_number(flag: str, value: Any) -> int:
    """A seed as generators take it: a whole number in 0..2**63-1 (torch's `manual_seed` fails
    past it with "Overflow when unpacking long long", after work has been done)."""
    value = whole_number(flag, value)
    if not 0 <= value <= MAX_SEED:
        raise UserError(f"{flag}: must be between 0 and 2**63-1 = {MAX_SEED} (got {value})")
    return value


def finite_number(flag: str, value: Any) -> float:
    """`value` as a finite float; NaN, infinity and non-numbers are a UserError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{flag}: expected a number (got {value!r})")
    if not math.isfinite(value):
        raise UserError(f"{flag}: must be a finite number (got {value})")
    return float(value)


def rank_fits(rank: int, shape: tuple[int, ...], what: str) -> None:
    """A LoRA rank no larger than the smaller side of the matrix it adapts (extraction cannot
    factorize beyond it, and training would only waste parameters): refuse `--rank` above it."""
    if rank > min(shape):
        raise UserError(f"--rank: {rank} is above the smaller side ({min(shape)}) of the "
                        f"{list(shape)} block for {what}")
