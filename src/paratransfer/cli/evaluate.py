"""`paratransfer evaluate`: parse -> validate -> call. No logic here."""

from __future__ import annotations

from paratransfer.cli.options import add_common


def register(sub) -> None:
    """Add the `evaluate` subcommand to `paratransfer`'s subparsers."""
    from paratransfer.evaluate import TASKS
    from paratransfer.evaluate.settings import EvalSettings
    from paratransfer.io.settings import add_setting_flags

    tasks = "|".join(TASKS)
    p = sub.add_parser(
        "evaluate", help=f"score a model (optionally + a LoRA) on {tasks}",
        description="Prompt length: every prompt plus the room for its answer (--max-new-tokens, "
                    "or the longest choice for mmlu) must fit the model's context. A few-shot "
                    "prompt that does not fit gets fewer worked examples (the last ones dropped "
                    "first; predictions.jsonl records how many); one that does not fit even "
                    "without any is, by --overlong, refused with its record's FILE:LINE before "
                    "the model is loaded (refuse, the default), left out and listed in "
                    "metrics.json (skip), or given with its instruction cut from the left until "
                    "it fits (truncate).")
    p.add_argument("--model", required=True,
                   help="causal LM folder or hub id (merged model, plain student, teacher)")
    p.add_argument("--adapter", default=None,
                   help="LoRA folder (e.g. a `train` run) applied to --model on the fly")
    p.add_argument("--task", required=True, help=f"{tasks}")
    p.add_argument("--data", required=True, help="records to evaluate on (JSONL)")
    p.add_argument("--out", required=True, help="results folder: metrics.json, predictions.jsonl")
    p.add_argument("--shots-data", default=None, help="records to take the worked examples from")
    p.add_argument("--judge", default=None, help="open: judge model folder or hub id")
    p.add_argument("--reference", default=None,
                   help="open: results folder of the run to compare with (needs --judge)")
    add_setting_flags(p, EvalSettings)
    add_common(p)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    from paratransfer.evaluate.run import run_evaluate
    from paratransfer.evaluate.settings import EvalSettings
    from paratransfer.io.devices import pick_device, pick_dtype
    from paratransfer.io.settings import from_args

    settings = from_args(EvalSettings, args, task=args.task)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    m = run_evaluate(args.model, args.data, args.out, settings, adapter=args.adapter,
                     shots_data=args.shots_data, judge=args.judge, reference=args.reference,
                     dtype=dtype, device=device, overwrite=args.overwrite, progress=not args.quiet)
    others = ", ".join(f"{k} {v:.4f}" for k, v in m["metrics"].items() if k != m["metric"])
    print(f"wrote {args.out}: {m['task']} {m['metric']} {m['value']:.4f} on {m['n']} examples"
          f"{f' ({others})' if others else ''}, {m['timing']['seconds']:.0f} s")
    return 0
