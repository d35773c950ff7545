"""`paratransfer data`: parse -> validate -> call. No logic here."""

from __future__ import annotations

import argparse

from paratransfer.io.errors import UserError


def _epilog() -> str:
    from paratransfer.sources import FORMATS, RULE

    lines = ["tasks (fields read, with their default columns; --columns FIELD=COLUMN,... changes them):"]
    for fmt in FORMATS.values():
        fields = ", ".join(f"{f.name}={f.column or '?'}{'' if f.required else ' (optional)'}"
                           for f in fmt.all_fields)
        hub = f"--from {fmt.hub_id}" + (f" --config {fmt.hub_config}" if fmt.hub_config else "")
        lines.append(f"  {fmt.name}: {fmt.description}")
        lines.append(f"      fields: {fields}")
        lines.append(f"      train split: {fmt.train_split}; eval split: {fmt.eval_split}"
                     f"{'; usual source: ' + hub if fmt.hub_id else ''}; scored by evaluate --task "
                     f"{fmt.evaluate_task}")
    lines += ["", f"sampling: {RULE}.", "",
              "examples:",
              "  paratransfer data gsm --from openai/gsm8k --out data/gsm",
              "  paratransfer data lima --from hf://datasets/GAIR/lima/train.jsonl --out data/lima",
              "  paratransfer data gsm --from my_gsm8k_saved_with_save_to_disk --out data/gsm",
              "  paratransfer data open --from qa.jsonl --columns user=prompt,assistant=response "
              "--eval-split rest --out data/qa"]
    return "\n".join(lines)


def register(sub) -> None:
    """Add the `data` subcommand to `paratransfer`'s subparsers."""
    from paratransfer.sources import FORMATS

    p = sub.add_parser(
        "data", help="seed / train / eval files in the project's formats from a dataset",
        description="Build OUT/seeds.jsonl, train.jsonl, eval.jsonl and data.json for a task from "
                    "a Hugging Face dataset (through the `datasets` library) or local files.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", metavar="TASK", help="|".join(FORMATS))
    p.add_argument("--from", dest="source", required=True,
                   help="hub dataset id (e.g. openai/gsm8k), a folder saved with save_to_disk, "
                        "a folder of data files (train.jsonl, test.jsonl, ...), or one "
                        "JSON/JSONL/Parquet/CSV file (local or hf://datasets/...), read as split train")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--config", default=None,
                   help="hub dataset config (default: main for openai/gsm8k, all for cais/mmlu)")
    p.add_argument("--revision", default=None, help="hub dataset revision (branch, tag or commit)")
    p.add_argument("--columns", default=None,
                   help="FIELD=COLUMN,... where the task's fields are in this dataset "
                        "(e.g. question=prompt,answer=solution)")
    p.add_argument("--train-split", default=None,
                   help="split the seeds and training examples come from; A+B joins splits "
                        "(default: the task's, see below)")
    p.add_argument("--eval-split", default=None,
                   help="split to evaluate on, or 'rest': training-split rows not drawn "
                        "(default: the task's)")
    p.add_argument("--seeds-count", type=int, default=32, help="seed examples (default 32; 0: none)")
    p.add_argument("--train-count", type=int, default=1000,
                   help="training examples (default 1000; 0: no seeds or train file)")
    p.add_argument("--eval-count", default="all", help="N or all (default all; 0: no eval file)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_data)


def _eval_count(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--eval-count: {text!r} is not a number (expected N or all)") from None


def _cmd_data(args) -> int:
    from paratransfer.sources import DataSettings, build_data

    settings = DataSettings(
        task=args.task, source=args.source, config=args.config, revision=args.revision,
        columns=args.columns, train_split=args.train_split, eval_split=args.eval_split,
        seeds_count=args.seeds_count, train_count=args.train_count,
        eval_count=_eval_count(args.eval_count), seed=args.seed,
    )
    if args.quiet:
        import datasets

        datasets.disable_progress_bars()
    info = build_data(settings, args.out, overwrite=args.overwrite)
    c = info["counts"]
    print(f"wrote {args.out}: {c['seeds']} seeds, {c['train']} train, {c['eval']} eval records "
          f"({info['task']} from {info['source']['from']}; evaluate with --task "
          f"{info['evaluate_task']})")
    return 0
