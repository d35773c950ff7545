"""Generation benchmark: batched greedy generation against one prompt at a time, same run.

A small random Llama (character tokenizer, fp32) generates for the same 16 prompts of varied
length twice per round: one prompt at a time (batch size 1) and all 16 in one batch (left
padding + attention mask), both through `paratransfer.evaluate.generation.generate_greedy`, the
function `paratransfer evaluate` uses. Rounds alternate the order (single, batched, batched,
single, ...) so machine drift hits both alike; each mode's time is its fastest round (the least
disturbed by other processes). The two modes agree to fp32 rounding, not bit for bit, so a
near tie of the two best logits can make them pick different tokens: the benchmark counts the
prompts whose outputs diverge instead of asserting identity. One thread by
default: on a shared 2-core machine, two threads per process mostly measure contention with
other processes (and slow batch-1 decoding most); `--threads 0` keeps torch's default.

Goal (project issue): batched at batch size 16 >= 3x faster than one at a time (divergent
outputs counted and reported).

Run: ``.venv/bin/python bench/bench_generate.py`` (``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import time
from pathlib import Path

from _common import cpu_name, save_result

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "generate.json"
GOAL_SPEEDUP = 3.0

#: ~3.2M parameters: hidden 256, 4 layers, grouped-query attention, a character vocabulary.
DEFAULTS = dict(hidden=256, layers=4, heads=8, kv_heads=4, mlp=688, prompts=16, batch=16,
                new_tokens=64, rounds=2, threads=1, seed=0)

_TOPICS = ["apples", "a train timetable", "the water cycle", "prime numbers", "a birthday party",
           "tides", "a library fine", "bicycle gears"]


def machine_info() -> dict:
    """CPU model, cores and library versions, for the report."""
    import torch
    import transformers

    cpu = cpu_name()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def make_prompts(n: int, tokenizer) -> list[str]:
    """`n` chat prompts in the training format, 1 to 4 sentences long (varied padding)."""
    from paratransfer.tasks.examples import Example, render

    prompts = []
    for i in range(n):
        topic = _TOPICS[i % len(_TOPICS)]
        question = " ".join(f"Sentence {j + 1} of a question about {topic}." for j in range(1 + i % 4))
        example = Example(id=str(i), source="bench", messages=(
            {"role": "user", "content": f"{question} What is {i} plus {2 * i + 1}?"},
            {"role": "assistant", "content": ""}))
        prompts.append(render(example, tokenizer)[0])
    return prompts


def measure(cfg: dict) -> dict:
    """Time both modes over `rounds` alternating rounds; check the outputs agree."""
    import torch

    from paratransfer.demo.tiny import char_tokenizer, tiny_model
    from paratransfer.evaluate.generation import encode, generate_greedy

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    tokenizer = char_tokenizer()
    model = tiny_model("llama", vocab=len(tokenizer), hidden=cfg["hidden"], layers=cfg["layers"],
                       heads=cfg["heads"], kv_heads=cfg["kv_heads"], mlp=cfg["mlp"], seed=cfg["seed"])
    prompts = make_prompts(cfg["prompts"], tokenizer)
    n = cfg["new_tokens"]

    def single() -> list[str]:
        return [generate_greedy(model, tokenizer, [p], max_new_tokens=n, batch_size=1)[0]
                for p in prompts]

    def batched() -> list[str]:
        return generate_greedy(model, tokenizer, prompts, max_new_tokens=n, batch_size=cfg["batch"])

    generate_greedy(model, tokenizer, prompts[:2], max_new_tokens=4, batch_size=2)  # warm-up
    times: dict[str, list[float]] = {"single": [], "batched": []}
    outputs: dict[str, list[str]] = {}
    for r in range(cfg["rounds"]):
        order = ("single", "batched") if r % 2 == 0 else ("batched", "single")
        for mode in order:
            t0 = time.perf_counter()
            out = single() if mode == "single" else batched()
            times[mode].append(time.perf_counter() - t0)
            if outputs.setdefault(mode, out) != out:
                raise RuntimeError(f"{mode} generation is not deterministic")
    lengths = [len(ids) for ids in encode(tokenizer, prompts)]
    new_tokens = sum(len(encode(tokenizer, [o])[0]) for o in outputs["single"])
    best = {mode: min(t) for mode, t in times.items()}
    speedup = best["single"] / best["batched"]
    divergent = sum(a != b for a, b in zip(outputs["single"], outputs["batched"], strict=True))
    return {
        "benchmark": "generate",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": cfg,
        "params": sum(p.numel() for p in model.parameters()),
        "prompt_tokens": {"min": min(lengths), "max": max(lengths), "total": sum(lengths)},
        "new_tokens": new_tokens,
        "seconds": {mode: {"best": best[mode], "median": statistics.median(t), "all": t}
                    for mode, t in times.items()},
        "tokens_per_second": {mode: new_tokens / best[mode] for mode in best},
        "speedup": speedup,
        "divergent_outputs": divergent,
        "goal": {"target": GOAL_SPEEDUP, "value": speedup, "met": speedup >= GOAL_SPEEDUP},
    }


def summary(result: dict) -> list[dict]:
    """The headline row of BENCHMARKS.md's summary table."""
    goal = result["goal"]
    return [{"what": f"greedy generation, {result['params'] / 1e6:.1f}M-parameter random Llama: "
                     "batched against one prompt at a time",
             "headline": f"{result['speedup']:.1f}×; {result['divergent_outputs']} of "
                         f"{result['config']['prompts']} outputs diverge (near ties)",
             "goal": f"≥ {goal['target']:.0f}×", "met": goal["met"]}]


