"""Sensitivity benchmark: peak resident memory and seconds per sample, three approaches.

On a ~50M-parameter random Llama (fp32) and short random samples (so weights, not activations,
dominate memory, as they do for real 7B+ teachers), each approach runs in its own fresh
subprocess so its peak RSS is clean:

* ``plain``        one forward+backward per sample, gradients set to None between samples
                   (the floor: what any gradient-based method must pay);
* ``naive``        keep every gradient, build a per-sample ``{name: |θ·g|}`` dict, add it into a
                   running fp32 dict;
* ``paratransfer`` ``paratransfer.sensitivity.accumulate.accumulate_sensitivity`` (post-accumulate-grad
                   hooks fold each gradient into its accumulator and free it at once).

Peak memory is ``ru_maxrss`` at the end minus the RSS measured just before the model is built
(libraries are imported and warmed up on a tiny model first, so the baseline holds the runtime).
Seconds per sample are the median over the samples after one warm-up sample.

Timings on a shared machine: two-thread kernels stall badly when another process takes a core,
so every sample also records how much CPU *other* processes used meanwhile (from /proc/stat).
The ratios use the median over the "quiet" samples (other load <= BUSY) of all rounds when there
are enough of them, and are flagged as unreliable otherwise.

Goals (project issue): peak_paratransfer / peak_naive <= 0.6 and
time_paratransfer / time_plain <= 1.10.

Run: ``.venv/bin/python bench/bench_sensitivity.py`` (``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import busy_cpu_seconds, cpu_name, save_result

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "sensitivity.json"
MODES = ("plain", "naive", "paratransfer")

#: ~51.7M parameters: 2 x 32000 x 512 (embedding + untied head) + 6 x 3.16M (decoder layers).
DEFAULTS = dict(vocab=32000, hidden=512, layers=6, heads=8, mlp=1376, seq=64, samples=8, seed=0)

GOAL_MEMORY = 0.6   # peak_paratransfer / peak_naive
GOAL_TIME = 1.10    # time_paratransfer / time_plain

#: A sample is "quiet" when other processes used at most this share of the machine's CPU.
BUSY = 0.10
#: Quiet samples (over all rounds) needed per approach to judge the time goal.
MIN_QUIET = 3

MiB = 1024 * 1024


# --------------------------------------------------------------------------- machine

def machine_info() -> dict:
    """CPU model, cores, RAM and library versions, for the report."""
    cpu = cpu_name()
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram,
            "python": platform.python_version(), "platform": platform.platform()}
    for lib in ("torch", "transformers"):
        try:
            info[lib] = __import__(lib).__version__
        except ImportError:  # pragma: no cover
            info[lib] = None
    return info


def machine_line(info: dict) -> str:
    return (f"{info.get('cpu')}, {info.get('cores')} cores, {info.get('ram_gib')} GiB RAM, "
            f"torch {info.get('torch')}, transformers {info.get('transformers')}, "
            f"Python {info.get('python')}")


# --------------------------------------------------------------------------- child side

def _rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


class Clock:
    """Marks sample boundaries: wall time, and the CPU other processes used in between.

    ``intervals()`` gives one ``{seconds, cpu_seconds, other_load}`` per pair of consecutive
    marks: wall seconds, this process's CPU seconds (all threads), and the other processes' CPU
    seconds over (wall seconds × cores), ~0 on a quiet machine, up to 1 when others keep every
    core busy.
    """

    def __init__(self):
        self.marks: list[tuple[float, float, float | None]] = []

    def mark(self) -> None:
        self.marks.append((time.perf_counter(), time.process_time(), busy_cpu_seconds()))

    def intervals(self) -> list[dict]:
        cores = os.cpu_count() or 1
        out = []
        for (t0, c0, b0), (t1, c1, b1) in zip(self.marks, self.marks[1:], strict=False):
            share = None
            if b0 is not None and b1 is not None and t1 > t0:
                share = max(0.0, ((b1 - b0) - (c1 - c0)) / ((t1 - t0) * cores))
            out.append({"seconds": t1 - t0, "cpu_seconds": c1 - c0, "other_load": share})
        return out


def make_samples(cfg: dict) -> list[dict]:
    """`samples`+1 random samples (the first is the warm-up): labels -100 on the first half."""
    import torch

    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    out = []
    for _ in range(cfg["samples"] + 1):
        ids = torch.randint(10, cfg["vocab"], (cfg["seq"],), generator=g).tolist()
        half = cfg["seq"] // 2
        out.append({"input_ids": ids, "labels": [-100] * half + ids[half:]})
    return out


def _warm_up_runtime() -> None:
    """Load everything lazily initialised (modules, oneDNN/SDPA kernels, autograd threads) on a
    tiny model, so it is part of the baseline rather than of any approach's peak."""
    import gc

    import torch

    from paratransfer.demo.tiny import tiny_model

    tiny = tiny_model("llama", vocab=64, hidden=32, layers=1, heads=4, mlp=64, seed=0)
    ids = torch.randint(10, 64, (1, 16))
    tiny(input_ids=ids, labels=ids).loss.backward()
    del tiny, ids
    gc.collect()


