"""Layer-streamed sensitivity against the in-memory path: peak memory and time, ~1B teacher.

A random Llama of about a billion parameters (vocab 32000, hidden 2048, 16 layers, MLP 5504;
fp32, ~3.8 GB) is written once as sharded safetensors into a cache folder (``--cache``, kept for
the next run unless ``--clean``). Each
path then runs in its own fresh subprocess on the same random samples, from the files to a
written sensitivity file, as ``paratransfer sensitivity`` does:

* ``memory``  ``load_model`` + ``accumulate_sensitivity`` + ``save_sensitivity``;
* ``stream``  ``stream_sensitivity`` over ``SafetensorsWeights`` into a ``SensitivityWriter``.

Peak memory is ``ru_maxrss`` minus the RSS measured just before the teacher is touched (the
runtime is imported and warmed up first). Time is wall-clock from there to the file's close. The
two files are compared tensor by tensor afterwards (largest relative difference).

Goals (project issue): peak_stream <= 0.3 x peak_memory at time_stream <= 2 x time_memory.

The 70B figure is extrapolated from per-stage sizes (formula in ``to_markdown``), calibrated by
the ratio of measured to modelled peak on this model.

Run: ``.venv/bin/python bench/bench_stream.py`` (``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _common import busy_cpu_seconds, save_result  # noqa: E402
from bench_sensitivity import (  # noqa: E402  (shared helpers: machine, RSS, load on the CPU)
    _peak_rss_bytes,
    _rss_bytes,
    _warm_up_runtime,
    machine_info,
    machine_line,
)

RESULTS = HERE / "results" / "stream.json"
CACHE = HERE / "out" / "cache"
MODES = ("memory", "stream")

#: ~0.94B parameters: 2 x 32000 x 2048 (embedding + untied head) + 16 x 50.6M (layers).
DEFAULTS = dict(vocab=32000, hidden=2048, layers=16, heads=16, kv_heads=16, mlp=5504,
                seq=64, samples=4, seed=0, threads=2, shard="1GB")

GOAL_MEMORY = 0.3  # peak_stream / peak_memory
GOAL_TIME = 2.0    # time_stream / time_memory

#: Llama-2-70B's shape, for the extrapolation.
LLAMA_70B = dict(vocab=32000, hidden=8192, layers=80, heads=64, kv_heads=8, mlp=28672)

MiB = 1024 * 1024
GiB = 1024 * MiB


# --------------------------------------------------------------------------- sizes


def sizes(cfg: dict) -> dict:
    """Parameter counts: per decoder layer, embedding (= head), largest matrix, total."""
    h, i = cfg["hidden"], cfg["mlp"]
    kv = h * cfg["kv_heads"] // cfg["heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    embed = cfg["vocab"] * h
    return {"layer": layer, "embed": embed, "largest_layer_matrix": max(h * i, h * h),
            "total": cfg["layers"] * layer + 2 * embed + h}


def modelled_stream_bytes(cfg: dict, weight_bytes: int) -> dict:
    """Peak of the largest stage: weights + fp32 accumulators + the gradient held at once.

    A layer's gradients are folded and freed one matrix at a time (the largest one counts); the
    embedding's (or head's) gradient is one matrix as big as its weights.
    """
    s = sizes(cfg)
    layer = s["layer"] * (weight_bytes + 4) + s["largest_layer_matrix"] * weight_bytes
    embed = s["embed"] * (2 * weight_bytes + 4)
    return {"layer_stage": layer, "embed_stage": embed, "stage": max(layer, embed)}


def modelled_memory_bytes(cfg: dict, weight_bytes: int) -> int:
    """The in-memory path holds every weight and every fp32 accumulator (+ one gradient)."""
    s = sizes(cfg)
    return s["total"] * (weight_bytes + 4) + s["embed"] * weight_bytes


def kept_activation_bytes(cfg: dict, samples: int, seq: int, act_bytes: int) -> int:
    """Hidden states kept between stages, at most: every layer's input and the head's for every
    sample (during the backward, each sample's incoming gradient replaces the input it used)."""
    return (cfg["layers"] + 1) * samples * seq * cfg["hidden"] * act_bytes


def layer_activation_bytes(cfg: dict, seq: int, act_bytes: int) -> int:
    """One sample's activations saved inside one layer for its backward, roughly
    `T·(6d + 4I)`: norm inputs, q/k/v, attention output; gate, up, activation, product."""
    return seq * (6 * cfg["hidden"] + 4 * cfg["mlp"]) * act_bytes


# --------------------------------------------------------------------------- child side


def make_samples(cfg: dict) -> list[dict]:
    """Random samples (labels -100 on the first half), the same in every process."""
    import torch

    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    out = []
    for _ in range(cfg["samples"]):
        ids = torch.randint(10, cfg["vocab"], (cfg["seq"],), generator=g).tolist()
        half = cfg["seq"] // 2
        out.append({"input_ids": ids, "labels": [-100] * half + ids[half:]})
    return out


def model_folder(cfg: dict, cache: Path) -> Path:
    keys = ("vocab", "hidden", "layers", "heads", "kv_heads", "mlp", "seed")
    return cache / ("llama-" + "-".join(f"{k}{cfg[k]}" for k in keys))


def generate(cfg: dict, folder: Path) -> dict:
    """Build the random teacher and write it as sharded safetensors (once; atomic rename)."""
    import torch

    from paratransfer.demo.tiny import tiny_model

    torch.set_num_threads(cfg["threads"])
    t0 = time.perf_counter()
    model = tiny_model("llama", vocab=cfg["vocab"], hidden=cfg["hidden"], layers=cfg["layers"],
                       heads=cfg["heads"], kv_heads=cfg["kv_heads"], mlp=cfg["mlp"],
                       seed=cfg["seed"])
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=cfg["shard"])
    os.replace(tmp, folder)
    return {"seconds": time.perf_counter() - t0,
            "params": sum(p.numel() for p in model.parameters()),
            "shards": len(list(folder.glob("*.safetensors")))}


