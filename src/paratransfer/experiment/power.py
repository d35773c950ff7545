"""How many seeds would decide a paired contrast: Student's t quantile for any degrees of
freedom (exact for whole ones, no scipy), and the smallest number of seeds at which a 95%
interval of the observed per-seed spread would exclude zero at the observed mean.

Three seeds give a t-interval of ±4.3 standard errors; whether a study with more would
separate two arms depends on the mean difference against the spread of the per-seed
differences, which a run already has. This turns that into a number of seeds, or says that
the mean is too small to matter at any reasonable number.
"""

from __future__ import annotations

import functools
import math
import statistics
from typing import Any

#: Beyond this many seeds the answer is "not at any reasonable number".
REASONABLE_SEEDS = 100
#: The search stops here (the answer is then None: more than this many).
SEARCH_LIMIT = 100_000


def t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with `df` (whole) degrees of freedom.

    The finite series in cos θ, θ = atan(t/√df), that whole degrees of freedom allow
    (Abramowitz & Stegun 26.7.3-4): odd df add θ and a sum of odd powers, even df a sum of
    even powers times sin θ.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1 (got {df})")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):  # terms cos^(2k) θ · (2·4···2k)/(1·3···(2k+1))
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return (2 / math.pi) * (theta + math.sin(theta) * math.cos(theta) * total)
    term, total = 1.0, 1.0
    for k in range(1, df // 2):  # terms cos^(2k) θ · (1·3···(2k−1))/(2·4···2k)
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


#: Above this many degrees of freedom the quantile comes from its expansion in 1/df.
SERIES_DF = 200


@functools.lru_cache(maxsize=4096)
def t_quantile(p: float, df: int) -> float:
    """The t with P(T < t) = p (0.5 < p < 1) for `df` degrees of freedom: by bisection on the
    exact mass up to SERIES_DF, beyond from the expansion around the normal quantile
    (Abramowitz & Stegun 26.7.5; its error there is far below the 3 decimals printed)."""
    if not 0.5 < p < 1:
        raise ValueError(f"p must be in (0.5, 1) (got {p})")
    if df > SERIES_DF:
        return _t_expansion(p, df)
    mass = 2 * p - 1  # P(|T| < t)
    low, high = 0.0, 1.0
    while t_two_sided_mass(high, df) < mass:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if t_two_sided_mass(mid, df) < mass:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * high:
            break
    return (low + high) / 2


def _t_expansion(p: float, df: int) -> float:
    z = statistics.NormalDist().inv_cdf(p)
    v = float(df)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4))


def half_width(sd: float, n: int, quantile=None) -> float:
    """Half the width of the 95% t-interval of a mean of n paired differences with spread sd."""
    from paratransfer.experiment.results import t975

    q = (quantile or t975)(n - 1)
    return q * sd / math.sqrt(n)


def seeds_to_decide(diffs: list[float]) -> dict[str, Any]:
    """The smallest number of seeds N at which the 95% interval of the observed spread would
    exclude zero at the observed mean: min N ≥ 2 with t(N−1)·sd/√N < |mean|.

    `seeds` is None when no number up to SEARCH_LIMIT does (or the mean is exactly 0),
    `reasonable` False when more than REASONABLE_SEEDS would be needed; `why` says which.
    """
    n = len(diffs)
    out: dict[str, Any] = {"n": n, "seeds": None, "reasonable": False}
    if n < 2:
        return {**out, "why": "one seed: no spread to judge from"}
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    out.update(mean=mean, sd=sd)
    if mean == 0:
        return {**out, "why": "the observed mean difference is 0"}
    if sd == 0:
        return {**out, "seeds": 2, "reasonable": True, "why": "no spread between seeds"}
    # The interval shrinks at least as fast as 1.96·sd/√N: no N below this bound can do.
    start = max(2, math.floor((1.96 * sd / abs(mean)) ** 2))
    if start > SEARCH_LIMIT:
        return {**out, "why": f"more than {SEARCH_LIMIT} seeds"}
    for seeds in range(start, SEARCH_LIMIT + 1):
        if half_width(sd, seeds) < abs(mean):
            return {**out, "seeds": seeds, "reasonable": seeds <= REASONABLE_SEEDS,
                    "why": "" if seeds <= REASONABLE_SEEDS
                    else f"more than {REASONABLE_SEEDS} seeds"}
    return {**out, "why": f"more than {SEARCH_LIMIT} seeds"}


def decide_sentence(d: dict[str, Any]) -> str:
    """What `seeds_to_decide` found, in a few words."""
    if d["seeds"] is None and d["n"] < 2:
        return f"Seeds that would decide: unknown ({d['why']})"
    if d["seeds"] is None or not d["reasonable"]:
        need = f"{d['seeds']} seeds" if d["seeds"] is not None else d["why"]
        return (f"Seeds that would decide: {need}; the observed mean is too small against the "
                "per-seed spread to matter at any reasonable number of seeds")
    if d["seeds"] <= d["n"]:
        return (f"Seeds that would decide: {d['seeds']} (the {d['n']} seeds run already exclude 0 "
                "at this spread)")
    return (f"Seeds that would decide: {d['seeds']} (an interval of this spread would exclude 0 "
            f"at the observed mean; {d['n']} were run)")
