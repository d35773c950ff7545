"""`paratransfer train` and `paratransfer merge`: parse -> validate -> call. No logic here.

Data-parallel training is the same command under a launcher, e.g.
`torchrun --nproc_per_node 2 -m paratransfer train ...` (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import sys

from paratransfer.cli_options import add_common
from paratransfer.errors import UserError


def register(sub) -> None:
    """Add the `train` and `merge` subcommands to `paratransfer`'s subparsers."""
    from paratransfer.train import INITS, TrainSettings

    d = TrainSettings()
    p = sub.add_parser("train", help="LoRA fine-tuning of the student, from transferred or standard init")
    p.add_argument("--student", required=True, help="student model folder or hub id")
    p.add_argument("--data", required=True, help="training examples (JSONL)")
    p.add_argument("--out", required=True, help="run folder: adapter, train.json, loss.png, checkpoints")
    p.add_argument("--init", default=d.init, choices=list(INITS),
                   help="; ".join(f"{i.name}: {i.help}" for i in INITS.values()))
    p.add_argument("--adapter", default=None,
                   help="adapter from `paratransfer extract` (needed for --init "
                        f"{'/'.join(n for n, i in INITS.items() if i.needs_adapter)}; with the "
                        "others it only supplies rank, alpha and modules)")
    p.add_argument("--init-batches", type=int, default=d.init_batches,
                   help="for --init eva/corda: how many of training's first effective batches "
                        f"they read (default {d.init_batches})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"effective batch over all processes (default {d.batch_size})")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size,
                   help=f"examples per forward pass per process (default {d.micro_batch_size})")
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help=f"truncate examples to this many tokens (default {d.max_length})")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    p.add_argument("--rank", type=int, default=None, help="LoRA r (default: the adapter's, else 16)")
    p.add_argument("--alpha", type=float, default=None,
                   help="LoRA alpha (default: the adapter's, else 16)")
    p.add_argument("--dropout", type=float, default=d.dropout, help=f"LoRA dropout (default {d.dropout})")
    p.add_argument("--modules", default=None,
                   help="groups (embed,attn,mlp,head) or roles (default: the adapter's, else all)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help=f"steps between checkpoints (default {d.checkpoint_every})")
    p.add_argument("--eval-data", default=None,
                   help="held-out examples (JSONL): their answer-only loss is recorded in "
                        "train.json during training")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between held-out losses (default: about ten over the run)")
    p.add_argument("--distill", default=None, metavar="TEACHER",
                   help="also learn the teacher's next-token distributions (logit distillation; "
                        "same vocabulary): loss (1 - λ)·CE + λ·τ²·KL(teacher ‖ student); the "
                        "teacher is needed during training")
    p.add_argument("--distill-weight", type=float, default=d.distill_weight,
                   help=f"λ (default {d.distill_weight})")
    p.add_argument("--distill-temperature", type=float, default=d.distill_temperature,
                   help=f"τ (default {d.distill_temperature})")
    p.add_argument("--teacher-dtype", default=d.teacher_dtype,
                   help="dtype of the distillation teacher: auto (the training dtype), float32, "
                        "bfloat16, float16")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--prompt-format", default=d.prompt_format, help="tulu (docs/method.md §1) or chat-template")
    add_common(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("merge", help="student + adapter -> a standalone model folder")
    p.add_argument("--student", required=True, help="student model folder or hub id")
    p.add_argument("--adapter", required=True, help="adapter folder (e.g. a `train` run folder)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--dtype", default="auto", help="float32|bfloat16|float16 (auto: the student's own)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=_cmd_merge)


def _cmd_train(args) -> int:
    from paratransfer.devices import pick_device, pick_dtype
    from paratransfer.train import TrainSettings, run_train

    settings = TrainSettings(
        init=args.init, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, max_length=args.max_length,
        max_steps=args.max_steps, seed=args.seed, rank=args.rank, alpha=args.alpha,
        dropout=args.dropout, prompt_format=args.prompt_format,
        modules=tuple(args.modules.split(",")) if args.modules else None,
        checkpoint_every=args.checkpoint_every, eval_every=args.eval_every,
        distill=args.distill, distill_weight=args.distill_weight,
        distill_temperature=args.distill_temperature, teacher_dtype=args.teacher_dtype,
        init_batches=args.init_batches,
    )
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
    from paratransfer.devices import DTYPES
    from paratransfer.merge import run_merge

    if args.dtype in (None, "", "auto"):
        dtype = None
    elif args.dtype in DTYPES:
        dtype = DTYPES[args.dtype]
    else:
        raise UserError(f"--dtype: {args.dtype!r} is not known (expected auto, {', '.join(DTYPES)})")
    info = run_merge(args.student, args.adapter, args.out, dtype=dtype, overwrite=args.overwrite)
    print(f"wrote {args.out}: {info['student']} + {info['adapter']} merged ({info['dtype']})")
    return 0
