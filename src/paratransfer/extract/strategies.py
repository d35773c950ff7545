"""Teacher-to-student alignment: which teacher layers to keep, and which block of each matrix.

The method (docs/method.md §2–3) keeps the student's number of teacher layers and, per
module, the contiguous student-sized block of the teacher matrix with the largest summed
sensitivity. The alternatives the paper compares against (first/last/uniform/random layers,
rows-columns/random/first-block reduction) live in the same registries so that ablations are
a matter of typing a different name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from paratransfer.io.errors import UserError

# The registries' names and help are read by `paratransfer --help` (the extraction flags),
# which must not wait for torch: the functions import it when extraction calls them.
if TYPE_CHECKING:
    import torch

# float64 elements converted per block when a float32 sensitivity is summed: torch's own
# float64-accumulating reductions over float32 input are ~5x slower than converting
# cache-sized blocks and reducing those (measured on 5120x5120).
_BLOCK_ELEMENTS = 1 << 19

# The column pass first is cheaper per element (cumsum along the contiguous dimension is
# about twice as fast as along rows, measured); rows go first only when that makes the
# intermediate float64 array at least this many times smaller (e.g. lm_head, where the
# vocabulary rows are all kept).
_ROWS_FIRST_ADVANTAGE = 2


# --- window search -------------------------------------------------------------------------


def _check_shapes(sens: torch.Tensor, rows: int, cols: int) -> None:
    """Refuse impossible reductions with a message in the method's terms."""
    if sens.dim() != 2:
        raise UserError(f"sensitivity must be a 2-D matrix, got shape {list(sens.shape)}")
    m, n = sens.shape
    if rows < 1 or cols < 1:
        raise UserError(f"student block must be at least 1x1, got {rows}x{cols}")
    if rows > m or cols > n:
        raise UserError(
            f"teacher dimension smaller than student's: cannot take a {rows}x{cols} block "
            f"from a {m}x{n} teacher matrix"
        )


