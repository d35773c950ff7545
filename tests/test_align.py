"""Layer selection and structure-preserving dimension reduction (paratransfer.extract.strategies)."""

from __future__ import annotations

from fractions import Fraction
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paratransfer.extract import strategies as align
from paratransfer.extract.strategies import (
    LAYER_SELECTORS,
    MAPS_SHALLOWER_TEACHER,
    REDUCERS,
    Selection,
    best_window,
    layer_rule,
    reduce,
    select_layers,
    window_sums,
)
from paratransfer.io.errors import UserError

# Block sizes for the float64 widening loop: 1 and 5 force many tiny blocks (the real matrices
# are split into hundreds of blocks, test matrices would otherwise fit in one).
BLOCK_SIZES = [1, 5, align._BLOCK_ELEMENTS]



# --- brute-force references ----------------------------------------------------------------


def brute_sums(sens: torch.Tensor, rows: int, cols: int) -> list[list[float]]:
    """Sum of every block by explicit summation, in float64."""
    s = sens.to(torch.float64).tolist()
    m, n = len(s), len(s[0])
    return [
        [
            sum(s[i + a][j + b] for a in range(rows) for b in range(cols))
            for j in range(n - cols + 1)
        ]
        for i in range(m - rows + 1)
    ]


def brute_best(sens: torch.Tensor, rows: int, cols: int) -> tuple[tuple[int, int], float]:
    """First row-major top-left corner of a maximal block, and that block's sum."""
    best, where = None, None
    for i, line in enumerate(brute_sums(sens, rows, cols)):
        for j, total in enumerate(line):
            if best is None or total > best:  # strict: earlier positions win ties
                best, where = total, (i, j)
    return where, best


@st.composite
def problems(draw, values):
    """A sensitivity matrix up to 12x12 and a student block size that fits in it."""
    m = draw(st.integers(1, 12))
    n = draw(st.integers(1, 12))
    rows = draw(st.integers(1, m))
    cols = draw(st.integers(1, n))
    flat = draw(st.lists(values, min_size=m * n, max_size=m * n))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    block = draw(st.sampled_from(BLOCK_SIZES))
    return torch.tensor(flat, dtype=dtype).reshape(m, n), rows, cols, block


# Mostly zeros and small integers: many exact ties, so the row-major rule is really exercised.
SMALL_INTS = st.sampled_from([0, 0, 0, 0, 1, 2, 3]).map(float)
FLOATS = st.floats(0.0, 1e3, allow_nan=False, allow_infinity=False, width=32)


# --- window search -------------------------------------------------------------------------


@settings(max_examples=250, deadline=None)
@given(problems(SMALL_INTS))
def test_best_window_matches_brute_force_with_ties(problem):
    sens, rows, cols, block = problem
    with mock.patch.object(align, "_BLOCK_ELEMENTS", block):
        got = best_window(sens, rows, cols)
    where, _ = brute_best(sens, rows, cols)
    assert got == where


