"""Extraction benchmark at real Llama-2 13B -> 7B shapes: window search, block, rank-r SVD.

Random tensors stand in for the teacher's weights and sensitivity (fp32, seeded per module;
generating them is not timed). For every module of ``--layers`` teacher layers (q, k, v, o:
5120² -> 4096²; gate, up: 13824x5120 -> 11008x4096; down: 5120x13824 -> 4096x11008) plus the
embedding (stored [32000, 5120], searched transposed as [5120, 32000] -> [4096, 32000]) and
lm_head ([32000, 5120] -> [32000, 4096]) it times

* ``window``      ``paratransfer.extract.strategies.best_window`` (all positions scored at once);
* ``take``        ``Selection.take`` (a view: the copy happens inside the SVD);
* ``auto``        ``factorize(..., method="auto")``, the default: block Krylov until its
                  certificate holds (``paratransfer.extract.certified_svd``);
* ``randomized``  ``factorize(..., method="randomized")`` (fixed sketch, unchecked);
* ``exact``       ``factorize(..., method="exact")`` (economy SVD). It takes tens of seconds per
                  module, so by default it is timed once per shape class (4096², 11008x4096,
                  32000x4096) and that time is reused for same-sized and transposed modules.
                  On those modules ``auto`` and ``randomized`` are compared with it: largest
                  relative error of the top-r singular values, and excess of the residual
                  ‖W − BA‖²_F (computed) over the exact rank-r residual.

and extrapolates the per-module means to the whole extraction (32 layers x 7 modules + embed +
lm_head), against the goal of < 5 minutes on this 2-core machine with the default SVD.

The naive reference (the paper's release) builds a float64 summed-area table and visits every
top-left position in a Python double loop with four table look-ups each. It is timed on a band
of whole position-rows (``--naive-positions`` positions per shape class, evenly spread), checked
against ours on that band, and extrapolated to every position of every module. The reported
end-to-end ratio gives both pipelines the same block taking and factorization, so it isolates
what the window search costs. (``bench_extract_command.py`` times the whole command against the
paper's approach, its loop and full SVDs, on one layer.)

Every phase is timed on the wall clock and on process CPU time. The machine's two cores may be
shared with other jobs (the report prints the load average, /proc/pressure/cpu and the CPU
share this run got); then wall times are inflated and CPU times are the steadier estimate:
for torch's 2-thread work CPU time is up to twice the uncontended wall time (pessimistic for
us), for the single-threaded naive loop about equal to it.

Run: ``.venv/bin/python bench/bench_extract.py [--layers N] [--out bench/results/extract.json]``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from paratransfer.extract.factorize import DEFAULT_METHOD, factorize
from paratransfer.extract.strategies import Selection, best_window, window_sums
from paratransfer.sensitivity.accumulate import sum64

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "extract.json"

TEACHER = {"hidden": 5120, "mlp": 13824, "layers": 40, "vocab": 32000}  # Llama-2 13B
STUDENT = {"hidden": 4096, "mlp": 11008, "layers": 32, "vocab": 32000}  # Llama-2 7B

GOAL_SECONDS = 300.0  # whole extraction
SVD_METHODS = ("auto", "randomized", "exact")
APPROXIMATE = ("auto", "randomized")  # compared with exact where exact was timed


# --------------------------------------------------------------------------- modules


@dataclass(frozen=True)
class ModuleKind:
    """One teacher matrix kind, in the orientation the window search sees it."""

    name: str
    teacher: tuple[int, int]
    student: tuple[int, int]
    count: int  # how many of these a whole extraction reduces
    transposed: bool = False  # stored [vocab, d], searched as the [d, vocab] view

    @property
    def positions(self) -> int:
        """Top-left positions a window search has to score."""
        return (self.teacher[0] - self.student[0] + 1) * (self.teacher[1] - self.student[1] + 1)

    @property
    def svd_class(self) -> str:
        """Modules whose exact SVD costs the same (same block size, either orientation)."""
        a, b = sorted(self.student, reverse=True)
        return f"{a}x{b}"


def module_kinds(teacher: dict, student: dict) -> list[ModuleKind]:
    """The seven per-layer matrices of a Llama layer, then the embedding and the head."""
    th, tm, vocab = teacher["hidden"], teacher["mlp"], teacher["vocab"]
    sh, sm, layers = student["hidden"], student["mlp"], student["layers"]
    attn = [ModuleKind(n, (th, th), (sh, sh), layers) for n in ("q", "k", "v", "o")]
    mlp = [ModuleKind(n, (tm, th), (sm, sh), layers) for n in ("gate", "up")]
    return [
        *attn,
        *mlp,
        ModuleKind("down", (th, tm), (sh, sm), layers),
        ModuleKind("embed", (th, vocab), (sh, vocab), 1, transposed=True),
        ModuleKind("lm_head", (vocab, th), (vocab, sh), 1),
    ]


def teacher_tensors(kind: ModuleKind, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-in teacher weight (~N(0, 0.02²)) and non-negative sensitivity, as searched."""
    g = torch.Generator().manual_seed(seed)
    shape = kind.teacher[::-1] if kind.transposed else kind.teacher
    weight = torch.randn(shape, generator=g).mul_(0.02)
    sens = torch.rand(shape, generator=g)
    if kind.transposed:
        return weight.T, sens.T
    return weight, sens


