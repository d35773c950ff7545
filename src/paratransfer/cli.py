"""`paratransfer` command line: parse -> validate -> call a pipeline step. No logic here."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from paratransfer import __version__, cli_data, cli_evaluate, cli_stability, cli_train
from paratransfer.cli_options import Parser, add_common, add_extraction, add_seed_data
from paratransfer.console import quiet_libraries
from paratransfer.errors import UserError


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
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16; scale alpha/r)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout recorded in the adapter")
    p.add_argument("--layers", default="sensitivity", help="sensitivity|first|last|uniform|random|depth (a teacher "
                   "shallower than the student is mapped by relative depth)")
    p.add_argument("--reduce", default="window",
                   help="window|window-heads|rows-cols|first|random (window-heads: q/k/v/o "
                        "blocks start and end on attention-head boundaries)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random strategies")
    add_extraction(p)
    add_seed_data(p)
    add_common(p)
    p.set_defaults(func=_cmd_extract)
    cli_train.register(sub)
    cli_evaluate.register(sub)
    cli_stability.register(sub)
    cli_data.register(sub)

    p = sub.add_parser("run", help="a whole experiment from a recipe: arms x seeds, results table")
    p.add_argument("recipe", help="recipe file (YAML)")
    p.add_argument("--out", default=None, help="run folder (default: runs/RECIPE_NAME)")
    p.add_argument("--resume", action="store_true", help="continue a run, skipping finished steps")
    p.add_argument("--overwrite", action="store_true", help="start again in an existing run folder")
    p.add_argument("--jobs", type=int, default=1,
                   help="training chains (arm x seed) run at once, each in its own process "
                        "(default 1; the results do not depend on it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
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
    p.set_defaults(func=_cmd_demo)
    return parser


def _devices(args):
    from paratransfer.devices import pick_device, pick_dtype

    device = pick_device(args.device)
    return device, pick_dtype(args.dtype, device)


def _cmd_sensitivity(args) -> int:
    from paratransfer.pipeline import SensitivitySettings, run_sensitivity

    settings = SensitivitySettings(args.prompt_format, args.max_length, args.max_samples)
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
    from paratransfer.extract import ExtractSettings
    from paratransfer.pipeline import SensitivitySettings, run_extract

    settings = ExtractSettings(rank=args.rank, alpha=args.alpha, layers=args.layers,
                               reduce=args.reduce, modules=tuple(args.modules.split(",")),
                               svd=args.svd, seed=args.seed, dropout=args.dropout,
                               min_vocab_coverage=args.min_vocab_coverage,
                               allow_pad=args.allow_pad)
    sens_settings = SensitivitySettings(args.prompt_format, args.max_length, args.max_samples)
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
    from paratransfer.experiment import run_experiment, summary_line
    from paratransfer.recipe import load_recipe
    from paratransfer.results import to_markdown

    recipe = load_recipe(args.recipe)
    out = args.out or f"runs/{recipe.name}"
    result = run_experiment(recipe, out, resume=args.resume, overwrite=args.overwrite,
                            progress=not args.quiet, jobs=args.jobs)
    print()
    print(to_markdown(result))
    print(summary_line(result, out))
    return 0


def _cmd_demo(args) -> int:
    from paratransfer.demo import run_demo

    run_demo(args.out, overwrite=args.overwrite, distill=args.distill)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of both `paratransfer` and `python -m paratransfer`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (outputs are renamed into place only when complete; a training run or "
              "experiment continues with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
