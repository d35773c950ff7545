"""Distillation benchmark: the time of a `--distill` step against a plain LoRA step.

The same small random Llama student and wider, deeper random teacher as the training
benchmark (built offline). Two runs are set up exactly as `paratransfer.train.run_train` sets
them up — `--init standard`, and `--init standard --distill TEACHER` — and their optimizer
steps (`train.train_step`, the loop's own) alternate in this one process, the order flipping at
every step, so that drift of a shared machine hits both alike. The headline is the median over
adjacent pairs of (distill step seconds / plain step seconds); the teacher's forward passes
are timed inside the distill step too.

Distillation needs the teacher at every training step; parametric transfer needs it once,
before training (sensitivity and extraction). This measures the first of those costs.

Run: ``.venv/bin/python bench/bench_distill.py`` (``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import save_result
from bench_train import DEFAULTS as TRAIN_DEFAULTS
from bench_train import build_inputs, machine_info

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "distill.json"
DEFAULTS = {**TRAIN_DEFAULTS, "steps": 24}


def measure(cfg: dict) -> dict:
    """Alternate plain and distill optimizer steps in one process; per-step seconds."""
    import torch

    from paratransfer.train import Dist, TrainSettings, setup, train_step

    torch.set_num_threads(cfg["threads"])
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        inputs = build_inputs(cfg, Path(tmp))
        teacher = str(Path(tmp) / "teacher")
        runs = {}
        for name, distill in (("plain", None), ("distill", teacher)):
            settings = TrainSettings(init="standard", batch_size=cfg["batch"],
                                     micro_batch_size=cfg["micro"], max_steps=cfg["steps"],
                                     max_length=256, seed=cfg["seed"], rank=cfg["rank"],
                                     alpha=float(cfg["rank"]), distill=distill)
            runs[name] = setup(inputs["student"], inputs["data"], Path(tmp) / name, settings,
                               None, torch.float32, torch.device("cpu"), Dist(), None)
            runs[name].model.train()
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        seconds: dict[str, list[float]] = {"plain": [], "distill": []}
        teacher_seconds: list[float] = []
        for step in range(cfg["steps"]):
            order = ("plain", "distill") if step % 2 == 0 else ("distill", "plain")
            for name in order:
                started = time.perf_counter()
                entry = train_step(runs[name], step, scaler)
                seconds[name].append(time.perf_counter() - started)
                if name == "distill":
                    teacher_seconds.append(entry["teacher_seconds"])
        teacher_params = sum(p.numel() for p in runs["distill"].objective.teacher.parameters())
        student_params = sum(p.numel() for p in runs["plain"].model.parameters())
    keep = range(cfg["warmup_steps"], cfg["steps"])
    ratios = [seconds["distill"][i] / seconds["plain"][i] for i in keep]
    ratio = statistics.median(ratios)
    return {
        "benchmark": "distill",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": cfg,
        "teacher_parameters": teacher_params,
        "student_parameters": student_params,
        "seconds_per_step": {name: statistics.median([s[i] for i in keep])
                             for name, s in seconds.items()},
        "teacher_seconds_per_step": statistics.median([teacher_seconds[i] for i in keep]),
        "ratio": ratio,
        "ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratio],
    }


def summary(result: dict) -> list[dict]:
    """The headline row of BENCHMARKS.md's summary table (a figure to report, no goal)."""
    return [{"what": "a `--distill` training step against a plain LoRA step, "
                     f"{result['student_parameters'] / 1e6:.2f}M-parameter student, "
                     f"{result['teacher_parameters'] / 1e6:.2f}M-parameter teacher",
             "headline": f"{result['ratio']:.2f}× the time (teacher's forward passes: "
                         f"{result['teacher_seconds_per_step'] / result['seconds_per_step']['distill']:.0%})",
             "goal": "report", "met": None}]


def to_markdown(result: dict) -> str:
    """The BENCHMARKS.md section body for this benchmark."""
    s, cfg = result["seconds_per_step"], result["config"]
    share = result["teacher_seconds_per_step"] / s["distill"]
    return "\n".join([
        f"Random Llama student ({result['student_parameters'] / 1e6:.2f}M parameters) and "
        f"teacher ({result['teacher_parameters'] / 1e6:.2f}M), fp32, {cfg['threads']} thread; "
        f"effective batch {cfg['batch']} in micro-batches of {cfg['micro']}, LoRA rank "
        f"{cfg['rank']} on every module; {cfg['steps']} alternating steps of each, the first "
        f"{cfg['warmup_steps']} not counted.",
        "",
        "| step | seconds (median) |",
        "|---|---:|",
        f"| plain LoRA (`--init standard`) | {s['plain']:.4f} |",
        f"| distill (`--init standard --distill TEACHER`) | {s['distill']:.4f} |",
        f"| of which the teacher's forward passes | {result['teacher_seconds_per_step']:.4f} |",
        "",
        f"- Time of a distill step / a plain LoRA step: **{result['ratio']:.2f}×** (median over "
        f"adjacent pairs; quartiles {', '.join(f'{q:.2f}' for q in result['ratio_quartiles'])})",
        f"- The teacher's forward passes are {share:.0%} of a distill step. Distillation pays "
        "this at every step of every run; parametric transfer needs the teacher once, before "
        "training.",
    ])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for key in ("steps", "threads", "batch", "micro"):
        p.add_argument(f"--{key}", type=int, default=DEFAULTS[key])
    p.add_argument("--out", default=str(RESULTS), help="where to write the JSON result ('' = don't)")
    args = p.parse_args([] if argv is None and __name__ != "__main__" else argv)
    cfg = dict(DEFAULTS, **{k: getattr(args, k) for k in ("steps", "threads", "batch", "micro")})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    result = measure(cfg)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(to_markdown(result))
    save_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