# --------------------------------------------------------------------------- timing

CLOCKS = {"wall": "_s", "cpu": "_cpu_s"}  # key suffix of each clock in the result rows


def timed(fn: Callable[..., object], *args: object, **kwargs: object) -> tuple[dict, object]:
    """Wall and process-CPU seconds of one call (keyed by CLOCKS suffix), and its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return {"_s": time.perf_counter() - wall, "_cpu_s": time.process_time() - cpu}, out


def record(row: dict, phase: str, timing: dict) -> None:
    """Store a phase's seconds under both clocks: window_s, window_cpu_s, ..."""
    for suffix, seconds in timing.items():
        row[phase + suffix] = seconds


def warm_up(rank: int) -> None:
    """First calls load LAPACK kernels and allocator pools; keep that out of the numbers."""
    small = torch.rand(256, 192)
    best_window(small, 200, 150)
    for method in SVD_METHODS:
        factorize(small, rank, method)
    factorize(torch.rand(1200, 900), rank, "auto")  # the Krylov path, not the small-block one


def residual(block: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """‖W − B A‖²_F, in float64 sums, a few thousand rows at a time."""
    total = 0.0
    for rows, b_rows in zip(block.split(2048), b.split(2048), strict=True):
        total += sum64((rows - b_rows @ a).square_())
    return total


def time_module(kind: ModuleKind, seed: int, rank: int, exact: bool) -> dict:
    """Window search, block taking and factorization(s) of one teacher module.

    Where the exact SVD is timed, the other methods' singular values and residuals are kept
    for the fidelity comparison.
    """
    weight, sens = teacher_tensors(kind, seed)
    rows, cols = kind.student
    row: dict = {"module": kind.name}
    timing, (r0, c0) = timed(best_window, sens, rows, cols)
    record(row, "window", timing)
    row["window"] = [r0, c0]
    del sens
    selection = Selection(
        rows=torch.arange(r0, r0 + rows), cols=torch.arange(c0, c0 + cols), window=(r0, c0)
    )
    timing, block = timed(selection.take, weight)
    record(row, "take", timing)
    for method in SVD_METHODS if exact else SVD_METHODS[:-1]:
        timing, factors = timed(factorize, block, rank, method, seed=seed)
        record(row, method, timing)
        row[f"{method}_energy"] = factors.energy
        if method == "auto":
            row["auto_svd"] = factors.svd
        if exact:
            row[f"{method}_sigma"] = factors.B.double().norm(dim=0).tolist()
            row[f"{method}_residual"] = residual(block, factors.B, factors.A)
        del factors
    if exact:
        row["fidelity"] = fidelity(row)
    del weight, block
    gc.collect()
    return row


def fidelity(row: dict) -> dict:
    """Each approximate method against the exact SVD on one block."""
    sigma = torch.tensor(row["exact_sigma"], dtype=torch.float64)
    best = row["exact_residual"]
    out = {}
    for method in APPROXIMATE:
        got = torch.tensor(row[f"{method}_sigma"], dtype=torch.float64)
        out[method] = {
            "sigma_max_rel_error": float(((got - sigma).abs() / sigma).max()),
            "excess_residual": (row[f"{method}_residual"] - best) / best,
        }
    return out


SPECTRA = {  # the comparison: how far a fixed sketch lands depends on the spectrum
    "σ_i ∝ 1/i": lambda i: 1.0 / i,
    "σ_i ∝ 1/√i": lambda i: i**-0.5,
    "Gaussian (flat)": None,
}


def time_spectra(size: int, rank: int, seed: int) -> list[dict]:
    """auto, randomized and exact on size² matrices with decaying and flat spectra."""
    out = []
    for name, decay in SPECTRA.items():
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(size, size, generator=g)
        if decay is not None:
            u = torch.linalg.qr(w)[0]
            v = torch.linalg.qr(torch.randn(size, size, generator=g))[0]
            w = (u * decay(torch.arange(1, size + 1, dtype=torch.float32))) @ v.T
        row: dict = {"spectrum": name, "module": name}
        for method in SVD_METHODS:
            timing, factors = timed(factorize, w, rank, method, seed=seed)
            record(row, method, timing)
            row[f"{method}_sigma"] = factors.B.double().norm(dim=0).tolist()
            row[f"{method}_residual"] = residual(w, factors.B, factors.A)
            if method == "auto":
                row["auto_svd"] = factors.svd
        row["fidelity"] = fidelity(row)
        out.append(row)
        print(f"  {size}² {name:16} auto {row['auto_s']:.2f} s ({row['auto_svd']['steps']} "
              f"steps), randomized {row['randomized_s']:.2f} s, exact {row['exact_s']:.2f} s",
              flush=True)
    return out


# --------------------------------------------------------------------------- naive reference


def summed_area_table(sens: torch.Tensor) -> torch.Tensor:
    """The reference's table: zero-padded [m+1, n+1] float64 double cumulative sum."""
    m, n = sens.shape
    table = torch.zeros(m + 1, n + 1, dtype=torch.float64)
    table[1:, 1:] = sens.to(torch.float64).cumsum(0).cumsum(1)
    return table


def naive_scan(table: torch.Tensor, rows: int, cols: int, position_rows: list[int]) -> tuple:
    """The reference's Python double loop: four table look-ups per top-left position."""
    n_cols = table.shape[1] - cols
    best, where = None, None
    for i in position_rows:
        for j in range(n_cols):
            total = (
                table[i + rows, j + cols] - table[i, j + cols] - table[i + rows, j] + table[i, j]
            )
            if best is None or total > best:
                best, where = total, (i, j)
    return where, float(best)


def band(kind: ModuleKind, positions: int) -> list[int]:
    """Evenly spread position-rows holding about `positions` top-left positions."""
    n_rows = kind.teacher[0] - kind.student[0] + 1
    n_cols = kind.teacher[1] - kind.student[1] + 1
    k = max(1, min(n_rows, round(positions / n_cols)))
    if k == 1:
        return [0]
    return sorted({round(i * (n_rows - 1) / (k - 1)) for i in range(k)})


def time_naive(kind: ModuleKind, seed: int, positions: int) -> dict:
    """Table build and per-position loop cost of the reference on one module, checked."""
    _, sens = teacher_tensors(kind, seed)
    rows, cols = kind.student
    row: dict = {"module": kind.name}
    table_time, table = timed(summed_area_table, sens)
    position_rows = band(kind, positions)
    loop_time, (where, best) = timed(naive_scan, table, rows, cols, position_rows)
    del table
    scanned = len(position_rows) * (kind.teacher[1] - cols + 1)
    ours = window_sums(sens, rows, cols)[position_rows]
    i, j = divmod(int(ours.argmax()), ours.shape[1])
    row["agrees_with_ours"] = (position_rows[i], j) == where and abs(
        float(ours[i, j]) - best
    ) <= 1e-9 * abs(best)
    del sens, ours
    gc.collect()
    row["positions_scanned"] = scanned
    record(row, "table", table_time)
    record(row, "loop", loop_time)
    for suffix in CLOCKS.values():
        per_position = loop_time[suffix] / scanned
        row["per_position_us" + suffix[:-2]] = per_position * 1e6
        row["module" + suffix] = table_time[suffix] + per_position * kind.positions
    return row


# --------------------------------------------------------------------------- summary


def machine_info() -> dict:
    """CPU model, cores, RAM, torch, and how busy the machine was (timings are wall clock)."""
    info: dict = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    for path, key, prefix in (
        ("/proc/cpuinfo", "cpu", "model name"),
        ("/proc/meminfo", "ram_gib", "MemTotal:"),
    ):
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(prefix):
                    value = line.split(":", 1)[1].strip()
                    info[key] = (
                        round(int(value.split()[0]) / 2**20, 1) if key == "ram_gib" else value
                    )
                    break
        except OSError:
            pass
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    info["python"] = platform.python_version()
    info["load_average"] = list(os.getloadavg())
    try:  # share of time some task waited for a CPU: other jobs on the host inflate timings
        info["cpu_pressure"] = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        pass
    return info


def mean_by_module(rows: list[dict], key: str) -> dict[str, float]:
    """Mean of `key` per module name over the rows that measured it."""
    names = {r["module"] for r in rows if key in r}
    return {
        n: statistics.fmean(r[key] for r in rows if r["module"] == n and key in r) for n in names
    }


def extrapolate(kinds: list[ModuleKind], rows: list[dict], naive: list[dict], suffix: str) -> dict:
    """Whole-extraction seconds per phase on one clock (key suffix), ours vs the naive search."""
    window = mean_by_module(rows, "window" + suffix)
    take = mean_by_module(rows, "take" + suffix)
    svd_class = {k.name: k.svd_class for k in kinds}
    per_method: dict[str, dict[str, float]] = {}
    for method in SVD_METHODS[:-1]:
        per_method[method] = mean_by_module(rows, method + suffix)
    # exact SVD measured on a few modules: reuse per shape class (same size, either orientation)
    measured_exact = mean_by_module(rows, "exact" + suffix)
    by_class: dict[str, list[float]] = {}
    for name, seconds in measured_exact.items():
        by_class.setdefault(svd_class[name], []).append(seconds)
    per_method["exact"] = {
        k.name: statistics.fmean(by_class[k.svd_class]) for k in kinds if k.svd_class in by_class
    }
    # the naive search was timed once per teacher shape (q stands for k, v, o)
    by_shape = {
        k.teacher: r["module" + suffix] for r in naive for k in kinds if k.name == r["module"]
    }
    naive_window = {k.name: by_shape[k.teacher] for k in kinds}

    def total(per_module: dict[str, float]) -> float | None:
        if len(per_module) < len(kinds):
            return None
        return sum(k.count * per_module[k.name] for k in kinds)

    out: dict = {"window_s": total(window), "take_s": total(take),
                 "naive_window_s": total(naive_window)}
    out["window_speedup"] = out["naive_window_s"] / out["window_s"]
    for method in SVD_METHODS:
        factorizing = total(per_method[method])
        out[f"{method}_s"] = factorizing
        if factorizing is None:
            continue
        ours = out["window_s"] + out["take_s"] + factorizing
        out[f"ours_total_{method}_s"] = ours
        out[f"naive_total_{method}_s"] = ours - out["window_s"] + out["naive_window_s"]
        out[f"ratio_{method}"] = out[f"naive_total_{method}_s"] / ours
        out[f"goal_met_{method}"] = ours < GOAL_SECONDS
    out["per_module"] = {
        k.name: {
            "count": k.count,
            "positions": k.positions,
            "window_s": window[k.name],
            "take_s": take[k.name],
            **{f"{m}_s": per_method[m].get(k.name) for m in SVD_METHODS},
            "exact_measured_on": sorted(n for n in measured_exact if svd_class[n] == k.svd_class),
            "naive_window_s": naive_window[k.name],
        }
        for k in kinds
    }
    return out


def fmt_s(seconds: float | None) -> str:
    """Seconds, or minutes/hours when large."""
    if seconds is None:
        return "-"
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.0f} s"