def run_mode(mode: str, cfg: dict, folder: Path, out: Path) -> dict:
    """Measure one path in *this* process (call it in a fresh one)."""
    import gc

    import torch

    torch.set_num_threads(cfg["threads"])
    import transformers.models.llama.modeling_llama  # noqa: F401  (before the baseline)
    from safetensors import safe_open  # noqa: F401
    from tqdm.auto import tqdm  # noqa: F401

    from paratransfer.sensitivity.accumulate import (
        SensitivityWriter,
        accumulate_sensitivity,
        save_sensitivity,
    )
    from paratransfer.sensitivity.streamed import (
        StreamedTeacher,
        sensitivity_shapes,
        stream_sensitivity,
    )
    from paratransfer.teacher.lazy import SafetensorsWeights
    from paratransfer.teacher.models import load_model

    _warm_up_runtime()
    samples = make_samples(cfg)
    gc.collect()
    baseline = _rss_bytes()
    busy0, cpu0 = busy_cpu_seconds(), os.times()
    t0 = time.perf_counter()
    extra: dict = {}
    if mode == "memory":
        model = load_model(str(folder))
        extra["load_seconds"] = time.perf_counter() - t0
        sens, used = accumulate_sensitivity(model, samples)
        extra["compute_seconds"] = time.perf_counter() - t0 - extra["load_seconds"]
        save_sensitivity(out, sens, {"mode": mode, "samples": used})
    else:
        weights = SafetensorsWeights(folder)
        teacher = StreamedTeacher(weights)
        with SensitivityWriter(out, sensitivity_shapes(weights), {"mode": mode}) as writer:
            used = stream_sensitivity(weights, samples, writer.write, teacher=teacher)
        extra["max_live_layers"] = teacher.max_live_layers
    seconds = time.perf_counter() - t0
    peak = _peak_rss_bytes() - baseline
    busy1, cpu1 = busy_cpu_seconds(), os.times()
    other = None
    if busy0 is not None and busy1 is not None:
        mine = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        other = max(0.0, ((busy1 - busy0) - mine) / (seconds * (os.cpu_count() or 1)))
    assert used == len(samples), (used, len(samples))
    return {"mode": mode, "seconds": seconds, "peak_above_baseline_mib": peak / MiB,
            "baseline_rss_mib": baseline / MiB, "other_load": other,
            "threads": torch.get_num_threads(), **extra}


