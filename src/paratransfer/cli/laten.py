"""`paratransfer laten`: parse -> validate -> call. No logic here."""

from __future__ import annotations

from paratransfer.cli.options import add_common
from paratransfer.io.settings import add_setting_flags, from_args


def register(sub) -> None:
    """Add the `laten` subcommand to `paratransfer`'s subparsers."""
    from paratransfer.laten.settings import LatenSettings

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
    add_setting_flags(p, LatenSettings)
    add_common(p)
    p.set_defaults(func=_cmd_laten)


def _cmd_laten(args) -> int:
    from paratransfer.io.devices import pick_device, pick_dtype
    from paratransfer.laten import LatenSettings, run_laten

    settings = from_args(LatenSettings, args)
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
