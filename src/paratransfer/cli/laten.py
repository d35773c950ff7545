"""`paratransfer laten`: parse -> validate -> call. No logic here."""

from __future__ import annotations

from paratransfer.cli.options import add_common


def register(sub) -> None:
    """Add the `laten` subcommand to `paratransfer`'s subparsers."""
    from paratransfer.laten.settings import LATEN_ROLES, LatenSettings

    d = LatenSettings()
    p = sub.add_parser("laten",
                       help="LaTen (Locate-Then-Align): locate neurons by attribution, train a "
                            "translator for a few steps, inject once; writes a PEFT adapter")
    p.add_argument("--teacher", required=True, help="teacher model folder or hub id")
    p.add_argument("--student", required=True, help="student model folder or hub id")
    p.add_argument("--seeds", required=True,
                   help="seed examples (JSONL): one locates the neurons of each step, and one "
                        "the injected ones")
    p.add_argument("--data", default=None,
                   help="examples the rest of each step's batch is drawn from (JSONL; default: "
                        "the other seed examples)")
    p.add_argument("--out", required=True,
                   help="folder to write: adapter_config.json, adapter_model.safetensors, "
                        "translator.safetensors, laten.json")
    p.add_argument("--rate", type=float, default=d.rate,
                   help=f"share of each student module's neurons located (default {d.rate})")
    p.add_argument("--steps", type=int, default=d.steps,
                   help=f"translator training steps (default {d.steps})")
    p.add_argument("--batch", type=int, default=d.batch,
                   help=f"examples per step, the locating one included (default {d.batch})")
    p.add_argument("--lr", type=float, default=d.lr,
                   help=f"peak learning rate, one-cycle schedule (default {d.lr:g})")
    p.add_argument("--reg-weight", type=float, default=d.reg_weight,
                   help=f"weight of the mean square of what is added (default {d.reg_weight:g})")
    p.add_argument("--modules", default=",".join(LATEN_ROLES),
                   help=f"roles to transfer, some of {','.join(LATEN_ROLES)} (default all)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed})")
    p.add_argument("--prompt-format", default=d.prompt_format,
                   help="tulu (docs/method.md §1) or chat-template")
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help=f"truncate examples to this many tokens (default {d.max_length})")
    add_common(p)
    p.set_defaults(func=_cmd_laten)


def _cmd_laten(args) -> int:
    from paratransfer.io.devices import pick_device, pick_dtype
    from paratransfer.laten import LatenSettings, run_laten

    settings = LatenSettings(rate=args.rate, steps=args.steps, batch=args.batch, lr=args.lr,
                             reg_weight=args.reg_weight,
                             roles=tuple(r.strip() for r in args.modules.split(",") if r.strip()),
                             seed=args.seed, prompt_format=args.prompt_format,
                             max_length=args.max_length)
    device = pick_device(args.device)
    report = run_laten(args.teacher, args.student, args.seeds, args.out, settings, data=args.data,
                       dtype=pick_dtype(args.dtype, device), device=device,
                       overwrite=args.overwrite, progress=not args.quiet)
    last = report["curve"][-1]
    print(f"wrote {args.out}: {report['adapter']['modules']} modules, LoRA rank "
          f"{report['adapter']['rank']} (scale 1); neurons per layer {report['neuron_counts']}")
    print(f"teacher layers (attention, MLP): {report['located']['teacher']['layers']['attn']}, "
          f"{report['located']['teacher']['layers']['ffn']}; last step: LM loss "
          f"{last['lm_loss']:.4f} (student alone {last['student_lm_loss']:.4f})")
    return 0