@settings(max_examples=150, deadline=None)
@given(problems(FLOATS))
def test_best_window_is_a_maximum_for_float_sensitivity(problem):
    sens, rows, cols, block = problem
    with mock.patch.object(align, "_BLOCK_ELEMENTS", block):
        i, j = best_window(sens, rows, cols)
    _, best = brute_best(sens, rows, cols)
    chosen = brute_sums(sens, rows, cols)[i][j]
    assert chosen == pytest.approx(best, rel=1e-9, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(problems(FLOATS))
def test_window_sums_match_brute_force(problem):
    sens, rows, cols, block = problem
    with mock.patch.object(align, "_BLOCK_ELEMENTS", block):
        sums = window_sums(sens, rows, cols)
    assert sums.dtype == torch.float64
    expected = torch.tensor(brute_sums(sens, rows, cols), dtype=torch.float64)
    assert sums.shape == expected.shape
    torch.testing.assert_close(sums, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("block", BLOCK_SIZES)
@pytest.mark.parametrize(
    ("shape", "rows", "cols"),
    [
        ((40, 6), 40, 3),  # all rows kept: rows pass goes first (the lm_head case)
        ((6, 40), 3, 40),  # all columns kept (the transposed embedding case)
        ((30, 30), 20, 20),  # square attention-like case
        ((33, 14), 25, 11),  # MLP-like: taller than wide
    ],
)
def test_window_sums_both_pass_orders(shape, rows, cols, block):
    sens = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    with mock.patch.object(align, "_BLOCK_ELEMENTS", block):
        sums = window_sums(sens, rows, cols)
    expected = torch.tensor(brute_sums(sens, rows, cols), dtype=torch.float64)
    torch.testing.assert_close(sums, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("rows", "cols"), [(4, 30), (7, 12), (9, 33)])
def test_window_sums_of_a_transposed_view(rows, cols):
    # the embedding's sensitivity arrives as a [d, vocab] view of a [vocab, d] tensor
    stored = torch.rand(33, 9, generator=torch.Generator().manual_seed(2))
    sens = stored.T
    sums = window_sums(sens, rows, cols)
    expected = torch.tensor(brute_sums(sens, rows, cols), dtype=torch.float64)
    torch.testing.assert_close(sums, expected, rtol=1e-9, atol=1e-9)
    assert best_window(sens, rows, cols) == brute_best(sens, rows, cols)[0]


def test_best_window_finds_planted_block():
    sens = torch.zeros(50, 60)
    sens[17:27, 31:43] = 1.0
    assert best_window(sens, 10, 12) == (17, 31)


def test_best_window_ties_go_to_first_row_major_position():
    assert best_window(torch.zeros(5, 7), 2, 3) == (0, 0)
    sens = torch.zeros(6, 6)
    sens[4, 1] = 1.0
    sens[1, 4] = 1.0
    # eight 2x2 blocks sum to 1: corners (0,3),(0,4),(1,3),(1,4) and (3,0),(3,1),(4,0),(4,1)
    assert best_window(sens, 2, 2) == (0, 3)


@pytest.mark.parametrize(
    ("shape", "rows", "cols"), [((4, 5), 5, 2), ((4, 5), 2, 6), ((4, 5), 5, 6)]
)
def test_teacher_smaller_than_student_is_a_user_error(shape, rows, cols):
    with pytest.raises(UserError, match="teacher dimension smaller than student's"):
        best_window(torch.ones(shape), rows, cols)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), ()])
def test_sensitivity_must_be_a_matrix(shape):
    with pytest.raises(UserError, match="2-D"):
        best_window(torch.ones(shape), 1, 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_sensitivity_is_a_user_error(bad):
    sens = torch.ones(4, 4)
    sens[2, 2] = bad
    with pytest.raises(UserError, match="NaN or infinite"):
        best_window(sens, 2, 2)


# --- reducers ------------------------------------------------------------------------------


def test_reducer_registry_names():
    assert set(REDUCERS) == {"window", "window-heads", "rows-cols", "first", "random"}
    assert [name for name, r in REDUCERS.items() if r.head_aware] == ["window-heads"]


def test_window_heads_is_the_window_on_head_units_from_the_one_registry():
    sens = torch.rand(16, 12, generator=torch.Generator().manual_seed(5))
    plain, aligned = reduce("window", sens, 8, 6), reduce("window-heads", sens, 8, 6, units=(4, 1))
    assert aligned.window[0] % 4 == 0 and aligned.take(sens).shape == (8, 6)
    assert sens[aligned.rows][:, aligned.cols].sum() <= sens[plain.rows][:, plain.cols].sum()
    assert reduce("window-heads", sens, 8, 6).window == plain.window  # units 1: the window


def test_window_reducer_selects_best_block_and_takes_it():
    sens = torch.zeros(9, 11)
    sens[3:7, 2:9] = 5.0
    weight = torch.arange(99, dtype=torch.float32).reshape(9, 11)
    sel = reduce("window", sens, 4, 7)
    assert sel.window == (3, 2)
    assert sel.rows.tolist() == [3, 4, 5, 6]
    assert sel.cols.tolist() == list(range(2, 9))
    assert sel.rows.dtype == sel.cols.dtype == torch.int64
    assert torch.equal(sel.take(weight), weight[3:7, 2:9])


def test_rows_cols_picks_most_sensitive_rows_and_columns_in_original_order():
    row_weight = torch.tensor([0.0, 9.0, 1.0, 0.5, 7.0, 8.0, 0.2, 0.1])
    col_weight = torch.tensor([3.0, 0.0, 0.1, 0.2, 0.3, 0.0, 0.0, 4.0, 0.0, 0.0])
    sens = row_weight[:, None] + col_weight[None, :]
    sel = reduce("rows-cols", sens, 3, 2)
    assert sel.rows.tolist() == [1, 4, 5]
    assert sel.cols.tolist() == [0, 7]
    assert sel.window is None
    weight = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sel.take(weight), weight[[1, 4, 5]][:, [0, 7]])


