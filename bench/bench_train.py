"""Training benchmark: throughput of `--init transfer` against the standard (plain PEFT) init.

A small random Llama student (and a wider, deeper random teacher to extract an adapter from) is
built offline. Both arms are set up exactly as `paratransfer.train.run_train` sets them up,
with identical settings, and then their optimizer steps (`train.train_step`, the loop's own
step) alternate in this one process, the order flipping at every step, so that any drift of
a shared machine hits both alike. A plain PEFT loop (`get_peft_model` + AdamW + HF's own loss
over the same micro-batches) takes its turn too, as a reference for the loop itself.
Throughput is tokens per second over the steps after `warmup_steps`.

Goal (project issue): overhead of transfer over standard <= 5%, i.e.
tokens/s(standard) / tokens/s(transfer) - 1 <= 0.05, taken as the median over the pairs of
adjacent steps (same batch, same moment), which a busy shared machine disturbs least.

Run: ``.venv/bin/python bench/bench_train.py`` (``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from _common import cpu_name, save_result

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "train.json"
GOAL_OVERHEAD = 0.05
#: Run name -> arm. A second standard run measures the noise floor: two identical runs differ
#: by this much on this machine, whatever the init.
ARMS = {"transfer": "transfer", "standard": "standard", "standard_control": "standard"}

#: Student hidden 128, 2 layers; teacher hidden 192, 4 layers. Per-step time on CPU is mostly
#: per-operation overhead at this size, so fewer layers and steps keep the run short.
DEFAULTS = dict(hidden=128, layers=2, heads=4, kv_heads=2, mlp=344, teacher_hidden=192,
                teacher_layers=4, teacher_heads=6, teacher_kv_heads=3, teacher_mlp=512,
                examples=64, batch=16, micro=8, steps=30,
                warmup_steps=2, rank=16, threads=1, seed=0)


def machine_info() -> dict:
    """CPU model, cores and library versions, for the report."""
    import torch
    import transformers

    cpu = cpu_name()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def build_inputs(cfg: dict, root: Path) -> dict:
    """Teacher, student, training data and the extracted adapter, all offline."""
    from paratransfer.demo.tiny import char_tokenizer, save_tiny, tiny_model
    from paratransfer.demo.world import arithmetic_records, write_jsonl
    from paratransfer.extract.plan import ExtractSettings
    from paratransfer.extract.step import run_extract

    tok = char_tokenizer()
    teacher = save_tiny(tiny_model("llama", vocab=len(tok), hidden=cfg["teacher_hidden"],
                                   layers=cfg["teacher_layers"], heads=cfg["teacher_heads"],
                                   kv_heads=cfg["teacher_kv_heads"], mlp=cfg["teacher_mlp"],
                                   seed=1),
                        tok, root / "teacher")
    student = save_tiny(tiny_model("llama", vocab=len(tok), hidden=cfg["hidden"],
                                   layers=cfg["layers"], heads=cfg["heads"],
                                   kv_heads=cfg["kv_heads"], mlp=cfg["mlp"], seed=2),
                        tok, root / "student")
    seeds = write_jsonl(root / "seeds.jsonl", arithmetic_records(8, seed=1))
    data = write_jsonl(root / "train.jsonl", arithmetic_records(cfg["examples"], seed=2))
    run_extract(str(teacher), str(student), root / "adapter",
                ExtractSettings(rank=cfg["rank"], alpha=cfg["rank"]), seeds=seeds, progress=False)
    return {"student": str(student), "data": data, "adapter": root / "adapter", "tokenizer": tok}


def make_runs(inputs: dict, cfg: dict, root: Path) -> dict:
    """The runs set up exactly as `run_train` sets them up (nothing is written); setup seconds."""
    import torch

    from paratransfer.train import Dist, TrainSettings, setup

    runs, setup_seconds = {}, {}
    for name, arm in ARMS.items():
        settings = TrainSettings(init=arm, batch_size=cfg["batch"], micro_batch_size=cfg["micro"],
                                 max_steps=cfg["steps"], max_length=256, seed=cfg["seed"])
        started = time.perf_counter()
        runs[name] = setup(inputs["student"], inputs["data"], root / name, settings,
                           inputs["adapter"], torch.float32, torch.device("cpu"), Dist(), None)
        setup_seconds[name] = time.perf_counter() - started
        runs[name].model.train()
    return {"runs": runs, "setup_seconds": setup_seconds}


def plain_peft_step(inputs: dict, cfg: dict):
    """Reference: the plainest PEFT LoRA loop over the same micro-batches (HF's own loss)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from paratransfer.adapter.inject import read_adapter
    from paratransfer.teacher.models import load_model, load_tokenizer
    from paratransfer.train import batch_indices, collate, load_examples, micro_batches

    adapter = read_adapter(inputs["adapter"])
    tokenizer = load_tokenizer(inputs["student"])
    examples, _ = load_examples(inputs["data"], tokenizer, "tulu", 256)
    torch.manual_seed(cfg["seed"])
    model = get_peft_model(load_model(inputs["student"]), LoraConfig(
        r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=0.05, target_modules=adapter.targets,
        task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)

    def step(i: int) -> int:
        tokens = 0
        for mb in micro_batches(batch_indices(len(examples), cfg["batch"], cfg["seed"], i),
                                cfg["micro"]):
            batch = collate(examples, mb, tokenizer.pad_token_id)
            model(**batch).loss.backward()
            tokens += int(batch["attention_mask"].sum())
        opt.step()
        opt.zero_grad(set_to_none=True)
        return tokens

    return step


def measure(cfg: dict) -> dict:
    """Alternate optimizer steps of the two arms (and the plain loop) in this one process."""
    import torch

    from paratransfer.train import train_step

    torch.set_num_threads(cfg["threads"])
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        inputs = build_inputs(cfg, Path(tmp))
        made = make_runs(inputs, cfg, Path(tmp))
        runs = made["runs"]
        scaler = torch.amp.GradScaler("cuda", enabled=False)  # what `train` uses on CPU fp32
        steppers = {arm: (lambda i, run=run: train_step(run, i, scaler)["tokens"])
                    for arm, run in runs.items()}
        steppers["plain_peft"] = plain_peft_step(inputs, cfg)
        n_params = sum(p.numel() for p in runs["standard"].model.parameters())
        tokens = {k: [] for k in steppers}
        seconds = {k: [] for k in steppers}
        names = list(steppers)
        for i in range(cfg["steps"]):
            order = names if i % 2 == 0 else names[::-1]  # no arm always runs first
            for name in order:
                started = time.perf_counter()
                tokens[name].append(steppers[name](i))
                seconds[name].append(time.perf_counter() - started)
    warm = cfg["warmup_steps"]
    tps = {k: sum(tokens[k][warm:]) / sum(seconds[k][warm:]) for k in names}
    per_step = [(t_s / s_s) / (t_t / s_t) for t_s, s_s, t_t, s_t in zip(
        tokens["standard"][warm:], seconds["standard"][warm:], tokens["transfer"][warm:],
        seconds["transfer"][warm:], strict=True)]
    overhead = statistics.median(per_step) - 1.0  # paired: adjacent steps, same batch
    control = [(t_c / s_c) / (t_s / s_s) for t_c, s_c, t_s, s_s in zip(
        tokens["standard_control"][warm:], seconds["standard_control"][warm:],
        tokens["standard"][warm:], seconds["standard"][warm:], strict=True)]
    return {
        "benchmark": "train",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": cfg,
        "student_params": n_params,
        "tokens_per_second": tps,
        "step_seconds": seconds,
        "setup_seconds": made["setup_seconds"],
        "overhead_transfer_over_standard": overhead,
        "overall_overhead": tps["standard"] / tps["transfer"] - 1.0,
        "noise_floor": statistics.median(control) - 1.0,
        "ratio_standard_over_plain_peft": tps["standard"] / tps["plain_peft"],
        "goal": {"target": GOAL_OVERHEAD, "value": overhead, "met": overhead <= GOAL_OVERHEAD},
    }


def summary(result: dict) -> list[dict]:
    """The headline row of BENCHMARKS.md's summary table."""
    goal = result["goal"]
    return [{"what": "training throughput, transfer init against standard init (same loop), "
                     f"{result['student_params'] / 1e6:.1f}M-parameter student: overhead",
             "headline": f"{goal['value'] * 100:+.1f}% (noise floor "
                         f"{result['noise_floor'] * 100:+.1f}%)",
             "goal": f"≤ {goal['target'] * 100:.0f}%", "met": goal["met"]}]


def to_markdown(result: dict) -> str:
    """The BENCHMARKS.md section body for this benchmark."""
    cfg, tps, goal = result["config"], result["tokens_per_second"], result["goal"]
    lines = [
        f"Random Llama student, fp32, CPU, {cfg['threads']} thread(s): hidden {cfg['hidden']}, "
        f"{cfg['layers']} layers, MLP {cfg['mlp']} ({result['student_params'] / 1e6:.1f}M "
        f"parameters with LoRA); LoRA r={cfg['rank']} on embed, q, k, v, o, gate, up, down, "
        f"head. {cfg['steps']} optimizer steps of {cfg['batch']} examples (micro-batches of "
        f"{cfg['micro']}) per run, the runs' steps alternating in one process; tokens/s over the "
        f"steps after the first {cfg['warmup_steps']}.",
        "",
        "| run | tokens/s | setup (s) |",
        "|---|---:|---:|",
    ]
    setup = result["setup_seconds"]
    for name, label in (("transfer", "`train --init transfer`"),
                        ("standard", "`train --init standard`"),
                        ("standard_control", "`train --init standard`, again (control)"),
                        ("plain_peft", "plain PEFT loop (reference)")):
        took = f"{setup[name]:.2f}" if name in setup else "–"
        lines.append(f"| {label} | {tps[name]:.0f} | {took} |")
    lines += [
        "",
        f"- Overhead of the transfer init, tokens/s(standard) / tokens/s(transfer) − 1, median "
        f"over adjacent step pairs: **{goal['value'] * 100:+.1f}%** (goal ≤ "
        f"{goal['target'] * 100:.0f}%: {'met' if goal['met'] else 'NOT met'}); over all steps "
        f"together {result['overall_overhead'] * 100:+.1f}%",
        f"- Noise floor, the same measure between two identical standard runs: "
        f"{result['noise_floor'] * 100:+.1f}%",
        f"- Our loop (standard arm) against the plain PEFT loop: "
        f"{result['ratio_standard_over_plain_peft']:.2f}× the throughput",
        f"- Whole benchmark: {result.get('seconds', 0):.0f} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for key in ("steps", "hidden", "layers", "threads", "batch", "micro"):
        p.add_argument(f"--{key}", type=int, default=DEFAULTS[key])
    p.add_argument("--out", default=str(RESULTS), help="where to write the JSON result ('' = don't)")
    args = p.parse_args([] if argv is None and __name__ != "__main__" else argv)
    cfg = dict(DEFAULTS, **{k: getattr(args, k) for k in
                            ("steps", "hidden", "layers", "threads", "batch", "micro")})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    result = measure(cfg)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(to_markdown(result))
    save_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
