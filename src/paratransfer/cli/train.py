"""`paratransfer train` and `paratransfer merge`: parse -> validate -> call. No logic here.

Data-parallel training is the same command under a launcher, e.g.
`torchrun --nproc_per_node 2 -m paratransfer train ...` (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import sys

from paratransfer.cli.options import add_common, add_threads
from paratransfer.io.errors import UserError


def register(sub) -> None:
    """Add the `train` and `merge` subcommands to `paratransfer`'s subparsers."""
    from paratransfer.io.settings import add_setting_flags
    from paratransfer.train.inits import INITS
    from paratransfer.train.settings import TrainSettings

    p = sub.add_parser("train", help="LoRA fine-tuning of the student, from transferred or standard init")
    p.add_argument("--student", required=True, help="student model folder or hub id")
    p.add_argument("--data", required=True, help="training examples (JSONL)")
    p.add_argument("--out", required=True, help="run folder: adapter, train.json, loss.png, checkpoints")
    p.add_argument("--adapter", default=None,
                   help="adapter from `paratransfer extract` (needed for --init "
                        f"{'/'.join(n for n, i in INITS.items() if i.needs_adapter)}; with the "
                        "others it only supplies rank, alpha and modules)")
    p.add_argument("--eval-data", default=None,
                   help="held-out examples (JSONL): their answer-only loss is recorded in "
                        "train.json during training")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_setting_flags(p, TrainSettings)
    add_common(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("merge", help="student + adapter -> a standalone model folder")
    p.add_argument("--student", required=True, help="student model folder or hub id")
    p.add_argument("--adapter", required=True, help="adapter folder (e.g. a `train` run folder)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--dtype", default="auto", help="float32|bfloat16|float16 (auto: the student's own)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_threads(p)
    p.set_defaults(func=_cmd_merge)


def _cmd_train(args) -> int:
    from paratransfer.io.devices import pick_device, pick_dtype
    from paratransfer.io.settings import from_args
    from paratransfer.train import TrainSettings, run_train

    settings = from_args(TrainSettings, args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    try:
        result = run_train(args.student, args.data, args.out, settings, adapter_dir=args.adapter,
                           dtype=dtype, device=device, resume=args.resume,
                           overwrite=args.overwrite, progress=not args.quiet,
                           eval_data=args.eval_data)
    except KeyboardInterrupt:
        print(f"interrupted: continue with the same command plus --resume (checkpoints in "
              f"{args.out}/checkpoints)", file=sys.stderr)
        return 130
    s = result.summary
    if result.main and s.get("complete"):
        print(f"wrote {args.out}: {s['init']} init, {s['steps_done']} steps, final loss "
              f"{s['final_loss']:.4f}, LoRA rank {s['adapter_rank']} on the unmodified student")
    return 0


def _cmd_merge(args) -> int:
    from paratransfer.adapter.merge import run_merge
    from paratransfer.io.devices import DTYPES

    if args.dtype in (None, "", "auto"):
        dtype = None
    elif args.dtype in DTYPES:
        dtype = DTYPES[args.dtype]
    else:
        raise UserError(f"--dtype: {args.dtype!r} is not known (expected auto, {', '.join(DTYPES)})")
    info = run_merge(args.student, args.adapter, args.out, dtype=dtype, overwrite=args.overwrite)
    print(f"wrote {args.out}: {info['student']} + {info['adapter']} merged ({info['dtype']})")
    return 0