def _model_inputs(sample: dict):
    import torch
    return torch.tensor([sample["input_ids"]]), torch.tensor([sample["labels"]])


def _checksum(tensors) -> float:
    """Σ of all values in float64, one small chunk at a time (no full-size float64 copies)."""
    import torch

    total = 0.0
    for v in tensors:
        for chunk in v.reshape(-1).split(1 << 16):
            total += float(chunk.sum(dtype=torch.float64))
    return total


# Each runner marks the clock at the start of every sample and once after the last one, and
# returns what the checksum is computed from (after the peak has been read), or None.

def _run_plain(model, samples, clock: Clock):
    for s in samples:
        clock.mark()
        model.zero_grad(set_to_none=True)  # frees the previous sample's gradients
        ids, labels = _model_inputs(s)
        loss = model(input_ids=ids, labels=labels).loss
        loss.item()
        loss.backward()
    model.zero_grad(set_to_none=True)
    clock.mark()
    return None


def _run_naive(model, samples, clock: Clock):
    import torch

    params = list(model.named_parameters())
    running = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params}
    for s in samples:
        clock.mark()
        model.zero_grad(set_to_none=True)
        ids, labels = _model_inputs(s)
        loss = model(input_ids=ids, labels=labels).loss
        loss.item()
        loss.backward()
        per_sample = {n: (p.detach() * p.grad).abs() for n, p in params if p.grad is not None}
        for n, v in per_sample.items():
            running[n].add_(v)
        del per_sample  # only one per-sample dict alive at a time
    model.zero_grad(set_to_none=True)
    clock.mark()
    return running


def _run_paratransfer(model, samples, clock: Clock):
    from paratransfer.sensitivity.accumulate import accumulate_sensitivity

    def marked():
        for s in samples:
            clock.mark()  # end of the previous sample, start of this one
            yield s

    acc, used = accumulate_sensitivity(model, marked())
    clock.mark()
    assert used == len(samples), (used, len(samples))
    return acc


RUNNERS = {"plain": _run_plain, "naive": _run_naive, "paratransfer": _run_paratransfer}


