"""`paratransfer` command line: parse -> validate -> call a pipeline step. No logic here."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from paratransfer import __version__
from paratransfer.cli import data as cli_data
from paratransfer.cli import evaluate as cli_evaluate
from paratransfer.cli import laten as cli_laten
from paratransfer.cli import stability as cli_stability
from paratransfer.cli import train as cli_train
from paratransfer.cli.options import Parser, add_common, add_extraction, add_seed_data, add_threads
from paratransfer.demo.study import DEFAULT_STUDY_ARMS, STUDY_ARMS
from paratransfer.extract.settings import ExtractSettings
from paratransfer.io.console import quiet_libraries
from paratransfer.io.errors import UserError
from paratransfer.io.settings import add_setting_flags, from_args
from paratransfer.io.signals import Terminated, terminate_like_interrupt
from paratransfer.io.threads import apply_threads, choose_threads, prefer_passive_waiting


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="paratransfer",
        description="Parametric knowledge transfer from a teacher LLM to a student LLM.",
    )
    parser.add_argument("--version", action="version", version=f"paratransfer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sensitivity", help="score every teacher weight on a seed set: Σ|θ·∇L|")
    p.add_argument("--teacher", required=True, help="teacher model folder or hub id")
    p.add_argument("--seeds", required=True, help="seed examples (JSONL)")
    p.add_argument("--out", required=True, help="sensitivity file to write (.safetensors)")
    p.add_argument("--device-map", default=None,
                   help="spread a teacher too big for one device over all of them with accelerate "
                        "(auto|balanced|sequential); weights in --dtype, fp32 sums beside them")
    p.add_argument("--stream", action="store_true",
                   help="never hold the whole teacher: read one layer at a time from its "
                        "safetensors files (a local folder)")
    p.add_argument("--offload-dir", default=None,
                   help="with --stream: folder for kept activations that don't fit in memory "
                        "(default: beside --out)")
    add_seed_data(p)
    add_common(p)
    p.set_defaults(func=_cmd_sensitivity)

    p = sub.add_parser("extract", help="teacher -> LoRA adapter shaped for the student")
    p.add_argument("--teacher", required=True, help="teacher model folder or hub id")
    p.add_argument("--student", required=True, help="student model folder or hub id")
    p.add_argument("--out", required=True, help="adapter folder to write")
    p.add_argument("--seeds", default=None, help="seed examples (JSONL); needed without --sensitivity")
    p.add_argument("--sensitivity", default=None, help="reuse a file from `paratransfer sensitivity`")
    p.add_argument("--force", action="store_true", help="use a sensitivity file whose metadata does not match")
    add_setting_flags(p, ExtractSettings, only=("alpha", "dropout", "layers", "reduce", "seed"))
    add_extraction(p)
    add_seed_data(p)
    add_common(p)
    p.set_defaults(func=_cmd_extract)
    cli_train.register(sub)
    cli_evaluate.register(sub)
    cli_stability.register(sub)
    cli_data.register(sub)
    cli_laten.register(sub)

    p = sub.add_parser("run", help="a whole experiment from a recipe: arms x seeds, results table")
    p.add_argument("recipe", help="recipe file (YAML)")
    p.add_argument("--out", default=None, help="run folder (default: runs/RECIPE_NAME)")
    p.add_argument("--resume", action="store_true", help="continue a run, skipping finished steps")
    p.add_argument("--overwrite", action="store_true", help="start again in an existing run folder")
    p.add_argument("--jobs", type=int, default=1,
                   help="training chains (arm x seed) run at once, each in its own process "
                        "(default 1; the results do not depend on it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_threads(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("demo", help="the paper's experiment in miniature, offline on a CPU")
    p.add_argument("--out", default=None,
                   help="folder for the demo's outputs (default: out/demo); a demo run there "
                        "is resumed, any other existing folder is refused")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (once the new run is complete)")
    p.add_argument("--distill", action="store_true",
                   help="run the arms transfer, lora and distill (logit distillation from the "
                        "teacher, same budget) instead of the controls; default --out "
                        "out/demo-distill")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="a study: seeds 1..N on the same world and budget (default --out "
                        "out/demo-study, resumable; the default demo runs 3)")
    left_out = [a for a in STUDY_ARMS if a not in DEFAULT_STUDY_ARMS]
    p.add_argument("--arms", default=None,
                   help=f"a study's arms, comma-separated, lora among them: "
                        f"{', '.join(STUDY_ARMS)} (random: a random window of the teacher; "
                        f"default with --seeds: all but {', '.join(left_out)})")
    p.add_argument("--jobs", type=int, default=None,
                   help="training chains run at once (default 2, the demo's 2-core machine)")
    p.set_defaults(func=_cmd_demo)  # no --threads: its models are built and trained on one
    return parser


def _devices(args):
    from paratransfer.io.devices import pick_device, pick_dtype

    device = pick_device(args.device)
    return device, pick_dtype(args.dtype, device)


def _cmd_sensitivity(args) -> int:
    from paratransfer.sensitivity.settings import SensitivitySettings
    from paratransfer.sensitivity.step import run_sensitivity

    settings = from_args(SensitivitySettings, args)
    if args.offload_dir is not None and not args.stream:
        raise UserError("--offload-dir: only used with --stream")
    device, dtype = _devices(args)
    meta = run_sensitivity(args.teacher, args.seeds, args.out, settings, dtype, device,
                           overwrite=args.overwrite, progress=not args.quiet,
                           device_map=args.device_map, stream=args.stream,
                           offload_dir=args.offload_dir)
    if int(os.environ.get("RANK", "0")) == 0:  # one line under torchrun, from the writer
        print(f"wrote {args.out}: {meta['samples']} samples, teacher {meta['teacher']}")
    return 0


def _cmd_extract(args) -> int:
    from paratransfer.extract.step import run_extract
    from paratransfer.sensitivity.settings import SensitivitySettings

    settings = from_args(ExtractSettings, args)
    sens_settings = from_args(SensitivitySettings, args)
    device, dtype = _devices(args)
    report = run_extract(args.teacher, args.student, args.out, settings, seeds=args.seeds,
                         sensitivity_path=args.sensitivity, sens_settings=sens_settings,
                         dtype=dtype, device=device, force=args.force, overwrite=args.overwrite,
                         progress=not args.quiet)
    print(summarize_extraction(report, args.out))
    vocab = report.get("vocabulary")
    if vocab and not vocab.get("identical"):
        print(f"vocabulary: {vocab['matched']} of the student's {vocab['student_vocab_size']} "
              f"tokens found in the teacher's ({vocab['coverage']:.1%}); the rest get zero rows")
    for p in report.get("padded", []):
        print(f"zero-padded {p['name']} ({p['role']}): {p['rows']} rows, {p['cols']} columns")
    return 0


def summarize_extraction(report: dict, out) -> str:
    """A few lines saying what was selected, for the terminal."""
    energies = [m["energy"] for m in report["modules"]]
    lines = [
        f"wrote {out}: LoRA rank {report['rank']}, alpha {report['alpha']}, "
        f"{len(report['modules'])} matrices",
        f"teacher layers selected (in student order): {report['selected_layers']}",
        f"energy kept by rank {report['rank']}: mean {sum(energies) / max(len(energies), 1):.3f}, "
        f"min {min(energies, default=0):.3f}",
    ]
    svd = _svd_summary(report)
    if svd:
        lines.append(svd)
    for s in report.get("skipped", []):
        lines.append(f"skipped {s['role']}: {s['reason']}")
    return "\n".join(lines)


def _svd_summary(report: dict) -> str | None:
    """How `--svd auto` factorized the blocks (None for the other methods)."""
    blocks = [m["svd"] for m in {m["name"]: m for m in report["modules"]}.values()
              if "certified" in m.get("svd", {})]
    if not blocks:
        return None
    steps = [b["steps"] for b in blocks if b["method"] == "krylov"]
    small = sum(1 for b in blocks if b["method"] == "exact" and not b["steps"])
    spent = len(blocks) - len(steps) - small
    parts = [f"{len(steps)} certified by block Krylov"
             + (f" in {min(steps)}-{max(steps)} steps" if steps else "")]
    if small:
        parts.append(f"{small} small enough for the exact SVD")
    if spent:
        parts.append(f"{spent} by the exact SVD after the Krylov budget ran out")
    seconds = sum(report.get("timing", {}).get("svd_seconds", {}).values())
    return f"svd auto ({seconds:.1f} s): " + ", ".join(parts)


def _cmd_run(args) -> int:
    from paratransfer.experiment.recipe import load_recipe
    from paratransfer.experiment.results import to_markdown
    from paratransfer.experiment.runner import run_experiment, summary_line

    recipe = load_recipe(args.recipe)
    out = args.out or f"runs/{recipe.name}"
    result = run_experiment(recipe, out, resume=args.resume, overwrite=args.overwrite,
                            progress=not args.quiet, jobs=args.jobs)
    print()
    print(to_markdown(result))
    print(summary_line(result, out))
    return 0


def _cmd_demo(args) -> int:
    from paratransfer.demo.world import DEMO_JOBS, run_demo

    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs: expected at least 1 (got {args.jobs})")
    run_demo(args.out, overwrite=args.overwrite, distill=args.distill, seeds=args.seeds,
             arms=args.arms, jobs=args.jobs or DEMO_JOBS)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of both `paratransfer` and `python -m paratransfer`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    prefer_passive_waiting()  # before torch loads its OpenMP runtime (see io/threads.py)
    terminate_like_interrupt()
    args = build_parser().parse_args(argv)  # --help and usage errors end here, before any import
    quiet_libraries()                       # of torch or transformers
    if hasattr(args, "threads"):            # a command that runs a model
        apply_threads(choose_threads(args.threads))
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("interrupted (outputs are renamed into place only when complete; a training run or "
              "experiment continues with --resume)", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
