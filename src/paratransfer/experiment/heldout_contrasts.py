"""Paired contrasts on the held-out answer-only loss: per run, the final held-out loss and its
mean over the curve, then per arm and per contrast the paired differences over seeds, with 95%
intervals, a sentence (lower loss is better) and the seeds that would decide.

The exact match of a small test set moves in steps and is bimodal per seed; the held-out loss
is continuous and recorded at every evaluation point of every run, so the same paired design
separates arms with fewer seeds. The curve's mean leaves out step 0, where every arm is the
same model (the inits keep the student's function), so it measures how fast the loss falls.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from paratransfer.experiment.power import decide_sentence, seeds_to_decide

#: The two held-out measures, as results.json names them, and how the sentences call them.
MEASURES = {"final": "final held-out loss", "curve_mean": "mean held-out loss over the curve"}
#: What a row or contrast says when its runs recorded no held-out curve.
NO_HELDOUT = ("no held-out set was given (task.heldout), so no held-out loss was recorded")


def not_trained(names: list[str]) -> str:
    """What a row or contrast says when some of its arms are not fine-tuned (LaTen's
    injection alone, a reference row): they have no curve, whatever the recipe gave."""
    verb = "is" if len(names) == 1 else "are"
    return f"{' and '.join(names)} {verb} not fine-tuned, so there is no held-out loss curve"


def why_missing(names: list[str], trained: set[str] | None) -> str:
    """The reason a row or contrast has no held-out loss."""
    untrained = [n for n in names if trained is not None and n not in trained]
    return not_trained(untrained) if untrained else NO_HELDOUT


def run_measures(train_dir: Path) -> dict[str, float] | None:
    """A run's final held-out loss and mean over its curve after step 0, from train.json
    (None when it recorded no curve)."""
    history = json.loads((Path(train_dir) / "train.json").read_text()).get("heldout_history") or []
    if not history:
        return None
    points = sorted((h["step"], h["loss"]) for h in history)
    later = [loss for step, loss in points if step > 0] or [loss for _, loss in points]
    return {"final": points[-1][1], "curve_mean": statistics.fmean(later)}


def measures_by_arm(runs: dict[str, dict[int, Path]]) -> dict[str, dict[int, dict[str, float]]]:
    """arm -> seed -> the run's measures, for the runs that recorded a held-out curve."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for arm, by_seed in runs.items():
        for seed, folder in by_seed.items():
            m = run_measures(folder)
            if m is not None:
                out.setdefault(arm, {})[seed] = m
    return out


def paired(values: dict[str, dict[int, dict[str, float]]], arm: str, other: str,
           measure: str, isolates: str = "") -> dict[str, Any] | None:
    """The paired difference arm − other of one measure over their shared seeds, its interval,
    its sentence and the seeds that would decide; None when they share no seed."""
    from paratransfer.experiment.results import paired_interval

    seeds = sorted(set(values.get(arm, {})) & set(values.get(other, {})))
    if not seeds:
        return None
    a = [values[arm][s][measure] for s in seeds]
    b = [values[other][s][measure] for s in seeds]
    d = paired_interval(a, b)
    decide = seeds_to_decide([x - y for x, y in zip(a, b, strict=True)])
    what = f"{isolates}, {MEASURES[measure]}" if isolates else MEASURES[measure]
    return {**d, "sentence": loss_sentence(f"{what} ({arm} − {other})", d, arm, other),
            "decide": decide, "decide_sentence": decide_sentence(decide)}


def contrast(values: dict[str, dict[int, dict[str, float]]], arm: str, other: str,
             isolates: str = "", trained: set[str] | None = None) -> dict[str, Any]:
    """Both measures of one contrast, or why there are none (`trained`: the arms that were
    fine-tuned, when known)."""
    found = {m: paired(values, arm, other, m, isolates) for m in MEASURES}
    if all(v is None for v in found.values()):
        return {"missing": why_missing([arm, other], trained)}
    return found


def arm_summary(values: dict[str, dict[int, dict[str, float]]], arm: str,
                trained: set[str] | None = None) -> dict[str, Any]:
    """Per arm: each measure's mean ± std over seeds and its paired difference to `lora`."""
    by_seed = values.get(arm)
    if not by_seed:
        return {"missing": why_missing([arm], trained)}
    seeds = sorted(by_seed)
    out: dict[str, Any] = {}
    for m in MEASURES:
        v = [by_seed[s][m] for s in seeds]
        out[m] = {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                  "seeds": {str(s): x for s, x in zip(seeds, v, strict=True)}}
        if arm != "lora":
            vs = paired(values, arm, "lora", m)
            if vs is not None:
                out[m]["vs_lora"] = {k: vs[k] for k in ("mean", "low", "high", "n")}
    return out


def loss_sentence(what: str, d: dict[str, Any], arm: str, other: str) -> str:
    """One plain sentence on a paired loss difference; lower loss is better, and it says so."""
    if d["low"] is None:
        return f"{what}: {d['mean']:+.4f} from one seed, no interval: no conclusion."
    interval = f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
    if d["high"] < 0:
        return (f"{what}: {interval}, significant (the interval is below 0: {arm}'s loss is "
                "lower, and lower loss is better).")
    if d["low"] > 0:
        return (f"{what}: {interval}, significant (the interval is above 0: {other}'s loss is "
                "lower, and lower loss is better).")
    return f"{what}: {interval}, not significant (the interval includes 0; lower loss is better)."


def _cell(m: dict[str, Any]) -> tuple[str, str]:
    spread = f"{m['mean']:.4f} ± {m['std']:.4f}"
    d = m.get("vs_lora")
    if d is None:
        return spread, "—"
    if d["low"] is None:
        return spread, f"{d['mean']:+.4f} (one seed: no interval)"
    return spread, f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


def markdown(result: dict[str, Any]) -> list[str]:
    """The held-out loss table (one row per arm) and each contrast's held-out sentences."""
    lines = ["", "## Held-out answer-only loss (lower is better)", "",
             "| arm | final mean ± std | Δ final vs lora (95% CI, paired) | "
             "curve mean ± std | Δ curve mean vs lora (95% CI, paired) |",
             "|---|---|---|---|---|"]
    for row in result["arms"]:
        h = row.get("heldout") or {"missing": NO_HELDOUT}
        if "missing" in h:
            lines.append(f"| {row['arm']} | {h['missing']} | — | — | — |")
            continue
        final, final_d = _cell(h["final"])
        curve, curve_d = _cell(h["curve_mean"])
        if row["arm"] == "lora":
            final_d = curve_d = "baseline"
        lines.append(f"| {row['arm']} | {final} | {final_d} | {curve} | {curve_d} |")
    said = []
    for c in result.get("contrasts", []):
        h = c.get("heldout") or {"missing": NO_HELDOUT}
        if "missing" in h:
            said.append(f"{c['isolates']} ({c['contrast']}), held-out loss: {h['missing']}.")
            continue
        said += [f"{h[m]['sentence']} {h[m]['decide_sentence']}."
                 for m in MEASURES if h.get(m) is not None]
    if said:
        lines += ["", *(f"- {x}" for x in said)]
    return lines
