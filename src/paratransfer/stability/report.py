"""The stability report: stability.json (every figure), stability.md (the summary people read)
and stability.png (overlap against seed-set size per module family; layer selection heat map)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from paratransfer import __version__
from paratransfer.arch import ROLES
from paratransfer.io.outputs import write_json
from paratransfer.io.threads import runtime


def stats(values: Sequence[float | None]) -> dict[str, float] | None:
    """Mean, sample standard deviation, min, quartiles, max and count of the values that exist."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    q25, _, q75 = (statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1
                   else values * 3)
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "q25": q25, "q75": q75, "max": max(values), "n": len(values)}


def _family_order(name: str) -> int:
    """Families in model order (embed, q, k, v, o, gate, up, down, head); fused ones by their
    first role ("q+k+v")."""
    first = name.split("+")[0]
    return ROLES.index(first) if first in ROLES else len(ROLES)


def _families(draws: Sequence[Mapping[str, Any]], key: str) -> list[str]:
    return sorted({f for d in draws for f in d[key]}, key=_family_order)


def _per_family(draws: Sequence[Mapping[str, Any]], key: str, families: Sequence[str]) -> dict:
    return {f: stats([d[key].get(f) for d in draws]) for f in families}


def summarize(provenance: Mapping[str, Any], settings, extract_settings, sens_settings, pool,
              full, full_choice, draws: Mapping[int, list[dict[str, Any]]],
              seconds: float) -> dict[str, Any]:
    """stability.json's content: settings, the whole pool's choice, every draw and per-size
    statistics of each figure."""
    from paratransfer.stability.figures import chance

    every = [d for ds in draws.values() for d in ds]
    window_families = _families(every, "window_iou")
    subspace_families = _families(every, "subspace")
    n_layers = len(full.layer_scores)
    sizes = []
    for k, ds in draws.items():
        frequency = [sum(i in d["selected_layers"] for d in ds) / len(ds) for i in range(n_layers)]
        sizes.append({
            "size": k,
            "layers": stats([d["layers"] for d in ds]),
            "layers_exact": sum(d["selected_layers"] == full.selected_layers for d in ds) / len(ds),
            "layer_frequency": frequency,
            "window_iou": _per_family(ds, "window_iou", window_families),
            "subspace": _per_family(ds, "subspace", subspace_families),
            "subspace_out": _per_family(ds, "subspace_out", subspace_families),
            "subspace_in": _per_family(ds, "subspace_in", subspace_families),
            "draws": ds,
        })
    return {
        "paratransfer_version": __version__,
        "runtime": runtime(),
        **provenance,
        "settings": {"sizes": list(draws), "draws": settings.draws, "seed": settings.seed,
                     "prompt_format": sens_settings.prompt_format,
                     "max_length": sens_settings.max_length,
                     "max_samples": sens_settings.max_samples,
                     "extract": extract_settings.as_dict()},
        "pool": {"samples": len(pool), "indices": pool.indices,
                 "left_out": pool.considered - len(pool)},
        "full_pool": {"selected_layers": full.selected_layers, "layer_scores": full.layer_scores,
                      "windows": {key: list(w[:2])
                                  for key, (_, w, _) in full_choice.windows.items()}},
        "chance": chance(full_choice),
        "per_sample_layer_scores": pool.layer_scores,
        "families": {"windows": window_families, "subspaces": subspace_families},
        "sizes": sizes,
        "timing": {"seconds": round(seconds, 1)},  # apart: the only part that differs
    }


