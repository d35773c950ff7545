"""The built-in demo (`paratransfer demo`, `make demo`): the paper's experiment in miniature,
offline on a CPU, with the controls that say what a difference would mean.

A task family generated here (two-step arithmetic word problems with worked answers, GSM-like)
with seed / train / held-out / test splits; a small word-level tokenizer; a teacher (Llama
architecture, deeper and wider) trained on the task family until it is competent; a smaller
student trained on a related but weaker family (one-step problems) so that it is clearly worse.
Both are built deterministically (checksums in world.json) and cached under the user's cache
folder, rebuilt only when missing. Then the recipe runs four arms over three seeds — transfer,
lora (the baseline), pissa and spectrum (the controls) — two training chains at a time, and the
table is printed as it comes out, whether or not transfer helps at this scale.

The training budget was chosen on the baseline alone, before looking at transfer: the `lora`
arm must close at least a quarter of the student -> teacher gap on the test set.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from paratransfer.io.errors import UserError

DEMO_VERSION = "3"
NAMES = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon"]
THINGS = ["pens", "cups", "eggs", "keys", "hats", "jars", "maps", "nuts"]


@dataclass(frozen=True)
class WorldSpec:
    """What the demo world is made of: the two models (tiny_model kwargs), how long each is
    pretrained and at what peak learning rate, and the sizes of the data splits."""

    teacher: dict = field(default_factory=lambda: dict(hidden=64, layers=4, heads=4, kv_heads=2,
                                                        mlp=176, seed=1))
    student: dict = field(default_factory=lambda: dict(hidden=48, layers=2, heads=4, kv_heads=2,
                                                        mlp=128, seed=2))
    teacher_steps: int = 1000
    teacher_lr: float = 3e-3
    student_steps: int = 400
    student_lr: float = 3e-3
    pretrain_records: int = 20000  # per model, from its own task family
    seeds: int = 32
    train: int = 4000  # fresh records: enough that LoRA learns the task, not the set
    heldout: int = 128  # the held-out loss curve during training
    test: int = 300


WORLD = WorldSpec()
PRETRAIN_BATCH = 64

#: The recipe the demo runs (same keys as any recipe file; the paths are filled in). Its
#: training budget was chosen on the `lora` arm alone: the smallest tried that closes at least
#: a quarter of the student -> teacher gap (2500 steps at 3e-3 closed about 40% in the trials).
DEMO_RECIPE = {
    "name": "demo",
    "seeds": [1, 2, 3],
    "arms": {"transfer": {}, "lora": {"init": "standard"}, "pissa": {"init": "pissa"},
             "spectrum": {"init": "spectrum"}},
    "rank": 8, "alpha": 16, "dropout": 0.0, "max_length": 256, "max_samples": 32,
    "epochs": 1, "max_steps": 2500, "lr": 3e-3, "batch_size": 16, "micro_batch_size": 16,
    "checkpoint_every": 500, "eval_every": 250, "eval_batch_size": 100, "max_new_tokens": 48,
    "dtype": "float32",
}
#: Training chains run at once (one per core of the 2-core machines the demo is sized for).
DEMO_JOBS = 2
#: `paratransfer demo --distill`: the distillation arm beside transfer and lora, same budget.
#: Not in the default demo: a distill step costs about two plain ones here, and the four-arm
#: demo already fills most of its 15-minute budget on a 2-core machine.
DISTILL_RECIPE = {**DEMO_RECIPE, "name": "demo-distill",
                  "arms": {"transfer": {}, "lora": {"init": "standard"},
                           "distill": {"init": "standard", "distill": True}}}


# --------------------------------------------------------------------------- the task family


def two_step(rng: random.Random) -> tuple[str, str]:
    """The task: gain then loss, answered with a worked solution ending in the number."""
    a, b = rng.randint(10, 59), rng.randint(10, 39)
    c = rng.randint(1, a + b - 1)
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    q = f"{name} has {a} {thing}, gets {b} more and gives away {c}. How many {thing} now?"
    return q, f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}. So the answer is {a + b - c}."


def one_step(rng: random.Random) -> tuple[str, str]:
    """The student's weaker, related family: a gain only."""
    a, b = rng.randint(10, 59), rng.randint(10, 39)
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    q = f"{name} has {a} {thing} and gets {b} more. How many {thing} now?"
    return q, f"{a} + {b} = {a + b}. So the answer is {a + b}."