def test_rows_cols_ties_prefer_lower_indices():
    sel = reduce("rows-cols", torch.ones(6, 5), 2, 3)
    assert sel.rows.tolist() == [0, 1]
    assert sel.cols.tolist() == [0, 1, 2]


def test_first_takes_the_top_left_block():
    sens = torch.zeros(6, 8)
    sens[4:, 5:] = 100.0  # sensitivity is ignored
    sel = reduce("first", sens, 3, 4)
    assert sel.window == (0, 0)
    assert sel.rows.tolist() == [0, 1, 2]
    assert sel.cols.tolist() == [0, 1, 2, 3]
    weight = torch.randn(6, 8)
    assert torch.equal(sel.take(weight), weight[:3, :4])


@pytest.mark.parametrize("seed", [0, 1, 123])
def test_random_reduction_is_seeded_distinct_sorted_and_sized(seed):
    sens = torch.rand(50, 40)
    state = torch.get_rng_state()
    a = reduce("random", sens, 30, 25, seed=seed)
    b = reduce("random", sens, 30, 25, seed=seed)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert torch.equal(a.rows, b.rows) and torch.equal(a.cols, b.cols)
    assert a.window is None
    for idx, size, limit in ((a.rows, 30, 50), (a.cols, 25, 40)):
        values = idx.tolist()
        assert len(values) == size
        assert values == sorted(set(values))
        assert 0 <= values[0] and values[-1] < limit
    weight = torch.randn(50, 40)
    assert torch.equal(a.take(weight), weight[a.rows][:, a.cols])


def test_random_reduction_depends_on_seed():
    sens = torch.rand(50, 40)
    picks = {tuple(reduce("random", sens, 10, 10, seed=s).rows.tolist()) for s in range(5)}
    assert len(picks) > 1


@pytest.mark.parametrize("strategy", sorted(REDUCERS))
def test_every_reducer_refuses_teacher_smaller_than_student(strategy):
    with pytest.raises(UserError, match="teacher dimension smaller than student's"):
        reduce(strategy, torch.ones(4, 4), 5, 2)


@pytest.mark.parametrize("strategy", sorted(REDUCERS))
def test_every_reducer_gives_the_student_shape(strategy):
    sens = torch.rand(12, 9, generator=torch.Generator().manual_seed(3))
    sel = reduce(strategy, sens, 7, 5, seed=4)
    assert isinstance(sel, Selection)
    assert sel.take(torch.randn(12, 9)).shape == (7, 5)
    again = reduce(strategy, sens, 7, 5, seed=4)  # same inputs and seed, same selection
    assert torch.equal(again.rows, sel.rows) and torch.equal(again.cols, sel.cols)
    assert again.window == sel.window


def test_unknown_reducer_names_the_known_ones():
    with pytest.raises(UserError, match="rows-cols") as err:
        reduce("neurons", torch.ones(3, 3), 2, 2)
    assert "window" in str(err.value) and "neurons" in str(err.value)


# --- layer selection -----------------------------------------------------------------------


def test_layer_selector_registry_names():
    assert set(LAYER_SELECTORS) == {"sensitivity", "first", "last", "uniform", "random", "depth"}


def test_sensitivity_keeps_top_layers_in_original_order():
    scores = [0.1, 5.0, 0.3, 9.0, 0.2, 7.0]
    assert select_layers("sensitivity", scores, 3) == [1, 3, 5]


def test_sensitivity_ties_go_to_lower_layers():
    scores = [1.0, 3.0, 3.0, 2.0, 3.0]
    assert select_layers("sensitivity", scores, 2) == [1, 2]
    assert select_layers("sensitivity", scores, 3) == [1, 2, 4]
    assert select_layers("sensitivity", [0.0] * 6, 4) == [0, 1, 2, 3]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 4).map(float), min_size=1, max_size=40), st.data())
def test_sensitivity_matches_sorting_reference(scores, data):
    k = data.draw(st.integers(1, len(scores)))
    chosen = select_layers("sensitivity", scores, k)
    assert chosen == sorted(chosen) and len(set(chosen)) == k
    dropped = [i for i in range(len(scores)) if i not in chosen]
    for i in chosen:
        for j in dropped:  # every kept layer beats every dropped one, ties to the lower index
            assert scores[i] > scores[j] or (scores[i] == scores[j] and i < j)


def test_first_and_last():
    scores = [0.0] * 40
    assert select_layers("first", scores, 32) == list(range(32))
    assert select_layers("last", scores, 32) == list(range(8, 40))


