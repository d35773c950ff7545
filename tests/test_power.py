"""The statistics behind the contrasts: Student's t quantile against a numerical integration of
its density, the seeds that would decide against a plain search, and the held-out measures and
sentences on small hand-made inputs."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paratransfer.experiment.heldout_contrasts import NO_HELDOUT, loss_sentence, run_measures
from paratransfer.experiment.power import (
    REASONABLE_SEEDS,
    decide_sentence,
    half_width,
    seeds_to_decide,
    t_quantile,
    t_two_sided_mass,
)
from paratransfer.experiment.results import T975, paired_interval, t975


def density(x: float, df: int) -> float:
    """Student's t density from its definition (log-gamma), no series."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


def mass_by_simpson(t: float, df: int, steps: int = 4000) -> float:
    """P(|T| < t) = 2·∫0^t density, by Simpson's rule."""
    h = t / steps
    total = density(0, df) + density(t, df)
    total += sum((4 if i % 2 else 2) * density(i * h, df) for i in range(1, steps))
    return 2 * total * h / 3


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 10, 29, 60, 199, 200, 201, 500])
def test_t_quantile_against_numerical_integration(df):
    q = t_quantile(0.975, df)
    assert mass_by_simpson(q, df) == pytest.approx(0.95, abs=1e-9)
    assert t_two_sided_mass(q, df) == pytest.approx(0.95, abs=1e-9)


def test_t_quantile_agrees_with_the_table_and_beyond_it():
    for df in range(1, len(T975) + 1):
        assert t_quantile(0.975, df) == pytest.approx(T975[df - 1], abs=6e-4)
        assert t975(df) == T975[df - 1]
    # Beyond the table the quantile is computed (it used to jump to the normal's 1.96).
    assert t975(31) == pytest.approx(2.0395, abs=1e-4)
    assert 1.96 < t975(1000) < t975(100) < t975(31) < T975[-1]


@settings(deadline=None)  # a numerical integration per example: slow on a busy machine
@given(st.floats(0.01, 20), st.integers(1, 60))
def test_t_mass_series_against_simpson(t, df):
    assert t_two_sided_mass(t, df) == pytest.approx(mass_by_simpson(t, df, 2000), abs=1e-7)


def plain_search(diffs: list[float], limit: int = 20_000) -> int | None:
    """The first N from 2 up with t(N−1)·sd/√N < |mean|, one N at a time."""
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    for n in range(2, limit + 1):
        if t975(n - 1) * sd / math.sqrt(n) < abs(mean):
            return n
    return None


@settings(deadline=None)  # the plain search walks up to 20,000 N one at a time
@given(st.lists(st.floats(-1, 1), min_size=2, max_size=12))
def test_seeds_to_decide_is_the_first_n_a_plain_search_finds(diffs):
    if statistics.stdev(diffs) == 0 or statistics.fmean(diffs) == 0:
        return
    want = plain_search(diffs)
    got = seeds_to_decide(diffs)
    if want is None:
        assert got["seeds"] is None or got["seeds"] > 20_000
        return
    assert got["seeds"] == want
    assert got["reasonable"] == (want <= REASONABLE_SEEDS)
    # Decided at the seeds run exactly when the interval from them excludes 0.
    d = paired_interval(diffs, [0.0] * len(diffs))
    assert (got["seeds"] <= len(diffs)) == (d["low"] > 0 or d["high"] < 0)


def test_seeds_to_decide_on_the_readme_numbers():
    """transfer − lora +0.28 from three seeds with a per-seed sd of 0.336 (interval ±0.83):
    about a dozen seeds would exclude 0 at that mean."""
    diffs = [0.28 - 0.336, 0.28, 0.28 + 0.336]
    got = seeds_to_decide(diffs)
    n = got["seeds"]
    sd = statistics.stdev(diffs)
    assert half_width(sd, n) < 0.28 <= half_width(sd, n - 1)
    assert 5 < n < 20 and got["reasonable"]
    assert f"Seeds that would decide: {n} " in decide_sentence(got) and "3 were run" in \
        decide_sentence(got)


def test_seeds_to_decide_edge_cases():
    one = seeds_to_decide([0.3])
    assert one["seeds"] is None and "one seed" in decide_sentence(one)
    zero = seeds_to_decide([0.1, -0.1])
    assert zero["seeds"] is None and "too small" in decide_sentence(zero)
    flat = seeds_to_decide([0.2, 0.2, 0.2])
    assert flat["seeds"] == 2 and "already exclude 0" in decide_sentence(flat)
    tiny = seeds_to_decide([0.001, -0.2, 0.2])  # mean 3e-4 against an sd of 0.2
    assert not tiny["reasonable"] and "any reasonable number" in decide_sentence(tiny)
    big = seeds_to_decide([0.01, -0.05, 0.05])  # needs hundreds: found, but not reasonable
    assert big["seeds"] is not None and big["seeds"] > REASONABLE_SEEDS
    assert f"{big['seeds']} seeds; the observed mean is too small" in decide_sentence(big)


def test_loss_sentences_say_lower_is_better():
    lower = paired_interval([1.0, 1.1, 1.2], [1.5, 1.7, 1.8])
    higher = paired_interval([1.5, 1.7, 1.8], [1.0, 1.1, 1.2])
    around = paired_interval([1.0, 1.5, 1.2], [1.2, 1.1, 1.3])
    assert loss_sentence("x", lower, "a", "b").endswith(
        "significant (the interval is below 0: a's loss is lower, and lower loss is better).")
    assert loss_sentence("x", higher, "a", "b").endswith(
        "significant (the interval is above 0: b's loss is lower, and lower loss is better).")
    assert loss_sentence("x", around, "a", "b").endswith(
        "not significant (the interval includes 0; lower loss is better).")
    assert "no conclusion" in loss_sentence("x", paired_interval([1.0], [2.0]), "a", "b")


def test_run_measures_final_and_curve_mean_after_step_0(tmp_path):
    history = [{"step": 0, "loss": 9.0}, {"step": 5, "loss": 3.0}, {"step": 10, "loss": 2.0},
               {"step": 12, "loss": 1.0}]
    (tmp_path / "train.json").write_text(json.dumps({"heldout_history": history[::-1]}))
    assert run_measures(tmp_path) == {"final": 1.0, "curve_mean": 2.0}
    (tmp_path / "train.json").write_text(json.dumps({"heldout_history": []}))
    assert run_measures(tmp_path) is None
    assert "task.heldout" in NO_HELDOUT


def test_a_random_window_arm_gets_its_contrast_with_transfer(tmp_path):
    """An arm named `random` (the demo study's `{reduce: random}`) is contrasted with transfer:
    the paired difference over the seeds both ran, with its sentence."""
    from paratransfer.experiment.results import contrasts

    values = {"transfer": {1: 0.5, 2: 0.7, 3: 0.6}, "random": {1: 0.4, 2: 0.5, 3: 0.55}}
    metrics = {}
    for arm, by_seed in values.items():
        for seed, value in by_seed.items():
            path = tmp_path / f"{arm}-{seed}.json"
            path.write_text(json.dumps({"value": value}))
            metrics.setdefault(arm, {})[seed] = path
    said = {c["contrast"]: c for c in contrasts([], metrics)}
    got = said["transfer − random"]
    assert got["n"] == 3 and abs(got["mean"] - (0.1 + 0.2 + 0.05) / 3) < 1e-12
    assert got["sentence"].startswith("the sensitivity-chosen windows over random windows")