def compare_files(a: Path, b: Path) -> float:
    """Largest |a - b| / max|b| over the tensors of two sensitivity files (one at a time)."""
    from safetensors import safe_open

    worst = 0.0
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if set(fa.keys()) != set(fb.keys()):
            return math.inf
        for name in fb.keys():
            x, y = fa.get_tensor(name).double(), fb.get_tensor(name).double()
            scale = y.abs().max().item()
            worst = max(worst, (x - y).abs().max().item() / scale if scale else 0.0)
            del x, y
    return worst


# --------------------------------------------------------------------------- parent side


def _spawn(args: list[str], timeout: float = 1200) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[:2]} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{args[:2]}: no result on stdout:\n{proc.stdout[-2000:]}")


def extrapolate(cfg: dict, runs: dict) -> dict:
    """Measured/modelled peak ratios on this model, applied to Llama-2-70B (bf16 and fp32)."""
    k_stream = runs["stream"]["peak_above_baseline_mib"] * MiB / modelled_stream_bytes(cfg, 4)["stage"]
    k_memory = runs["memory"]["peak_above_baseline_mib"] * MiB / modelled_memory_bytes(cfg, 4)
    out = {"k_stream": k_stream, "k_memory": k_memory, "shape": LLAMA_70B,
           "params": sizes(LLAMA_70B)}
    for label, wb in (("bf16", 2), ("fp32", 4)):
        stage = modelled_stream_bytes(LLAMA_70B, wb)
        memory = modelled_memory_bytes(LLAMA_70B, wb)
        out[label] = {
            "layer_stage_gib": stage["layer_stage"] / GiB,
            "embed_stage_gib": stage["embed_stage"] / GiB,
            "stream_peak_gib": k_stream * stage["stage"] / GiB,
            "memory_peak_gib": k_memory * memory / GiB,
            "kept_activations_gib_32x2048": kept_activation_bytes(LLAMA_70B, 32, 2048, wb) / GiB,
            "layer_activations_gib_2048": layer_activation_bytes(LLAMA_70B, 2048, wb) / GiB,
        }
    return out


def summarise(runs: dict, cfg: dict, info: dict, model: dict, diff: float) -> dict:
    mem, st = runs["memory"], runs["stream"]
    mem_ratio = st["peak_above_baseline_mib"] / mem["peak_above_baseline_mib"]
    time_ratio = st["seconds"] / mem["seconds"]
    busy = [r["other_load"] for r in runs.values() if r.get("other_load") is not None]
    return {
        "benchmark": "stream",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": info,
        "config": cfg,
        "model": model,
        "sizes": sizes(cfg),
        "runs": runs,
        "ratios": {"peak_stream_over_memory": mem_ratio, "time_stream_over_memory": time_ratio},
        "goals": {
            "memory": {"target": GOAL_MEMORY, "value": mem_ratio, "met": mem_ratio <= GOAL_MEMORY},
            "time": {"target": GOAL_TIME, "value": time_ratio, "met": time_ratio <= GOAL_TIME},
        },
        "other_load": max(busy) if busy else None,
        "max_rel_diff_stream_vs_memory": diff,
        "extrapolation_70b": extrapolate(cfg, runs),
    }