def summary(result: dict) -> list[dict]:
    """The headline rows of BENCHMARKS.md's summary table."""
    x = result["extrapolated"]["wall"]
    total = x[f"ours_total_{DEFAULT_METHOD}_s"]
    rows = [{
        "what": "`extract` at Llama-2 13B→7B shapes (every module, rank 16, default `--svd "
                f"{DEFAULT_METHOD}`), extrapolated from {result['config']['layers']} timed layers",
        "headline": f"{fmt_s(total)} (exact SVD: {fmt_s(x.get('ours_total_exact_s'))})",
        "goal": f"< {GOAL_SECONDS / 60:g} min",
        "met": total < GOAL_SECONDS,
    }]
    worst = worst_fidelity(result, DEFAULT_METHOD)
    if worst is not None:
        rows.append({
            "what": f"`--svd {DEFAULT_METHOD}` against the exact SVD on the "
                    f"{len(fidelity_rows(result))} blocks where that was timed",
            "headline": f"σ within {worst['sigma_max_rel_error']:.1e}, residual within "
                        f"{max(worst['excess_residual'], 0.0):.1e} (relative)",
            "goal": "≤ 1e-4 both",
            "met": worst["sigma_max_rel_error"] <= 1e-4 and worst["excess_residual"] <= 1e-4,
        })
    return rows


