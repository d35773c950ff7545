"""Stability report benchmark: peak memory for a pool of 128 seed samples against a pool of 8.

`paratransfer stability` computes each pool sample's sensitivity once and keeps it on disk, so
its memory should not grow with the pool. Both runs use the same tiny random Llama pair (the
teacher ~4.4M parameters, 17 MiB fp32, so weights rather than the runtime dominate), the same
seed-set sizes (4 and 8) and the same number of draws; only the pool differs (the first 8 or
128 records of one file of arithmetic word problems). Each run is a fresh subprocess (one
thread): libraries are imported and warmed up on a micro pair first, then the resident set is
read, the command runs, and the peak above that baseline is its memory. Disk used by the
per-sample files (pool x one sensitivity file) and the time are reported too.

Goal (project issue 15): peak(128) / peak(8) <= 2.

Run: ``.venv/bin/python bench/bench_stability.py [--rounds 2] [--out bench/results/stability.json]``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_name, save_result

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "stability.json"
POOLS = (8, 128)
GOAL = 2.0
MiB = 1024 * 1024

TEACHER = dict(hidden=256, layers=6, heads=8, kv_heads=4, mlp=704, seed=1)
STUDENT = dict(hidden=192, layers=3, heads=6, kv_heads=3, mlp=512, seed=2)
SIZES, DRAWS, RANK = (4, 8), 5, 8


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def build(root: Path) -> dict:
    """The teacher/student pair, the pool file and a micro pair for warming up."""
    from paratransfer.demo.tiny import char_tokenizer, save_tiny, tiny_model
    from paratransfer.demo.world import arithmetic_records, write_jsonl

    tok = char_tokenizer()
    paths = {}
    for name, kw in (("teacher", TEACHER), ("student", STUDENT),
                     ("micro-teacher", dict(hidden=32, layers=2, heads=4, mlp=64, seed=3)),
                     ("micro-student", dict(hidden=16, layers=1, heads=2, mlp=32, seed=4))):
        paths[name] = str(save_tiny(tiny_model("llama", vocab=len(tok), **kw), tok, root / name))
    paths["pool"] = str(write_jsonl(root / "pool.jsonl", arithmetic_records(max(POOLS), seed=9)))
    return paths


def run_child(paths: dict, pool: int, root: Path) -> dict:
    """One measured run in *this* process (call it in a fresh one)."""
    import gc

    import torch

    torch.set_num_threads(1)
    from paratransfer.extract.plan import ExtractSettings
    from paratransfer.sensitivity.step import SensitivitySettings
    from paratransfer.stability.pool import StabilitySettings, run_stability

    def stability(teacher: str, student: str, n: int, out: Path, sizes=SIZES) -> dict:
        return run_stability(teacher, student, paths["pool"], out,
                             StabilitySettings(sizes, DRAWS), ExtractSettings(rank=RANK),
                             SensitivitySettings(max_samples=n), progress=False, work_dir=root)

    stability(paths["micro-teacher"], paths["micro-student"], 4, root / "warm-up", (2,))
    gc.collect()
    baseline = _rss()
    started = time.perf_counter()
    report = stability(paths["teacher"], paths["student"], pool, root / f"out-{pool}")
    seconds = time.perf_counter() - started
    peak = _peak_rss() - baseline
    return {"pool": pool, "peak_above_baseline_mib": peak / MiB, "baseline_mib": baseline / MiB,
            "seconds": seconds, "layers_jaccard": [s["layers"]["mean"] for s in report["sizes"]]}


def _spawn(paths: dict, pool: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-stability-") as root:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(pool),
               "--paths", json.dumps(paths), "--root", root]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
                   TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"pool {pool} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary(result: dict) -> list[dict]:
    """The headline row of BENCHMARKS.md's summary table."""
    g = result["goals"]["memory"]
    return [{"what": f"`paratransfer stability`: peak memory for a pool of {POOLS[1]} seed "
                     f"samples against a pool of {POOLS[0]}, {result['teacher_params'] / 1e6:.1f}M-"
                     "parameter teacher",
             "headline": f"{g['value']:.2f}", "goal": f"≤ {g['target']}", "met": g["met"]}]


