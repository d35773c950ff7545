"""`paratransfer stability`: parse -> validate -> call. No logic here."""

from __future__ import annotations

from paratransfer.cli.options import EXTRACTION_KEPT, add_common, add_extraction, add_seed_data


def register(sub) -> None:
    """Add the `stability` subcommand to `paratransfer`'s subparsers."""
    from paratransfer.io.settings import add_setting_flags
    from paratransfer.stability.settings import WINDOW_REDUCTIONS, StabilitySettings

    p = sub.add_parser("stability",
                       help="how much the selected layers, windows and factor subspaces change "
                            "with the seed set (random subsets of a pool)")
    p.add_argument("--teacher", required=True, help="teacher model folder or hub id")
    p.add_argument("--student", required=True, help="student model folder or hub id")
    p.add_argument("--seeds", required=True,
                   help="the pool of seed examples (JSONL) that subsets are drawn from")
    p.add_argument("--out", required=True,
                   help="folder to write: stability.json, stability.md, stability.png")
    add_setting_flags(p, StabilitySettings)  # --sizes, --draws, --seed (also the extraction's)
    p.add_argument("--reduce", default="window", help="|".join(WINDOW_REDUCTIONS))
    p.add_argument("--work-dir", default=None,
                   help="where the per-sample sensitivity files go while the command runs "
                        "(pool size x one sensitivity file; deleted at the end; default: "
                        "inside the output's temporary folder)")
    add_extraction(p)
    add_seed_data(p)
    add_common(p)
    p.set_defaults(func=_cmd_stability)


def _cmd_stability(args) -> int:
    from paratransfer.extract.settings import ExtractSettings
    from paratransfer.io.devices import pick_device, pick_dtype
    from paratransfer.io.settings import from_args
    from paratransfer.sensitivity.settings import SensitivitySettings
    from paratransfer.stability.pool import run_stability
    from paratransfer.stability.settings import StabilitySettings

    settings = from_args(StabilitySettings, args)
    extract_settings = from_args(ExtractSettings, args, only=(*EXTRACTION_KEPT, "reduce", "seed"))
    sens_settings = from_args(SensitivitySettings, args)
    device = pick_device(args.device)
    report = run_stability(args.teacher, args.student, args.seeds, args.out, settings,
                           extract_settings, sens_settings, dtype=pick_dtype(args.dtype, device),
                           device=device, overwrite=args.overwrite, progress=not args.quiet,
                           work_dir=args.work_dir)
    print(f"wrote {args.out}: {report['pool']['samples']} pool samples, "
          f"{report['settings']['draws']} draws per size; whole pool selects teacher layers "
          f"{report['full_pool']['selected_layers']}")
    for s in report["sizes"]:
        windows = [v["mean"] for v in s["window_iou"].values() if v]
        spaces = [v["mean"] for v in s["subspace"].values() if v]
        print(f"  {s['size']:>4} seeds: layers Jaccard {s['layers']['mean']:.2f}, "
              f"window IoU {sum(windows) / max(len(windows), 1):.2f}, "
              f"subspace cos² {sum(spaces) / max(len(spaces), 1):.2f} (means over families)")
    return 0