def run_mode(mode: str, cfg: dict) -> dict:
    """Measure one approach in *this* process (call it in a fresh one)."""
    import gc

    import torch

    torch.set_num_threads(2)
    import transformers.models.llama.modeling_llama  # noqa: F401  (import before the baseline)
    from tqdm.auto import tqdm  # noqa: F401  (accumulate_sensitivity imports it lazily)

    import paratransfer.sensitivity.accumulate  # noqa: F401
    from paratransfer.demo.tiny import tiny_model

    _warm_up_runtime()
    samples = make_samples(cfg)
    gc.collect()
    baseline = _rss_bytes()
    t0 = time.perf_counter()
    model = tiny_model("llama", vocab=cfg["vocab"], hidden=cfg["hidden"], layers=cfg["layers"],
                       heads=cfg["heads"], mlp=cfg["mlp"], seed=cfg["seed"])
    build_s = time.perf_counter() - t0
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    weights_rss = _rss_bytes() - baseline
    clock = Clock()
    sums = RUNNERS[mode](model, samples, clock)
    peak = _peak_rss_bytes() - baseline  # before the checksum, which needs a little memory
    intervals = clock.intervals()
    timed = intervals[1:]  # the first sample is the warm-up
    secs = [s["seconds"] for s in timed]
    shares = [s["other_load"] for s in timed if s["other_load"] is not None]
    return {
        "mode": mode,
        "params": n_params,
        "weights_mib": n_params * 4 / MiB,
        "baseline_rss_mib": baseline / MiB,
        "model_rss_mib": weights_rss / MiB,
        "peak_above_baseline_mib": peak / MiB,
        "seconds_per_sample": statistics.median(secs),
        "seconds_min": min(secs),
        "seconds_max": max(secs),
        "cpu_seconds_per_sample": statistics.median(s["cpu_seconds"] for s in timed),
        "warmup_seconds": intervals[0]["seconds"],
        "samples_timed": len(secs),
        "per_sample": timed,
        "other_load": statistics.mean(shares) if shares else None,
        "build_seconds": build_s,
        "checksum": _checksum(sums.values()) if sums is not None else None,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


# --------------------------------------------------------------------------- parent side

def _spawn(mode: str, cfg: dict, timeout: float = 900, passive: bool = False) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--mode", mode,
           "--config", json.dumps(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"mode {mode} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"mode {mode}: no result on stdout:\n{proc.stdout[-2000:]}")


def combine(runs: list[dict]) -> dict:
    """One approach over all its rounds.

    Memory: the highest peak of the rounds (it barely varies; the conservative choice).
    Time: the median over the quiet samples of all rounds when there are at least MIN_QUIET,
    else the median over all samples (flagged ``reliable: False``).
    """
    samples = [s for r in runs for s in r["per_sample"]]
    quiet = [s["seconds"] for s in samples
             if s["other_load"] is not None and s["other_load"] <= BUSY]
    secs = [s["seconds"] for s in samples]
    loads = [r["other_load"] for r in runs if r["other_load"] is not None]
    first = runs[0]
    return {
        "params": first["params"],
        "weights_mib": first["weights_mib"],
        "peak_above_baseline_mib": max(r["peak_above_baseline_mib"] for r in runs),
        "peak_rounds_mib": [r["peak_above_baseline_mib"] for r in runs],
        "seconds_per_sample": statistics.median(quiet if len(quiet) >= MIN_QUIET else secs),
        "seconds_median_all": statistics.median(secs),
        "cpu_seconds_per_sample": statistics.median(s["cpu_seconds"] for s in samples),
        "seconds_min": min(secs),
        "seconds_max": max(secs),
        "samples_timed": len(secs),
        "quiet_samples": len(quiet),
        "reliable": len(quiet) >= MIN_QUIET,
        "other_load": statistics.mean(loads) if loads else None,
        "checksum": first["checksum"],
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarise(all_runs: dict[str, list[dict]], cfg: dict, info: dict) -> dict:
    runs = {mode: combine(rs) for mode, rs in all_runs.items()}
    plain, naive, para = runs["plain"], runs["naive"], runs["paratransfer"]
    mem_ratio = _ratio(para["peak_above_baseline_mib"], naive["peak_above_baseline_mib"])
    time_ratio = _ratio(para["seconds_per_sample"], plain["seconds_per_sample"])
    time_reliable = plain["reliable"] and para["reliable"]
    check_diff = None
    if naive["checksum"] and para["checksum"] is not None:
        check_diff = abs(para["checksum"] - naive["checksum"]) / abs(naive["checksum"])
    return {
        "benchmark": "sensitivity",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": info,
        "config": cfg,
        "rounds": len(all_runs["plain"]),
        "params": para["params"],
        "weights_mib": para["weights_mib"],
        "runs": runs,
        "ratios": {
            "peak_paratransfer_over_naive": mem_ratio,
            "peak_paratransfer_over_plain": _ratio(para["peak_above_baseline_mib"],
                                                   plain["peak_above_baseline_mib"]),
            "time_paratransfer_over_plain": time_ratio,
            "time_paratransfer_over_naive": _ratio(para["seconds_per_sample"],
                                                   naive["seconds_per_sample"]),
            "time_naive_over_plain": _ratio(naive["seconds_per_sample"],
                                            plain["seconds_per_sample"]),
            "cpu_time_paratransfer_over_plain": _ratio(para["cpu_seconds_per_sample"],
                                                       plain["cpu_seconds_per_sample"]),
        },
        "goals": {
            "memory": {"target": GOAL_MEMORY, "value": mem_ratio,
                       "met": mem_ratio is not None and mem_ratio <= GOAL_MEMORY},
            "time": {"target": GOAL_TIME, "value": time_ratio, "reliable": time_reliable,
                     "met": (time_ratio is not None and time_ratio <= GOAL_TIME)
                     if time_reliable else None},
        },
        "checksum_rel_diff_paratransfer_vs_naive": check_diff,
        "rounds_detail": all_runs,
    }


def _fmt(x, spec=".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def _verdict(goal: dict) -> str:
    if goal.get("met") is None:
        return "not judged: the machine was busy"
    return "met" if goal["met"] else "NOT met"


def summary(result: dict) -> list[dict]:
    """The headline rows of BENCHMARKS.md's summary table."""
    gm, gt = result["goals"]["memory"], result["goals"]["time"]
    what = f"sensitivity pass on a {result['params'] / 1e6:.1f}M-parameter random Llama"
    return [
        {"what": f"{what}: peak memory, ours / naive (every gradient kept)",
         "headline": _fmt(gm["value"]), "goal": f"≤ {gm['target']}", "met": gm["met"]},
        {"what": f"{what}: seconds per sample, ours / plain forward+backward",
         "headline": _fmt(gt["value"]), "goal": f"≤ {gt['target']:.2f}", "met": gt["met"]},
    ]


def to_markdown(result: dict) -> str:
    """The BENCHMARKS.md section body for this benchmark."""
    cfg, runs, r, goals = result["config"], result["runs"], result["ratios"], result["goals"]
    lines = [
        f"Random Llama, fp32: vocab {cfg['vocab']}, hidden {cfg['hidden']}, {cfg['layers']} "
        f"layers, {cfg['heads']} heads, MLP {cfg['mlp']} = **{result['params'] / 1e6:.1f}M "
        f"parameters** ({result['weights_mib']:.0f} MiB of weights). Each approach ran "
        f"{result['rounds']}× in its own fresh process (alternating order, 2 threads): one "
        f"warm-up sample, then {cfg['samples']} timed samples of {cfg['seq']} tokens (batch of "
        "one, loss on the second half).",
        "",
        "| approach | peak RSS above baseline (MiB) | × weights | s / sample (median) "
        "| min–max | CPU s / sample | quiet samples | other load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        m = runs[mode]
        lines.append(
            f"| {mode} | {m['peak_above_baseline_mib']:.0f} | "
            f"{m['peak_above_baseline_mib'] / m['weights_mib']:.2f} | "
            f"{m['seconds_per_sample']:.3f} | {m['seconds_min']:.3f}–{m['seconds_max']:.3f} | "
            f"{m['cpu_seconds_per_sample']:.3f} | {m['quiet_samples']}/{m['samples_timed']} | {_fmt(m['other_load'])} |")
    gm, gt = goals["memory"], goals["time"]
    lines += [
        "",
        f"- Peak memory, paratransfer / naive: **{_fmt(gm['value'])}** "
        f"(goal ≤ {gm['target']}: {_verdict(gm)})",
        f"- Seconds per sample, paratransfer / plain forward+backward: **{_fmt(gt['value'])}** "
        f"(goal ≤ {gt['target']:.2f}: {_verdict(gt)})",
        f"- Seconds per sample, paratransfer / naive: {_fmt(r['time_paratransfer_over_naive'])}; "
        f"naive / plain: {_fmt(r['time_naive_over_plain'])}",
        f"- Peak memory, paratransfer / plain: {_fmt(r['peak_paratransfer_over_plain'])}",
        f"- CPU seconds per sample, paratransfer / plain: "
        f"{_fmt(r['cpu_time_paratransfer_over_plain'])}"
        + (" (OMP_WAIT_POLICY=PASSIVE: threads sleep rather than spin, so CPU time counts work "
           "only and stays meaningful on a busy machine)" if cfg.get("passive") else
           " (includes OpenMP spin-waiting; meaningful on a busy machine only with `--passive`)"),
    ]
    if result.get("checksum_rel_diff_paratransfer_vs_naive") is not None:
        lines.append("- Σ sensitivity, paratransfer vs naive: relative difference "
                     f"{result['checksum_rel_diff_paratransfer_vs_naive']:.1e}")
    lines += [
        "",
        "Peak RSS is `ru_maxrss` minus the RSS just before the model was built (runtime "
        "imported and warmed up first). *Other load* is the share of the machine's CPU other "
        f"processes used while the samples ran; seconds per sample are the median over the "
        f"quiet samples (other load ≤ {BUSY}) of all rounds when there are at least {MIN_QUIET}, "
        "else over all samples.",
    ]
    if not gt.get("reliable", True):
        lines += ["", "**Warning:** too few quiet samples: other processes kept the CPU busy "
                  "during the timings, so the time figures and ratios are disturbed (two-thread "
                  "kernels stall when a core is shared). Re-run on a quiet machine."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=MODES, help="internal: measure one approach in this process")
    p.add_argument("--config", help="internal: JSON configuration for --mode")
    p.add_argument("--samples", type=int, default=DEFAULTS["samples"],
                   help="timed samples per approach and round (one more is run as warm-up)")
    p.add_argument("--seq", type=int, default=DEFAULTS["seq"], help="tokens per sample")
    p.add_argument("--layers", type=int, default=DEFAULTS["layers"])
    p.add_argument("--vocab", type=int, default=DEFAULTS["vocab"])
    p.add_argument("--rounds", type=int, default=2,
                   help="fresh processes per approach, in alternating order")
    p.add_argument("--passive", action="store_true",
                   help="run the measuring processes with OMP_WAIT_POLICY=PASSIVE, so the CPU "
                        "seconds per sample stay meaningful on a busy machine")
    p.add_argument("--out", default=str(RESULTS), help="where to write the JSON result ('' = don't)")
    args = p.parse_args([] if argv is None and __name__ != "__main__" else argv)

    if args.mode:  # child
        cfg = dict(DEFAULTS, **json.loads(args.config)) if args.config else dict(DEFAULTS)
        result = run_mode(args.mode, cfg)
        print(json.dumps(result), flush=True)
        return result

    cfg = dict(DEFAULTS, samples=args.samples, seq=args.seq, layers=args.layers, vocab=args.vocab,
               passive=args.passive)
    info = machine_info()
    print(f"machine: {machine_line(info)}", flush=True)
    all_runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(max(1, args.rounds)):
        order = MODES if r % 2 == 0 else tuple(reversed(MODES))  # ABC CBA: drift hits all
        for mode in order:
            t0 = time.perf_counter()
            m = _spawn(mode, cfg, passive=args.passive)
            all_runs[mode].append(m)
            if r == 0 and mode == MODES[0]:
                print(f"model: {m['params']:,} parameters ({m['params'] / 1e6:.1f}M, "
                      f"{m['weights_mib']:.0f} MiB fp32)", flush=True)
            quiet = sum(1 for s in m["per_sample"]
                        if s["other_load"] is not None and s["other_load"] <= BUSY)
            print(f"  round {r + 1} {mode:13s} peak +{m['peak_above_baseline_mib']:6.1f} MiB  "
                  f"{m['seconds_per_sample']:.3f} s/sample (min {m['seconds_min']:.3f}, "
                  f"CPU {m['cpu_seconds_per_sample']:.3f})  "
                  f"quiet {quiet}/{m['samples_timed']}, other load {_fmt(m['other_load'])}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    result = summarise(all_runs, cfg, info)
    print()
    print(to_markdown(result))
    save_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