def to_markdown(result: dict) -> str:
    """The BENCHMARKS.md section body for this benchmark."""
    t, s = result["config"]["teacher"], result["config"]["student"]
    lines = [
        f"Tiny random Llama pair, fp32: teacher hidden {t['hidden']}, {t['layers']} layers "
        f"({result['teacher_params'] / 1e6:.1f}M parameters, one sensitivity file "
        f"{result['sensitivity_file_mib']:.1f} MiB) -> student hidden {s['hidden']}, "
        f"{s['layers']} layers; seed-set sizes {result['config']['sizes']}, "
        f"{result['config']['draws']} draws each, rank {result['config']['rank']}; one thread; "
        f"{result['rounds']} fresh process(es) per pool size.",
        "",
        "| pool | peak RSS above baseline (MiB, max over rounds) | s (median) | per-sample files on disk (MiB) |",
        "|---:|---:|---:|---:|",
    ]
    for pool in POOLS:
        m = result["pools"][str(pool)]
        lines.append(f"| {pool} | {m['peak_above_baseline_mib']:.0f} | {m['seconds']:.1f} | "
                     f"{pool * result['sensitivity_file_mib']:.0f} |")
    g = result["goals"]["memory"]
    lines += ["", f"- Peak memory, pool {POOLS[1]} / pool {POOLS[0]}: **{g['value']:.2f}** "
              f"(goal <= {g['target']}: {'met' if g['met'] else 'NOT met'})",
              "- Disk grows with the pool (one sensitivity file per sample, deleted at the end); "
              "memory does not."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", type=int, help="internal: measure one pool size in this process")
    p.add_argument("--paths", help="internal: JSON of the model and pool paths")
    p.add_argument("--root", help="internal: scratch folder of the child")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per pool size")
    p.add_argument("--out", default=str(RESULTS), help="where to write the JSON result ('' = don't)")
    args = p.parse_args([] if argv is None and __name__ != "__main__" else argv)
    if args.child:
        result = run_child(json.loads(args.paths), args.child, Path(args.root))
        print(json.dumps(result), flush=True)
        return result

    with tempfile.TemporaryDirectory(prefix="bench-stability-models-") as root:
        paths = build(Path(root))
        from safetensors.torch import load_file

        params = sum(v.numel() for v in load_file(f"{paths['teacher']}/model.safetensors").values())
        runs = []
        for r in range(max(1, args.rounds)):
            for pool in (POOLS if r % 2 == 0 else tuple(reversed(POOLS))):
                m = _spawn(paths, pool)
                runs.append(m)
                print(f"  round {r + 1} pool {pool:4d}: peak +{m['peak_above_baseline_mib']:.1f} "
                      f"MiB, {m['seconds']:.1f} s", flush=True)
    pools = {}
    for pool in POOLS:
        mine = [m for m in runs if m["pool"] == pool]
        pools[str(pool)] = {**mine[0],
                            "peak_above_baseline_mib": max(m["peak_above_baseline_mib"] for m in mine),
                            "peak_rounds_mib": [m["peak_above_baseline_mib"] for m in mine],
                            "seconds": statistics.median(m["seconds"] for m in mine)}
    ratio = (pools[str(POOLS[1])]["peak_above_baseline_mib"]
             / pools[str(POOLS[0])]["peak_above_baseline_mib"])
    result = {
        "benchmark": "stability",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
        "config": {"teacher": TEACHER, "student": STUDENT, "sizes": list(SIZES), "draws": DRAWS,
                   "rank": RANK},
        "teacher_params": params,
        "sensitivity_file_mib": 4 * params / MiB,
        "rounds": max(1, args.rounds),
        "runs": runs,
        "pools": pools,
        "goals": {"memory": {"target": GOAL, "value": ratio, "met": ratio <= GOAL}},
    }
    print()
    print(to_markdown(result))
    save_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