def _blocks(x: torch.Tensor) -> int:
    """Rows per block so a float64 copy of one block stays cache-sized."""
    return max(1, _BLOCK_ELEMENTS // max(1, x.shape[1]))


def _sliding_along_cols(x: torch.Tensor, cols: int) -> torch.Tensor:
    """Every row's sums of `cols` consecutive entries, float64 [m, n-cols+1].

    First window summed, the others by a cumulative sum of (entering - leaving) entries, so the
    cumsum runs over n-cols+1 columns rather than n; float32 input is widened block by block.
    """
    import torch

    m, n = x.shape
    out = torch.empty(m, n - cols + 1, dtype=torch.float64)
    step = _blocks(x)
    for xb, ob in zip(x.split(step), out.split(step), strict=True):
        xb = xb.to(torch.float64)
        torch.sum(xb[:, :cols], 1, out=ob[:, 0])
        torch.sub(xb[:, cols:], xb[:, : n - cols], out=ob[:, 1:])
    return out.cumsum_(1)


def _sliding_along_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Every column's sums of `rows` consecutive entries, float64 [m-rows+1, n] (same scheme)."""
    import torch

    m, n = x.shape
    out = torch.empty(m - rows + 1, n, dtype=torch.float64)
    step = _blocks(x)
    first = out[0].zero_()
    for xb in x[:rows].split(step):
        first += xb.to(torch.float64).sum(0)
    leaving, entering = x[: m - rows].split(step), x[rows:].split(step)
    for lb, eb, ob in zip(leaving, entering, out[1:].split(step), strict=True):
        torch.sub(eb.to(torch.float64), lb.to(torch.float64), out=ob)
    return out.cumsum_(0)


def window_sums(sens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Summed sensitivity of every contiguous rows x cols block, float64, by top-left corner.

    Separable sliding sums (one pass per dimension) score all (m-rows+1)(n-cols+1) positions at
    once, instead of the reference's Python loop over positions.
    """
    _check_shapes(sens, rows, cols)
    if not sens.is_contiguous() and sens.mT.is_contiguous():
        # a transposed view (the embedding is scored as [d, vocab]): walk it in storage order
        return window_sums(sens.mT, cols, rows).mT.contiguous()
    m, n = sens.shape
    rows_first_size = (m - rows + 1) * n
    cols_first_size = m * (n - cols + 1)
    if _ROWS_FIRST_ADVANTAGE * rows_first_size < cols_first_size:
        return _sliding_along_cols(_sliding_along_rows(sens, rows), cols)
    return _sliding_along_rows(_sliding_along_cols(sens, cols), rows)


def best_window(sens: torch.Tensor, rows: int, cols: int) -> tuple[int, int]:
    """Top-left (row, col) of the most sensitive rows x cols block; ties -> first row-major."""
    import torch

    sums = window_sums(sens, rows, cols)
    flat = sums.view(-1)
    index = int(torch.argmax(flat))  # argmax returns the first maximum, i.e. row-major ties
    if not math.isfinite(float(flat[index])):
        raise UserError("sensitivity contains NaN or infinite values: cannot rank teacher blocks")
    return divmod(index, sums.shape[1])


# --- dimension reduction -------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Which teacher rows and columns make up the student-sized block."""

    rows: torch.Tensor  # int64 indices into the teacher matrix's rows, ascending
    cols: torch.Tensor  # int64 indices into the teacher matrix's columns, ascending
    window: tuple[int, int] | None  # top-left corner when the block is contiguous, else None

    def take(self, weight: torch.Tensor) -> torch.Tensor:
        """The selected [rows, cols] sub-matrix; a view (no copy) when the block is contiguous."""
        if self.window is not None:
            r0, c0 = self.window
            return weight[r0 : r0 + len(self.rows), c0 : c0 + len(self.cols)]
        return weight.index_select(0, self.rows).index_select(1, self.cols)


def _contiguous(row: int, col: int, rows: int, cols: int) -> Selection:
    """Selection of the rows x cols block whose top-left corner is (row, col)."""
    import torch

    return Selection(
        rows=torch.arange(row, row + rows, dtype=torch.int64),
        cols=torch.arange(col, col + cols, dtype=torch.int64),
        window=(row, col),
    )


def _top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores in ascending index order; ties -> lower index first."""
    import torch

    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k].sort().values.to(torch.int64)


def _reduce_window(
    sens: torch.Tensor, rows: int, cols: int, generator: torch.Generator
) -> Selection:
    """The method's choice: the contiguous block with the largest summed sensitivity."""
    return _contiguous(*best_window(sens, rows, cols), rows, cols)


def _reduce_rows_cols(
    sens: torch.Tensor, rows: int, cols: int, generator: torch.Generator
) -> Selection:
    """Ablation: most sensitive rows and columns (by mean) independently, in original order."""
    import torch

    _check_shapes(sens, rows, cols)
    sens64 = sens.to(torch.float64)
    return Selection(
        rows=_top_indices(sens64.mean(1), rows),
        cols=_top_indices(sens64.mean(0), cols),
        window=None,
    )


def _reduce_first(
    sens: torch.Tensor, rows: int, cols: int, generator: torch.Generator
) -> Selection:
    """Ablation: the top-left block, ignoring sensitivity."""
    _check_shapes(sens, rows, cols)
    return _contiguous(0, 0, rows, cols)


def _reduce_random(
    sens: torch.Tensor, rows: int, cols: int, generator: torch.Generator
) -> Selection:
    """Ablation: random rows and random columns (each kept in ascending order)."""
    import torch

    _check_shapes(sens, rows, cols)
    m, n = sens.shape
    picked_rows = torch.randperm(m, generator=generator)[:rows].sort().values
    picked_cols = torch.randperm(n, generator=generator)[:cols].sort().values
    return Selection(rows=picked_rows, cols=picked_cols, window=None)


# --- head-aware windows --------------------------------------------------------------------


def best_window_aligned(sens: torch.Tensor, rows: int, cols: int, row_unit: int = 1,
                        col_unit: int = 1) -> tuple[int, int]:
    """`best_window` over the corners that lie on multiples of (row_unit, col_unit) only.

    With a unit that divides both the teacher dimension and the block size, the block starts
    and ends on unit boundaries (attention heads, for `window-heads`). Ties -> first row-major.
    """
    import torch

    _check_shapes(sens, rows, cols)
    m, n = sens.shape
    for unit, size, full, what in ((row_unit, rows, m, "rows"), (col_unit, cols, n, "columns")):
        if unit < 1 or size % unit or full % unit:
            raise UserError(f"cannot align a block of {size} {what} to units of {unit} in a "
                            f"teacher matrix of {full} {what}")
    sums = window_sums(sens, rows, cols)[::row_unit, ::col_unit].contiguous()
    flat = sums.view(-1)
    index = int(torch.argmax(flat))
    if not math.isfinite(float(flat[index])):
        raise UserError("sensitivity contains NaN or infinite values: cannot rank teacher blocks")
    i, j = divmod(index, sums.shape[1])
    return i * row_unit, j * col_unit


def reduce_window_heads(sens: torch.Tensor, rows: int, cols: int, row_unit: int = 1,
                        col_unit: int = 1) -> Selection:
    """`--reduce window-heads`: the most sensitive block whose sides lie on head boundaries.

    The caller gives the units (the teacher's head width along the dimension that holds heads,
    1 along the other); `extract` works them out from both models' head layouts.
    """
    return _contiguous(*best_window_aligned(sens, rows, cols, row_unit, col_unit), rows, cols)


Reducer = Callable[["torch.Tensor", int, int, "torch.Generator"], Selection]


@dataclass(frozen=True)
class Reduction:
    """A `--reduce` strategy: (sensitivity, rows, cols, generator, units) -> the block.

    `head_aware` ones use `units`, the (row, column) steps that keep block sides on attention
    heads; extraction gives them q, k, v, o and uses `window` for every other role. `window`
    ones search for the most sensitive contiguous block (so `stability` can compare the
    blocks of two seed sets); `help` is what `--help` says of it beyond its name.
    """

    pick: Callable[[torch.Tensor, int, int, torch.Generator, tuple[int, int]], Selection]
    head_aware: bool = False
    window: bool = False
    help: str = ""


def _plain(reducer: Reducer, **more) -> Reduction:
    """A reduction that needs no head layout (the units are ignored)."""
    return Reduction(lambda sens, rows, cols, generator, units: reducer(sens, rows, cols, generator),
                     **more)


#: Every `--reduce` strategy, by the name a user types.
REDUCERS: dict[str, Reduction] = {
    "window": _plain(_reduce_window, window=True),
    "window-heads": Reduction(lambda sens, rows, cols, generator, units:
                              reduce_window_heads(sens, rows, cols, *units), head_aware=True,
                              window=True,
                              help="q/k/v/o blocks start and end on attention-head boundaries"),
    "rows-cols": _plain(_reduce_rows_cols),
    "first": _plain(_reduce_first),
    "random": _plain(_reduce_random),
}
#: Every name `--reduce` accepts.
REDUCTIONS: tuple[str, ...] = tuple(REDUCERS)


def _generator(seed: int) -> torch.Generator:
    """A private CPU generator, so random strategies never touch the global RNG."""
    import torch

    return torch.Generator().manual_seed(seed)


def _lookup(registry: dict, kind: str, strategy: str):
    """Registry entry for `strategy`, or a UserError listing the known names."""
    try:
        return registry[strategy]
    except KeyError:
        known = ", ".join(sorted(registry))
        raise UserError(f"unknown {kind} strategy {strategy!r}; known: {known}") from None


def reduce(strategy: str, sens: torch.Tensor, rows: int, cols: int, seed: int = 0,
           units: tuple[int, int] = (1, 1)) -> Selection:
    """Pick the student-sized [rows, cols] part of a teacher matrix by the named strategy.

    `units` (row, column) matter only to head-aware strategies: block corners on multiples.
    """
    return _lookup(REDUCERS, "reduction", strategy).pick(sens, rows, cols, _generator(seed), units)


# --- layer selection -----------------------------------------------------------------------


def _layers_by_sensitivity(
    scores: Sequence[float], k: int, generator: torch.Generator
) -> list[int]:
    """The method's choice: the k highest-scoring layers, back in original order."""
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties -> lower first
    return sorted(ranked[:k])


def _layers_first(scores: Sequence[float], k: int, generator: torch.Generator) -> list[int]:
    """Ablation: the bottom k layers."""
    return list(range(k))


def _layers_last(scores: Sequence[float], k: int, generator: torch.Generator) -> list[int]:
    """Ablation: the top k layers."""
    n = len(scores)
    return list(range(n - k, n))


def _layers_uniform(scores: Sequence[float], k: int, generator: torch.Generator) -> list[int]:
    """Ablation: k evenly spaced layers including the first and last (k=1: the middle one)."""
    n = len(scores)
    if k == 1:
        return [(n - 1) // 2]
    # round(i*(n-1)/(k-1)) half-up in integer arithmetic; steps >= 1 keep indices distinct
    return [(2 * i * (n - 1) + (k - 1)) // (2 * (k - 1)) for i in range(k)]


def _layers_random(scores: Sequence[float], k: int, generator: torch.Generator) -> list[int]:
    """Ablation: k distinct random layers in original order."""
    import torch

    return sorted(torch.randperm(len(scores), generator=generator)[:k].tolist())


def _layers_depth(scores: Sequence[float], k: int, generator: torch.Generator) -> list[int]:
    """Each student layer i takes the teacher layer at the same relative depth,
    round(i·(n−1)/(k−1)) (k=1: the middle one). With a shallower teacher every teacher layer is
    used and some feed two (or more) consecutive student layers, in the teacher's order; with
    a deeper one it is `uniform`."""
    return _layers_uniform(scores, k, generator)


LayerSelector = Callable[[Sequence[float], int, "torch.Generator"], list[int]]

LAYER_SELECTORS: dict[str, LayerSelector] = {
    "sensitivity": _layers_by_sensitivity,
    "first": _layers_first,
    "last": _layers_last,
    "uniform": _layers_uniform,
    "random": _layers_random,
    "depth": _layers_depth,
}

#: Strategies that, given a teacher shallower than the student, map by relative depth
#: (`depth`): with fewer teacher layers than student layers there is nothing to select, every
#: teacher layer is used. The others pick k distinct layers and refuse such a teacher.
MAPS_SHALLOWER_TEACHER = ("sensitivity", "uniform", "depth")


def layers_help() -> str:
    """`--layers`' help: every strategy's name, and which map a shallower teacher by depth."""
    return (f"{'|'.join(LAYER_SELECTORS)} (with a teacher shallower than the student, "
            f"{', '.join(MAPS_SHALLOWER_TEACHER)} map it by relative depth)")


def reduce_help() -> str:
    """`--reduce`' help: every strategy's name, and what those with a help say."""
    notes = "; ".join(f"{name}: {r.help}" for name, r in REDUCERS.items() if r.help)
    return "|".join(REDUCERS) + (f" ({notes})" if notes else "")


def layer_rule(strategy: str, n_teacher: int, k: int) -> str:
    """The rule that maps teacher layers to the student's k layers: `strategy` itself, or
    `depth` when the teacher has fewer layers than the student (see `select_layers`)."""
    if k > n_teacher and strategy in MAPS_SHALLOWER_TEACHER:
        return "depth"
    return strategy


def select_layers(strategy: str, scores: Sequence[float], k: int, seed: int = 0) -> list[int]:
    """Indices of the k teacher layers that feed the student's k layers, in order.

    A teacher with fewer layers than the student is mapped by relative depth (`depth`: teacher
    layers repeat, in order) under `sensitivity`, `uniform` and `depth`; `first`, `last` and
    `random`, which pick distinct layers, refuse it.
    """
    _lookup(LAYER_SELECTORS, "layer selection", strategy)
    scores = [float(s) for s in scores]
    if k < 1:
        raise UserError(f"the student needs at least one layer, got {k}")
    if not scores:
        raise UserError("the teacher has no decoder layers")
    if k > len(scores) and strategy not in MAPS_SHALLOWER_TEACHER:
        raise UserError(
            f"teacher has fewer layers ({len(scores)}) than the student ({k}): --layers "
            f"{strategy} cannot select {k} distinct layers (use --layers depth: each student "
            "layer takes the teacher layer at the same relative depth)"
        )
    selector = LAYER_SELECTORS[layer_rule(strategy, len(scores), k)]
    if any(math.isnan(s) for s in scores):
        raise UserError("layer sensitivity scores contain NaN: cannot rank teacher layers")
    return selector(scores, k, _generator(seed))
