"""`paratransfer stability`: parse -> validate -> call. No logic here."""

from __future__ import annotations

from paratransfer.cli.options import add_common, add_extraction, add_seed_data


def register(sub) -> None:
    """Add the `stability` subcommand to `paratransfer`'s subparsers."""
    from paratransfer.stability.settings import DEFAULT_DRAWS, DEFAULT_SIZES, WINDOW_REDUCTIONS

    p = sub.add_parser("stability",
                       help="how much the selected layers, windows and factor subspaces change "
                            "with the seed set (random subsets of a pool)")
    p.add_argument("--teacher", required=True, help="teacher model folder or hub id")
    p.add_argument("--student", required=True, help="student model folder or hub id")
    p.add_argument("--seeds", required=True,
                   help="the pool of seed examples (JSONL) that subsets are drawn from")
    p.add_argument("--out", required=True,
                   help="folder to write: stability.json, stability.md, stability.png")
    p.add_argument("--sizes", default=None,
                   help="seed-set sizes to draw, comma-separated (default: "
                        f"{','.join(map(str, DEFAULT_SIZES))}, those below the pool size)")
    p.add_argument("--draws", type=int, default=DEFAULT_DRAWS,
                   help=f"random subsets per size (default {DEFAULT_DRAWS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random subsets (default 0)")
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
    from paratransfer.extract.plan import ExtractSettings
    from paratransfer.io.devices import pick_device, pick_dtype
    from paratransfer.sensitivity.step import SensitivitySettings
    from paratransfer.stability.pool import StabilitySettings, parse_sizes, run_stability

    settings = StabilitySettings(parse_sizes(args.sizes), args.draws, args.seed)
    extract_settings = ExtractSettings(rank=args.rank, reduce=args.reduce,
                                       modules=tuple(args.modules.split(",")), svd=args.svd,
                                       seed=args.seed, min_vocab_coverage=args.min_vocab_coverage,
                                       allow_pad=args.allow_pad)
    sens_settings = SensitivitySettings(args.prompt_format, args.max_length, args.max_samples)
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