def test_uniform_examples():
    assert select_layers("uniform", [0.0] * 10, 4) == [0, 3, 6, 9]
    assert select_layers("uniform", [0.0] * 5, 5) == [0, 1, 2, 3, 4]
    assert select_layers("uniform", [0.0] * 9, 1) == [4]
    assert select_layers("uniform", [0.0] * 40, 2) == [0, 39]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 80), st.data())
def test_uniform_is_evenly_spaced_distinct_and_spans(n, data):
    k = data.draw(st.integers(2, n)) if n >= 2 else 1
    chosen = select_layers("uniform", [0.0] * n, k)
    assert len(chosen) == k and chosen == sorted(set(chosen))
    if k > 1:
        assert chosen[0] == 0 and chosen[-1] == n - 1
        for i, layer in enumerate(chosen):
            assert abs(layer - i * (n - 1) / (k - 1)) <= 0.5


@pytest.mark.parametrize("seed", [0, 7])
def test_random_layers_are_seeded_distinct_sorted(seed):
    scores = [float(i) for i in range(40)]
    a = select_layers("random", scores, 32, seed=seed)
    assert a == select_layers("random", scores, 32, seed=seed)
    assert len(a) == 32 and a == sorted(set(a)) and 0 <= a[0] and a[-1] < 40


def test_random_layers_depend_on_seed():
    scores = [0.0] * 40
    assert len({tuple(select_layers("random", scores, 5, seed=s)) for s in range(5)}) > 1


@pytest.mark.parametrize("strategy", sorted(set(LAYER_SELECTORS) - set(MAPS_SHALLOWER_TEACHER)))
def test_teacher_with_fewer_layers_than_student_is_a_user_error(strategy):
    """first / last / random pick distinct layers: a shallower teacher has too few."""
    with pytest.raises(UserError, match="fewer layers.*--layers depth"):
        select_layers(strategy, [1.0] * 3, 4)


def _nearest_depth(n: int, k: int) -> list[int]:
    """Brute force: for each student layer, the teacher layer whose relative depth t/(n-1) is
    nearest to i/(k-1) (exact halves go up), by comparing every teacher layer."""
    if k == 1:
        return [(n - 1) // 2]
    out = []
    for i in range(k):
        target = Fraction(i, k - 1)
        out.append(min(range(n), key=lambda t: (abs(Fraction(t, max(n - 1, 1)) - target), -t)))
    return out


@pytest.mark.parametrize("strategy", MAPS_SHALLOWER_TEACHER)
@given(n=st.integers(1, 40), extra=st.integers(1, 40), seed=st.integers(0, 3))
@settings(max_examples=60, deadline=None)
def test_shallower_teacher_maps_by_relative_depth(strategy, n, extra, seed):
    k = n + extra  # more student layers than teacher layers
    scores = [float(x) for x in torch.rand(n, generator=torch.Generator().manual_seed(seed))]
    got = select_layers(strategy, scores, k)
    assert layer_rule(strategy, n, k) == "depth"
    assert got == _nearest_depth(n, k)
    assert len(got) == k and got == sorted(got)  # the teacher's order
    assert set(got) == set(range(n))  # every teacher layer feeds some student layer
    assert got[0] == (0 if k > 1 else (n - 1) // 2) and (k == 1 or got[-1] == n - 1)


def test_depth_with_a_deeper_teacher_is_uniform():
    scores = [float(i % 5) for i in range(18)]
    for k in (1, 5, 12, 18):
        assert select_layers("depth", scores, k) == select_layers("uniform", scores, k)
    assert layer_rule("sensitivity", 18, 12) == "sensitivity"
    assert select_layers("depth", [1.0] * 18, 30)[:4] == [0, 1, 1, 2]


@pytest.mark.parametrize("strategy", sorted(LAYER_SELECTORS))
def test_all_layers_kept_when_counts_match(strategy):
    assert select_layers(strategy, [3.0, 1.0, 2.0], 3) == [0, 1, 2]


def test_unknown_layer_strategy_names_the_known_ones():
    with pytest.raises(UserError, match="sensitivity") as err:
        select_layers("middle", [1.0, 2.0], 1)
    assert "uniform" in str(err.value)


def test_zero_layers_and_nan_scores_are_user_errors():
    with pytest.raises(UserError):
        select_layers("first", [1.0, 2.0], 0)
    with pytest.raises(UserError, match="NaN"):
        select_layers("sensitivity", [1.0, float("nan")], 1)