def arithmetic_records(n: int, seed: int = 0,
                       family: Callable[[random.Random], tuple[str, str]] = two_step,
                       prefix: str = "arith") -> list[dict]:
    """`n` chat records of a task family, deterministic for a seed, in the GSM chat records'
    format (so the demo's models are asked exactly what `evaluate --task gsm` asks)."""
    from paratransfer.tasks.gsm import INSTRUCTION

    rng = random.Random(seed)
    records = []
    for i in range(n):
        q, a = family(rng)
        records.append({"id": f"{prefix}-{i}", "messages": [
            {"role": "user", "content": f"{INSTRUCTION}Question: {q}"},
            {"role": "assistant", "content": f"Answer: {a}"}]})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- building the pair


#: Words (with their leading space), single digits, punctuation and lone whitespace: about a
#: third of the tokens a character tokenizer needs for the same text, so training is faster.
WORD_PATTERN = r" ?[A-Za-z]+|\d| ?[^\sA-Za-z\d]|\s"


def demo_tokenizer(texts: list[str]):
    """A small word-level tokenizer built from the task family's text (offline, deterministic).

    Numbers are split into digits, so every number can be written; text outside the family
    maps to <unk>.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from paratransfer.demo.tiny import SPECIAL_TOKENS

    split = pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated")
    pieces = {p for t in texts for p, _ in split.pre_tokenize_str(t)}
    pieces |= set("0123456789") | {" ", "\n"}
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for piece in sorted(pieces):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
        eos_token="</s>", additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"])


def cache_root() -> Path:
    """$PARATRANSFER_CACHE, else $XDG_CACHE_HOME/paratransfer, else ~/.cache/paratransfer."""
    if os.environ.get("PARATRANSFER_CACHE"):
        return Path(os.environ["PARATRANSFER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "paratransfer"


def pretrain(model: torch.nn.Module, tokenizer, records: list[dict], steps: int, lr: float,
             seed: int, label: str) -> list[float]:
    """Full-parameter training from scratch (answer-only loss), deterministic for a seed."""
    from paratransfer.io.console import progress as progress_bar
    from paratransfer.tasks import examples as data

    examples = [data.tokenize_example(
        data.example_from_record(r, source=f"{label}:{i}", default_id=str(i)), tokenizer)
        for i, r in enumerate(records)]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    pad = tokenizer.pad_token_id
    losses: list[float] = []
    model.train()
    bar = progress_bar(range(steps), desc=f"pretrain {label}", unit="step")
    for _ in bar:
        idx = torch.randint(len(examples), (PRETRAIN_BATCH,), generator=gen).tolist()
        batch = [examples[i] for i in idx]
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        for row, b in enumerate(batch):
            ids[row, :len(b["input_ids"])] = torch.tensor(b["input_ids"])
            labels[row, :len(b["labels"])] = torch.tensor(b["labels"])
        loss = model(input_ids=ids, attention_mask=(labels != -100) | (ids != pad),
                     labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def file_checksums(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root` (relative path -> hex), world.json aside."""
    from paratransfer.tasks.examples import file_digest

    return {str(p.relative_to(root)): file_digest(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "world.json"}


def build_world(root: Path, spec: WorldSpec = WORLD, say: Callable[[str], None] = print) -> dict:
    """Data splits, tokenizer, teacher and student into `root` (a fresh folder); returns
    world.json's content.

    Pretraining runs on one thread whatever the machine's setting, so the weights are the same
    on every run and thread count (on one kind of CPU and torch version: other kernels round
    differently); world.json records every file's checksum.
    """
    from paratransfer.demo.tiny import save_tiny, tiny_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        corpus = [m["content"] for fam in (two_step, one_step)
                  for r in arithmetic_records(2000, seed=7, family=fam) for m in r["messages"]]
        tokenizer = demo_tokenizer(corpus)
        for name, n, seed in (("seeds", spec.seeds, 101), ("train", spec.train, 102),
                              ("test", spec.test, 103), ("heldout", spec.heldout, 104)):
            write_jsonl(root / f"{name}.jsonl", arithmetic_records(n, seed=seed, prefix=name))
        info: dict = {"version": DEMO_VERSION, "spec": asdict(spec)}
        timing = {}
        for who, family, kwargs, steps, lr, data_seed in (
                ("teacher", two_step, spec.teacher, spec.teacher_steps, spec.teacher_lr, 201),
                ("student", one_step, spec.student, spec.student_steps, spec.student_lr, 202)):
            model = tiny_model("llama", vocab=len(tokenizer), **kwargs)
            started = time.time()
            records = arithmetic_records(spec.pretrain_records, data_seed, family, who)
            losses = pretrain(model, tokenizer, records, steps, lr, seed=data_seed, label=who)
            save_tiny(model, tokenizer, root / who)
            timing[who] = round(time.time() - started, 1)
            final = sum(losses[-20:]) / len(losses[-20:])
            info[who] = {**kwargs, "family": family.__name__, "steps": steps, "lr": lr,
                         "parameters": sum(p.numel() for p in model.parameters()),
                         "final_loss": final}
            say(f"demo: {who} pretrained on {family.__name__} problems: {steps} steps, final "
                f"loss {final:.3f} ({timing[who]:.0f} s)")
    finally:
        torch.set_num_threads(threads)
    info["checksums"] = file_checksums(root)
    info["timing_seconds"] = timing
    (root / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def ensure_world(cache: Path | None = None, spec: WorldSpec = WORLD) -> Path:
    """The cached demo world, built (atomically) only when missing."""
    root = (cache or cache_root()) / f"demo-world-v{DEMO_VERSION}"
    if (root / "world.json").is_file():
        print(f"demo: using the cached teacher and student in {root}", flush=True)
        return root
    print(f"demo: building the task data, a teacher and a student in {root} "
          "(once; a few minutes on a CPU)", flush=True)
    from paratransfer.io.outputs import atomic_dir

    with atomic_dir(root, overwrite=True) as tmp:  # a world without world.json is replaced
        build_world(tmp, spec, say=lambda line: print(line, flush=True))
    return root


def demo_recipe(world: Path, distill: bool = False, base: dict | None = None,
                jobs: int = DEMO_JOBS) -> Path:
    """Write the demo's recipe file beside the world (so users can read and rerun it).

    `base`: another recipe on the same world (a study, demo_study.py), named by its `name`."""
    import yaml

    if base is None:
        base = DISTILL_RECIPE if distill else DEMO_RECIPE
    name = base["name"]
    recipe = {**base, "teacher": str(world / "teacher"), "student": str(world / "student"),
              "task": {"type": "gsm", "seeds": str(world / "seeds.jsonl"),
                       "train": str(world / "train.jsonl"), "eval": str(world / "test.jsonl"),
                       "heldout": str(world / "heldout.jsonl")}}
    path = world / f"{name}.yaml"
    text = (f"# paratransfer run {path} --out out/{name} --jobs {jobs}\n"
            + yaml.safe_dump(recipe, sort_keys=False))
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def demo_out(out: str | Path | None, overwrite: bool = False,
             default: str = "demo") -> tuple[Path, bool]:
    """The demo's output folder and whether to resume a demo run there.

    A folder holding anything but a demo run is never touched: the demo refuses it unless
    `overwrite` (then it is replaced once the new run is complete).
    """
    from paratransfer.io.errors import UserError

    out = Path(out) if out else Path("out") / default
    if overwrite:
        return out, False
    if (out / "recipe.json").is_file():
        return out, True
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not a demo run (no recipe.json); give another "
                        "--out, or pass --overwrite to replace it")
    return out, False


def run_demo(out: str | Path | None = None, cache: Path | None = None,
             overwrite: bool = False, distill: bool = False, seeds: int | None = None,
             arms: str | None = None, jobs: int = DEMO_JOBS, spec: WorldSpec = WORLD,
             changes: dict | None = None) -> dict:
    """Build (or reuse) the world, run the recipe (resuming a previous demo run), print the table.

    `distill`: the distillation recipe (transfer, lora, distill) instead of the controls'.
    `seeds` / `arms` (comma-separated names): a study on the same world and budget with seeds
    1..N and those arms (demo/study.py), into out/demo-study. `spec` and `changes` (recipe
    settings) make smaller worlds and budgets, for tests."""
    from paratransfer.experiment.recipe import load_recipe
    from paratransfer.experiment.results import to_markdown
    from paratransfer.experiment.runner import run_experiment, summary_line

    base = DISTILL_RECIPE if distill else DEMO_RECIPE
    if seeds is not None or arms is not None:
        from paratransfer.demo.study import study_recipe

        if distill:
            raise UserError("--distill and --seeds/--arms: give the distill arm in --arms instead")
        base = study_recipe(DEMO_RECIPE, seeds, arms)
    base = {**base, **(changes or {})}
    # Models this small gain nothing from a second thread, and on a busy machine two thrash.
    torch.set_num_threads(1)
    started = time.time()
    out, resume = demo_out(out, overwrite, base["name"])  # before any work
    world = ensure_world(cache, spec)
    recipe = load_recipe(demo_recipe(world, base=base, jobs=jobs))
    result = run_experiment(recipe, out, resume=resume,
                            overwrite=overwrite and out.exists(), progress=True, jobs=jobs)
    print()
    print(to_markdown(result))
    print(summary_line(result, out) + f" (demo: {math.ceil(time.time() - started)} s in all)")
    return result