def fidelity_rows(result: dict) -> list[dict]:
    return [r for r in result["modules"] if "fidelity" in r]


def worst_fidelity(result: dict, method: str) -> dict | None:
    """The largest σ error and excess residual of `method` over the compared blocks."""
    rows = fidelity_rows(result)
    if not rows:
        return None
    return {key: max(r["fidelity"][method][key] for r in rows)
            for key in ("sigma_max_rel_error", "excess_residual")}


def to_markdown(result: dict) -> str:
    """BENCHMARKS.md section: whole-extraction totals per SVD method, fidelity against exact."""
    cfg, m = result["config"], result["machine"]
    x = result["extrapolated"]["wall"]
    n = result["naive"]
    kinds = {k["name"]: k for k in result["kinds"]}
    lines = [
        f"Llama-2 13B → 7B shapes (q/k/v/o 5120² → 4096², gate/up/down 13824×5120 → 11008×4096, "
        f"embed and head with a {STUDENT['vocab']}-token vocabulary); random stand-in weights "
        f"(N(0, 0.02²)) and sensitivities. Every module of {cfg['layers']} teacher layer(s), the "
        f"embedding and the head was timed at rank {cfg['rank']} (window search, block, SVD) "
        f"and the per-module means extrapolated to {STUDENT['layers']} layers. "
        f"{m.get('torch_threads')} threads; this run got {result['cpu_share']:.2f} CPU-seconds "
        f"per wall second (load average at the end {m['load_average'][0]:.1f}).",
        "",
        "| `--svd` | factorizing | window search | whole extraction | goal < 5 min "
        "| vs. the paper's window loop, same SVD |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for method in SVD_METHODS:
        if f"ours_total_{method}_s" not in x:
            continue
        label = f"`{method}`" + (" (default)" if method == DEFAULT_METHOD else "")
        met = "met" if x[f"goal_met_{method}"] else "not met"
        lines.append(f"| {label} | {fmt_s(x[f'{method}_s'])} | {fmt_s(x['window_s'])} | "
                     f"**{fmt_s(x[f'ours_total_{method}_s'])}** | {met} | "
                     f"{x[f'ratio_{method}']:.1f}× |")
    rows = fidelity_rows(result)
    if rows:
        lines += [
            "",
            "Against the exact SVD, on the blocks where it was timed (σ: largest relative error "
            "of the top-r singular values; residual: (‖W − BA‖²_F − exact) / exact, computed):",
            "",
            "| block | `auto`: Krylov steps, seconds | σ | residual | certificate's estimate "
            "| `randomized`: σ | residual |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            f, svd = r["fidelity"], r["auto_svd"]
            shape = "×".join(map(str, kinds[r["module"]]["student"]))
            lines.append(
                f"| {r['module']} {shape} | {svd['method']} {svd['steps']}, {r['auto_s']:.2f} s "
                f"| {f['auto']['sigma_max_rel_error']:.1e} | {f['auto']['excess_residual']:.1e} "
                f"| {svd['excess_estimate']:.1e} "
                f"| {f['randomized']['sigma_max_rel_error']:.1e} "
                f"| {f['randomized']['excess_residual']:.1e} |")
    if result.get("spectra"):
        size = result["config"].get("spectra_size", 2048)
        lines += [
            "",
            f"By spectrum, {size}×{size} matrices, rank {cfg['rank']} (seconds; σ and residual "
            "against exact, as above):",
            "",
            "| spectrum | `auto` | steps | σ | residual | `randomized` | σ | residual "
            "| `exact` |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["spectra"]:
            f = r["fidelity"]
            lines.append(
                f"| {r['spectrum']} | {r['auto_s']:.2f} | {r['auto_svd']['steps']} "
                f"| {f['auto']['sigma_max_rel_error']:.1e} | {f['auto']['excess_residual']:.1e} "
                f"| {r['randomized_s']:.2f} | {f['randomized']['sigma_max_rel_error']:.1e} "
                f"| {f['randomized']['excess_residual']:.1e} | {r['exact_s']:.2f} |")
    steps = [r["auto_svd"]["steps"] for r in result["modules"]]
    lines += [
        "",
        f"- `auto` on all {len(steps)} timed blocks: {min(steps)}–{max(steps)} Krylov steps, "
        f"{sum(r['auto_svd']['method'] == 'exact' for r in result['modules'])} fell back to the "
        "exact SVD",
        f"- Window search: ours {fmt_s(x['window_s'])} against the paper's Python loop "
        f"{fmt_s(x['naive_window_s'])} ({x['window_speedup']:.0f}×; the loop timed at "
        f"{statistics.fmean(r['per_position_us'] for r in n):.1f} µs/position on "
        f"{sum(r['positions_scanned'] for r in n):,} sampled positions, same best position: "
        f"{'yes' if all(r['agrees_with_ours'] for r in n) else 'NO'})",
        f"- Benchmark wall time {fmt_s(result['bench_wall_s'])}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2, help="teacher layers timed in full")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument(
        "--exact",
        choices=("per-shape", "all", "none"),
        default="per-shape",
        help="modules whose exact SVD is timed: one per shape class, all, none",
    )
    p.add_argument(
        "--naive-positions",
        type=int,
        default=20_000,
        help="top-left positions the naive loop visits per shape class",
    )
    p.add_argument("--spectra-size", type=int, default=2048,
                   help="side of the matrices with chosen spectra (0: skip that comparison)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Time every module of the sampled layers, the embed and head, and the naive reference."""
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = module_kinds(TEACHER, STUDENT)
    started, started_cpu = time.perf_counter(), time.process_time()
    warm_up(args.rank)
    rows, exact_classes = [], set()
    layer_kinds = [k for k in kinds if k.count > 1]
    once = [k for k in kinds if k.count == 1]
    plan = [(layer, k) for layer in range(args.layers) for k in layer_kinds] + [
        (None, k) for k in once
    ]
    for index, (layer, kind) in enumerate(plan):
        exact = args.exact == "all" or (
            args.exact == "per-shape" and kind.svd_class not in exact_classes
        )
        if exact:
            exact_classes.add(kind.svd_class)
        row = time_module(kind, args.seed * 1000 + index, args.rank, exact)
        row["layer"] = layer
        rows.append(row)
        print(
            f"  layer {layer if layer is not None else '-':>2} {kind.name:8} window "
            f"{row['window_s']:.3f} s, svd auto {row['auto_s']:.3f} s "
            f"({row['auto_svd']['method']}, {row['auto_svd']['steps']} steps), randomized "
            f"{row['randomized_s']:.3f} s"
            + (f", exact {row['exact_s']:.1f} s" if "exact_s" in row else ""),
            flush=True,
        )
    spectra = time_spectra(args.spectra_size, args.rank, args.seed) if args.spectra_size else []
    naive = []
    seen_shapes = set()
    for kind in kinds:
        if kind.teacher in seen_shapes:
            continue
        seen_shapes.add(kind.teacher)
        naive.append(time_naive(kind, args.seed * 1000 + 999, args.naive_positions))
        print(
            f"  naive {kind.name:8} {naive[-1]['per_position_us']:.1f} µs/position, "
            f"table {naive[-1]['table_s']:.2f} s",
            flush=True,
        )
    return {
        "benchmark": "extract",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            "layers": args.layers,
            "rank": args.rank,
            "exact": args.exact,
            "naive_positions": args.naive_positions,
            "spectra_size": args.spectra_size,
            "seed": args.seed,
            "teacher": TEACHER,
            "student": STUDENT,
        },
        "goals": {"total_s": GOAL_SECONDS},
        "kinds": [
            {
                "name": k.name,
                "teacher": list(k.teacher),
                "student": list(k.student),
                "count": k.count,
                "transposed": k.transposed,
            }
            for k in kinds
        ],
        "modules": rows,
        "spectra": spectra,
        "naive": naive,
        "extrapolated": {
            clock: extrapolate(kinds, rows, naive, suffix) for clock, suffix in CLOCKS.items()
        },
        "bench_wall_s": time.perf_counter() - started,
        "cpu_share": (time.process_time() - started_cpu) / (time.perf_counter() - started),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the summary, write the JSON file, return the result."""
    args = parse_args(argv)
    result = run(args)
    print(to_markdown(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
