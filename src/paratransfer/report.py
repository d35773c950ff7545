"""Plots for people: per-layer sensitivity with the selected layers marked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_layer_scores(scores: Sequence[float], selected: Sequence[int], path: str | Path,
                      title: str = "Teacher layer sensitivity") -> None:
    """Bar chart of every teacher layer's summed sensitivity; selected layers highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