def to_markdown(result: dict) -> str:
    """The BENCHMARKS.md section body for this benchmark."""
    cfg, s, tps, goal = result["config"], result["seconds"], result["tokens_per_second"], result["goal"]
    pt = result["prompt_tokens"]
    lines = [
        f"Random Llama, fp32: hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads "
        f"({cfg['kv_heads']} KV), MLP {cfg['mlp']}, character vocabulary = "
        f"**{result['params'] / 1e6:.1f}M parameters**. {cfg['prompts']} prompts of "
        f"{pt['min']}–{pt['max']} tokens, up to {cfg['new_tokens']} new tokens each "
        f"({result['new_tokens']} generated in all), greedy; {result['machine']['threads']} "
        f"threads; best of {cfg['rounds']} alternating rounds.",
        "",
        "| mode | seconds (best) | median | new tokens / s |",
        "|---|---:|---:|---:|",
        f"| one at a time (batch 1) | {s['single']['best']:.2f} | {s['single']['median']:.2f} | "
        f"{tps['single']:.0f} |",
        f"| batched (batch {cfg['batch']}) | {s['batched']['best']:.2f} | "
        f"{s['batched']['median']:.2f} | {tps['batched']:.0f} |",
        "",
        f"- Speed-up, batched / one at a time: **{result['speedup']:.1f}×** "
        f"(goal ≥ {goal['target']:.0f}×: {'met' if goal['met'] else 'NOT met'})",
        f"- Prompts whose batched output diverges from the one-at-a-time output (a near tie of "
        f"the two best logits under other kernel shapes): **{result['divergent_outputs']} of "
        f"{cfg['prompts']}**",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for key in ("hidden", "layers", "prompts", "batch", "new_tokens", "rounds", "threads"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=DEFAULTS[key],
                       help="0 = torch's default" if key == "threads" else None)
    p.add_argument("--out", default=str(RESULTS), help="where to write the JSON result ('' = don't)")
    args = p.parse_args([] if argv is None and __name__ != "__main__" else argv)
    cfg = dict(DEFAULTS, **{k: getattr(args, k) for k in
                            ("hidden", "layers", "prompts", "batch", "new_tokens", "rounds", "threads")})
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