def _fmt(x, spec=".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def summary(result: dict) -> list[dict]:
    """The headline rows of BENCHMARKS.md's summary table."""
    goals = result["goals"]
    what = (f"layer-streamed sensitivity (`--stream`) of a {result['sizes']['total'] / 1e9:.2f}B-"
            "parameter random Llama, against the teacher in memory")
    return [
        {"what": f"{what}: peak memory", "headline": f"{goals['memory']['value']:.3f}",
         "goal": f"≤ {GOAL_MEMORY}", "met": goals["memory"]["met"]},
        {"what": f"{what}: time", "headline": f"{goals['time']['value']:.2f}",
         "goal": f"≤ {GOAL_TIME:g}", "met": goals["time"]["met"]},
    ]


def to_markdown(result: dict) -> str:
    """The BENCHMARKS.md section body for this benchmark."""
    cfg, runs, goals, s = result["config"], result["runs"], result["goals"], result["sizes"]
    ex = result["extrapolation_70b"]
    mem, st = runs["memory"], runs["stream"]
    lines = [
        f"Random Llama, fp32, saved as {result['model']['shards']} safetensors shards: vocab "
        f"{cfg['vocab']}, hidden {cfg['hidden']}, {cfg['layers']} layers, MLP {cfg['mlp']} = "
        f"**{s['total'] / 1e9:.2f}B parameters** ({s['total'] * 4 / GiB:.2f} GiB). Each path ran "
        f"once in its own fresh process ({cfg['threads']} threads) on the same {cfg['samples']} "
        f"samples of {cfg['seq']} tokens, from the files to a written sensitivity file.",
        "",
        "| path | peak RSS above baseline (MiB) | seconds | other load |",
        "|---|---:|---:|---:|",
        f"| in memory (`load_model` + `accumulate_sensitivity`) | "
        f"{mem['peak_above_baseline_mib']:.0f} | {mem['seconds']:.1f} (load "
        f"{mem.get('load_seconds', 0):.1f}) | {_fmt(mem.get('other_load'))} |",
        f"| `--stream` | {st['peak_above_baseline_mib']:.0f} | {st['seconds']:.1f} | "
        f"{_fmt(st.get('other_load'))} |",
        "",
        f"- Peak memory, stream / in memory: **{goals['memory']['value']:.3f}** (goal ≤ "
        f"{GOAL_MEMORY}: {'met' if goals['memory']['met'] else 'NOT met'})",
        f"- Time, stream / in memory: **{goals['time']['value']:.2f}** (goal ≤ {GOAL_TIME:g}: "
        f"{'met' if goals['time']['met'] else 'NOT met'})",
        f"- Same result: largest relative difference between the two files "
        f"{result['max_rel_diff_stream_vs_memory']:.1e}; at most {st.get('max_live_layers')} "
        "decoder layer loaded at once while streaming.",
        "",
        "**Memory model** (P = parameter counts, b = bytes per weight, accumulators fp32):",
        "",
        "- in memory: `P_total·(b + 4) + P_embed·b` (every weight and accumulator, one gradient)",
        "- streamed: `max(P_layer·(b + 4) + P_largest_matrix·b, P_embed·(2b + 4))` (the largest "
        "stage: its weights, accumulators and gradient) + the kept activations held in memory: "
        "`(L + 1)·N·T·d·b` for N samples of T tokens (+ `N·V·d·b` when embedding and head are "
        "tied), in memory up to a quarter of the available memory, the rest in files "
        "(`--offload-dir`)",
        "",
        f"Measured / modelled peak here: k = {ex['k_stream']:.2f} streamed, "
        f"{ex['k_memory']:.2f} in memory (runtime overheads, activations, allocator slack). "
        f"Applied to Llama-2-70B (hidden 8192, 80 layers, MLP 28672, 8 KV heads, vocab 32000: "
        f"P_total = {ex['params']['total'] / 1e9:.1f}B, P_layer = "
        f"{ex['params']['layer'] / 1e6:.0f}M, P_embed = {ex['params']['embed'] / 1e6:.0f}M):",
        "",
        "| 70B weights | in memory (GiB) | streamed, without kept activations (GiB) | largest "
        "stage: layer / embedding (GiB) | kept activations, 32 × 2048 tokens (GiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label in ("bf16", "fp32"):
        e = ex[label]
        lines.append(f"| {label} | {e['memory_peak_gib']:.0f} | {e['stream_peak_gib']:.1f} | "
                     f"{e['layer_stage_gib']:.1f} / {e['embed_stage_gib']:.1f} | "
                     f"{e['kept_activations_gib_32x2048']:.0f} |")
    lines += [
        "",
        f"k was measured with {cfg['seq']}-token samples; a 2048-token sample's activations "
        "inside one 70B layer, `T·(6d + 4I)·b`, add about "
        f"{ex['bf16']['layer_activations_gib_2048']:.1f} GiB (bf16) / "
        f"{ex['fp32']['layer_activations_gib_2048']:.1f} GiB (fp32) to the layer stage.",
        "",
        "Peak RSS is `ru_maxrss` minus the RSS just before the teacher was touched. *Other load* "
        "is the share of the machine's CPU other processes used during the run.",
    ]
    if (result.get("other_load") or 0) > 0.1:
        lines += ["", "**Warning:** other processes kept the CPU busy during the run; the "
                  "times (and the time ratio) are disturbed. Re-run on a quiet machine."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=(*MODES, "generate"), help="internal: one step in this process")
    p.add_argument("--config", help="internal: JSON configuration for --mode")
    p.add_argument("--folder", help="internal: the teacher's folder")
    p.add_argument("--file", help="internal: sensitivity file to write")
    p.add_argument("--cache", default=str(CACHE), help="folder for the generated teacher")
    p.add_argument("--layers", type=int, default=DEFAULTS["layers"])
    p.add_argument("--hidden", type=int, default=DEFAULTS["hidden"])
    p.add_argument("--mlp", type=int, default=DEFAULTS["mlp"])
    p.add_argument("--samples", type=int, default=DEFAULTS["samples"])
    p.add_argument("--seq", type=int, default=DEFAULTS["seq"])
    p.add_argument("--clean", action="store_true",
                   help="remove the generated teacher afterwards (default: keep it for next time)")
    p.add_argument("--out", default=str(RESULTS), help="where to write the JSON result ('' = don't)")
    args = p.parse_args([] if argv is None and __name__ != "__main__" else argv)

    if args.mode:  # child
        cfg = dict(DEFAULTS, **json.loads(args.config))
        if args.mode == "generate":
            result = generate(cfg, Path(args.folder))
        else:
            result = run_mode(args.mode, cfg, Path(args.folder), Path(args.file))
        print(json.dumps(result), flush=True)
        return result

    cfg = dict(DEFAULTS, layers=args.layers, hidden=args.hidden, mlp=args.mlp,
               samples=args.samples, seq=args.seq)
    info = machine_info()
    print(f"machine: {machine_line(info)}", flush=True)
    folder = model_folder(cfg, Path(args.cache))
    folder.parent.mkdir(parents=True, exist_ok=True)
    generated = not folder.is_dir()
    if generated:
        print(f"writing the teacher to {folder} ...", flush=True)
        model = _spawn(["--mode", "generate", "--config", json.dumps(cfg), "--folder", str(folder)])
        print(f"  {model['params']:,} parameters, {model['shards']} shards, "
              f"{model['seconds']:.0f} s", flush=True)
    else:
        model = {"params": sizes(cfg)["total"],
                 "shards": len(list(folder.glob("*.safetensors"))), "seconds": 0.0}
    runs, files = {}, {}
    try:
        for mode in MODES:
            files[mode] = folder.parent / f"sens-{mode}.safetensors"
            t0 = time.perf_counter()
            runs[mode] = _spawn(["--mode", mode, "--config", json.dumps(cfg), "--folder",
                                 str(folder), "--file", str(files[mode])])
            print(f"  {mode:6s} peak +{runs[mode]['peak_above_baseline_mib']:7.0f} MiB  "
                  f"{runs[mode]['seconds']:6.1f} s  other load "
                  f"{_fmt(runs[mode].get('other_load'))}  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
        diff = compare_files(files["stream"], files["memory"])
    finally:
        for f in files.values():
            f.unlink(missing_ok=True)
        if args.clean:
            shutil.rmtree(folder, ignore_errors=True)
    result = summarise(runs, cfg, info, model, diff)
    print()
    print(to_markdown(result))
    save_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