def _cell(s: dict[str, float] | None, spread: bool = False) -> str:
    if s is None:
        return "—"
    return f"{s['mean']:.2f} ± {s['std']:.2f}" if spread else f"{s['mean']:.2f}"


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def to_markdown(report: Mapping[str, Any]) -> str:
    """The short summary: one table per figure, rows by seed-set size."""
    st, sizes = report["settings"], report["sizes"]
    ex = st["extract"]
    wf, sf = report["families"]["windows"], report["families"]["subspaces"]
    lines = [
        "# Stability of the transferred choices", "",
        f"Teacher `{report['teacher']}` → student `{report['student']}`. Pool: "
        f"{report['pool']['samples']} seed samples of `{Path(report['seeds']).name}`"
        + (f" ({report['pool']['left_out']} left out: no answer token)"
           if report["pool"]["left_out"] else "")
        + f". For each seed-set size, {st['draws']} random subsets (seed {st['seed']}) go "
        f"through extraction (rank {ex['rank']}, reduce `{ex['reduce']}`) and their choices are "
        "compared with the whole pool's: 1 means the same choice.", "",
        f"Whole pool: teacher layers {report['full_pool']['selected_layers']} selected.", "",
        "## Layers", "",
        "| seed-set size | Jaccard with the pool's layers (mean ± std) | min | same layers as the pool |",
        "|---:|---|---:|---:|",
    ]
    for s in sizes:
        lay = s["layers"]
        lines.append(f"| {s['size']} | {_cell(lay, True)} | {lay['min']:.2f} | "
                     f"{s['layers_exact']:.0%} |")
    lines += ["", "## Windows: IoU with the pool's window of the same teacher matrix (mean)", "",
              "| seed-set size | " + " | ".join(wf) + " |", "|---:|" + "---:|" * len(wf)]
    for s in sizes:
        lines.append(f"| {s['size']} | " + " | ".join(_cell(s["window_iou"][f]) for f in wf) + " |")
    lines.append("| *chance* | " + " | ".join(_number(report["chance"]["window_iou"].get(f))
                                             for f in wf) + " |")
    lines += ["", "## Factor subspaces: mean cos² of the principal angles with the pool's "
              "(per student module, output and input side averaged; mean)", "",
              "| seed-set size | " + " | ".join(sf) + " |", "|---:|" + "---:|" * len(sf)]
    for s in sizes:
        lines.append(f"| {s['size']} | " + " | ".join(_cell(s["subspace"][f]) for f in sf) + " |")
    lines.append("| *chance* | " + " | ".join(_number(report["chance"]["subspace"].get(f))
                                             for f in sf) + " |")
    lines += ["", "Window IoU counts only teacher matrices both choices selected (layer changes "
              "are the Jaccard figure's); subspaces are compared in the student's coordinates, "
              "whichever teacher layer and window they came from. *Chance* is what a choice "
              "blind to the seeds would score: a window at a uniformly random position, a "
              "uniformly random subspace (rank / dimension). Every draw's samples, layers and "
              "windows are in stability.json."]
    return "\n".join(lines) + "\n"


def _family_color(name: str):
    import matplotlib

    return matplotlib.colormaps["tab10"](_family_order(name) % 10)


def _bars(ax, xs: Sequence[float], figures: Sequence[dict[str, float]], **style) -> None:
    """Means, with bars over the middle half of the draws (25th to 75th percentile)."""
    ax.vlines(xs, [f["q25"] for f in figures], [f["q75"] for f in figures],
              color=style["color"], lw=max(1.0, style.get("lw", 1.0) * 0.8), alpha=0.6)
    ax.plot(xs, [f["mean"] for f in figures], **style)


def plot_stability(report: Mapping[str, Any], path: str | Path) -> None:
    """Overlap against seed-set size (layers, windows, subspaces per family) and the heat map
    of how often each teacher layer is selected, per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = report["sizes"]
    ks = [s["size"] for s in sizes]
    fig, axes = plt.subplots(1, 3, figsize=(16.5, 4.6), dpi=100,
                             gridspec_kw={"width_ratios": [1, 1, 1.15]})

    def lines(ax, key: str, families: Sequence[str]) -> None:
        for i, f in enumerate(families):
            got = [(k, s[key][f]) for k, s in zip(ks, sizes, strict=True) if s[key][f]]
            shift = 1 + 0.025 * (i - len(families) / 2)  # keep error bars apart
            _bars(ax, [k * shift for k, _ in got], [v for _, v in got], marker="o", ms=3.5,
                  lw=1.2, color=_family_color(f), label=f)

    ax = axes[0]
    _bars(ax, ks, [s["layers"] for s in sizes], color="black", lw=2.6, marker="s",
          label="layers (Jaccard)")
    lines(ax, "window_iou", report["families"]["windows"])
    ax.set_title("selected layers (Jaccard) and windows (IoU)")
    axes[1].set_title("factor subspaces (mean cos² of principal angles)")
    lines(axes[1], "subspace", report["families"]["subspaces"])
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel(f"seed-set size (of a pool of {report['pool']['samples']})")
        ax.set_ylabel("agreement with the whole pool's choice\n(mean; bars: middle half of draws)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="lower right")

    ax = axes[2]
    n_layers = len(report["full_pool"]["layer_scores"])
    chosen = set(report["full_pool"]["selected_layers"])
    grid = [s["layer_frequency"] for s in sizes] + [[float(i in chosen) for i in range(n_layers)]]
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(grid)), [str(k) for k in ks] + ["pool"])
    step = max(1, n_layers // 16)
    ax.set_xticks(range(0, n_layers, step))
    if n_layers * len(grid) <= 160:
        for r, row in enumerate(grid):
            for c, v in enumerate(row):
                ax.text(c, r, f"{v:.2f}".rstrip("0").rstrip("."), ha="center", va="center",
                        fontsize=7, color="white" if v < 0.6 else "black")
    ax.set_xlabel("teacher layer")
    ax.set_ylabel("seed-set size")
    ax.set_title(f"how often each layer is selected ({report['settings']['draws']} draws)")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    fig.suptitle(f"Stability of the transferred choices: {Path(report['teacher']).name} → "
                 f"{Path(report['student']).name}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(report: Mapping[str, Any], folder: Path) -> None:
    """stability.json, stability.md and stability.png into `folder`."""
    write_json(folder / "stability.json", report)
    (folder / "stability.md").write_text(to_markdown(report), encoding="utf-8")
    plot_stability(report, folder / "stability.png")
