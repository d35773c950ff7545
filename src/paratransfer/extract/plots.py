"""Plots for people: layer scores, windows over their sensitivity, an experiment's results.

Every function writes one PNG with matplotlib's non-interactive backend and closes its figure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

#: Largest side of a heat map's image; bigger matrices are mean-pooled down to it.
HEATMAP_PIXELS = 400


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layer_scores(scores: Sequence[float], selected: Sequence[int], path: str | Path,
                      title: str = "Teacher layer sensitivity") -> None:
    """Bar chart of every teacher layer's summed sensitivity; selected layers highlighted."""
    plt = _pyplot()
    chosen = set(selected)
    colors = ["tab:orange" if i in chosen else "tab:gray" for i in range(len(scores))]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(scores) + 2), 3.6), dpi=110)
    ax.bar(range(len(scores)), scores, color=colors)
    ax.set_xlabel("teacher layer")
    ax.set_ylabel("summed sensitivity  Σ|θ·∇L|")
    ax.set_title(f"{title} (orange: selected, {len(chosen)} of {len(scores)})")
    ax.set_xlim(-0.6, len(scores) - 0.4)
    ax.set_xticks(range(0, len(scores), max(1, len(scores) // 20)))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


#: A fixed colour per well-known arm, so every figure of the project reads the same way.
ARM_COLORS = {"transfer": "tab:orange", "lora": "tab:blue", "pissa": "tab:green",
              "spectrum": "tab:purple", "distill": "tab:red", "eva": "tab:cyan",
              "corda": "tab:olive", "random": "tab:brown"}
_OTHER_COLORS = ("tab:pink", "tab:gray", "gold", "teal", "navy")


def arm_colors(arms: Sequence[str]) -> dict[str, str]:
    others = iter(_OTHER_COLORS * (1 + len(arms) // len(_OTHER_COLORS)))
    return {a: ARM_COLORS.get(a) or next(others) for a in arms}


def plot_results(result: dict[str, Any], path: Path) -> None:
    """Bars (mean ± std, each seed a dot, references as lines) and, when training recorded
    them, the held-out loss against step per arm (mean over seeds, band from min to max)."""
    plt = _pyplot()
    arms = result["arms"]
    curves = result.get("heldout_curves") or {}
    colors = arm_colors([a["arm"] for a in arms])
    panels = 2 if curves else 1
    fig, axes = plt.subplots(1, panels, figsize=(1.6 * len(arms) + 3 + 5.5 * (panels - 1), 3.9),
                             dpi=110, squeeze=False)
    ax = axes[0][0]
    xs = range(len(arms))
    ax.bar(xs, [a["mean"] for a in arms], yerr=[a["std"] for a in arms], capsize=6,
           color=[colors[a["arm"]] for a in arms], alpha=0.85)
    for x, a in zip(xs, arms, strict=True):
        vals = list(a["seeds"].values())
        ax.scatter([x] * len(vals), vals, color="black", s=12, zorder=3)
    for ref, style in zip(result["references"], ["--", ":"], strict=False):
        ax.axhline(ref["value"], linestyle=style, color="gray", label=f"{ref['name']} (reference)")
    ax.set_xticks(list(xs), [a["arm"] for a in arms])
    ax.set_ylabel(result["metric"])
    ax.set_title(f"{result['name']}: {result['task']}, mean ± std over {len(result['seeds'])} seeds",
                 fontsize=10)
    if result["references"]:
        ax.legend(loc="best", fontsize=8)
    if curves:
        ax = axes[0][1]
        for arm, c in curves.items():
            ax.plot(c["step"], c["mean"], color=colors.get(arm, "black"), label=arm)
            ax.fill_between(c["step"], c["min"], c["max"], color=colors.get(arm, "black"),
                            alpha=0.15, linewidth=0)
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out answer loss")
        ax.set_yscale("log")
        ax.set_title("held-out loss: mean over seeds, band = min to max", fontsize=10)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def role_sensitivity(sensitivity: Mapping[str, torch.Tensor], teacher_config,
                     entry: dict[str, Any]) -> torch.Tensor | None:
    """The `[out, in]` sensitivity map a module's window was searched in, from transfer.json's
    entry: the teacher parameter's map, oriented and split out of a fused matrix as extraction
    does. None when the search ran on another matrix (re-ordered vocabulary, zero padding)."""
    from paratransfer.arch import arch_for

    if entry.get("vocab_gathered") or entry.get("padded") or entry.get("window") is None:
        return None
    arch = arch_for(teacher_config)
    spec = arch.module_for(entry["role"])
    name = entry["teacher_name"]
    if spec is None:
        return None
    if name not in sensitivity:  # a tied head: its sensitivity is the embedding's
        name = arch.embed.param_name(arch.layers, None)
        if name not in sensitivity:
            return None
    matrix = spec.to_linear(sensitivity[name].float())
    part = arch.split(spec, teacher_config, matrix)[entry["role"]]
    return part if list(part.shape) == list(entry["teacher_shape"]) else None


def _pooled(matrix: torch.Tensor, pixels: int = HEATMAP_PIXELS) -> torch.Tensor:
    """Mean-pool a large map down to at most `pixels` per side (what a figure can show)."""
    m, n = matrix.shape
    if max(m, n) <= pixels:
        return matrix
    size = (min(m, pixels), min(n, pixels))
    return torch.nn.functional.adaptive_avg_pool2d(matrix[None, None], size)[0, 0]


def plot_sensitivity(report: dict[str, Any], path: Path, sensitivity: Mapping[str, torch.Tensor] | None = None,
                     teacher_config=None, max_modules: int = 8) -> None:
    """Per-layer scores with the selected layers marked, and each chosen window drawn over its
    teacher matrix's sensitivity heat map (log scale), for the first selected layer's modules,
    the embedding and the head: a reader sees the block was where the sensitivity is."""
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    scores, selected = report["layer_scores"], set(report["selected_layers"])
    first = min(selected) if selected else None
    entries = [e for e in report["modules"] if e.get("window") is not None
               and e.get("teacher_layer") in (None, first)][:max_modules]
    cols = max(1, min(4, len(entries)))
    rows = 1 + math.ceil(len(entries) / cols)
    fig = plt.figure(figsize=(3.4 * cols + 1.2, 3.0 * rows), dpi=100, layout="constrained")
    grid = fig.add_gridspec(rows, cols)
    ax = fig.add_subplot(grid[0, :])
    ax.bar(range(len(scores)), scores,
           color=["tab:orange" if i in selected else "tab:gray" for i in range(len(scores))])
    ax.set_title("teacher layer sensitivity Σ|θ·∇L| (orange: selected); below, the chosen "
                 "windows (red) over each matrix's sensitivity")
    ax.set_xlabel("teacher layer")
    ax.set_xticks(range(0, len(scores), max(1, len(scores) // 20)))
    image, maps = None, []
    for i, e in enumerate(entries):
        a = fig.add_subplot(grid[1 + i // cols, i % cols])
        maps.append(a)
        (m, n), (r, c) = e["teacher_shape"], e["window"]
        rows_s, cols_s = e["student_shape"]
        heat = (role_sensitivity(sensitivity, teacher_config, e)
                if sensitivity is not None and teacher_config is not None else None)
        if heat is not None:
            shown = _pooled(heat.float()).numpy()
            positive = shown[shown > 0]
            if positive.size:
                norm = LogNorm(vmin=max(float(positive.min()), float(positive.max()) * 1e-6),
                               vmax=float(positive.max()))
                image = a.imshow(shown.clip(min=norm.vmin), norm=norm, cmap="viridis",
                                 extent=(0, n, m, 0), aspect="auto", interpolation="nearest")
        a.add_patch(Rectangle((0, 0), n, m, fill=False, edgecolor="black", linewidth=0.8))
        a.add_patch(Rectangle((c, r), cols_s, rows_s, fill=False, edgecolor="tab:red",
                              linewidth=1.8))
        a.set_xlim(0, n)
        a.set_ylim(m, 0)
        label = f"{e['role']} L{e['teacher_layer']}" if e["teacher_layer"] is not None else e["role"]
        a.set_title(f"{label}: [{m}, {n}] → [{rows_s}, {cols_s}]", fontsize=9)
        a.tick_params(labelsize=7)
    if image is not None:
        fig.colorbar(image, ax=maps, shrink=0.8, label="sensitivity (log scale)")
    fig.savefig(path)
    plt.close(fig)
