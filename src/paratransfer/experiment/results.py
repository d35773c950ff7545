"""The results of an experiment: per arm mean ± std over seeds, each seed's value, the paired
difference to the `lora` baseline with a 95% interval, reference rows, the control contrasts
(what each difference isolates, in one sentence each, with the seeds that would decide it), the
same on the held-out loss (heldout_contrasts.py) and the held-out loss curves."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from paratransfer.extract.plots import plot_results, plot_sensitivity
from paratransfer.io.outputs import atomic_file, write_json
from paratransfer.io.threads import runtime
from paratransfer.sensitivity.accumulate import SensitivityFile

#: Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.96).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    """The two-sided 95% t quantile: the table, computed beyond it (power.t_quantile)."""
    from paratransfer.experiment.power import t_quantile

    return T975[df - 1] if df <= len(T975) else t_quantile(0.975, df)


def paired_interval(values: list[float], baseline: list[float]) -> dict[str, Any]:
    """Mean paired difference and its 95% t-interval (None with fewer than two pairs)."""
    diffs = [a - b for a, b in zip(values, baseline, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "low": None, "high": None, "n": len(diffs)}
    half = t975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(diffs)}


def _read(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def summarize_arms(metrics: dict[str, dict[int, Path]]) -> tuple[str, list[dict[str, Any]]]:
    """One row per arm from its seeds' metrics.json files."""
    rows, metric = [], None
    per_arm = {arm: {seed: _read(p) for seed, p in by_seed.items()} for arm, by_seed in metrics.items()}
    base = per_arm.get("lora", {})
    for arm, by_seed in per_arm.items():
        seeds = sorted(by_seed)
        metric = metric or by_seed[seeds[0]]["metric"]
        values = [by_seed[s]["value"] for s in seeds]
        row = {
            "arm": arm,
            "metric": metric,
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": {str(s): v for s, v in zip(seeds, values, strict=True)},
            "metrics": {name: statistics.fmean(by_seed[s]["metrics"][name] for s in seeds)
                        for name in by_seed[seeds[0]]["metrics"]},
        }
        paired = [s for s in seeds if s in base]
        if arm != "lora" and paired:
            row["vs_lora"] = paired_interval([by_seed[s]["value"] for s in paired],
                                             [base[s]["value"] for s in paired])
        rows.append(row)
    return metric or "", rows


#: Paired contrasts the table reports when both arms ran: (arm, against, what it isolates).
CONTRASTS: tuple[tuple[str, str, str], ...] = (
    ("transfer", "lora", "the transferred initialization"),
    ("transfer", "spectrum", "the teacher's directions"),
    ("transfer", "pissa", "the teacher's subspace over the student's own"),
    ("transfer", "eva", "the teacher over the student's own task data (EVA)"),
    ("transfer", "corda", "the teacher over the student's own task data (CorDA)"),
    ("transfer", "random", "the sensitivity-chosen windows over random windows of the same layers"),
    ("distill", "lora", "distillation from the teacher"),
    ("transfer", "distill", "parametric transfer over distillation"),
    ("laten", "student", "LaTen's injection, without fine-tuning"),
    ("transfer", "laten-lora", "the method's transfer over LaTen's, both fine-tuned alike"),
    ("laten-lora", "lora", "LaTen's injection before the same fine-tuning"),
)


def contrasts(rows: list[dict[str, Any]], metrics: dict[str, dict[int, Path]],
              runs: dict[str, dict[int, Path]] | None = None,
              references: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The paired differences of CONTRASTS over the seeds both arms share, with a sentence and
    the seeds that would decide; with `runs`, the same on the held-out loss (`heldout`). A
    reference row (the untrained student) counts as the same value at every seed."""
    from paratransfer.experiment.heldout_contrasts import contrast as heldout_contrast
    from paratransfer.experiment.heldout_contrasts import measures_by_arm
    from paratransfer.experiment.power import decide_sentence, seeds_to_decide

    values = {arm: {s: _read(p)["value"] for s, p in by_seed.items()}
              for arm, by_seed in metrics.items()}
    every = sorted({s for by_seed in values.values() for s in by_seed})
    for ref in references or []:
        values.setdefault(ref["name"], {s: ref["value"] for s in every})
    losses = measures_by_arm(runs or {})
    out = []
    for arm, other, isolates in CONTRASTS:
        if arm not in values or other not in values:
            continue
        seeds = sorted(set(values[arm]) & set(values[other]))
        if not seeds:
            continue
        d = paired_interval([values[arm][s] for s in seeds], [values[other][s] for s in seeds])
        decide = seeds_to_decide([values[arm][s] - values[other][s] for s in seeds])
        out.append({"contrast": f"{arm} − {other}", "isolates": isolates, **d,
                    "sentence": sentence(f"{isolates} ({arm} − {other})", d),
                    "decide": decide, "decide_sentence": decide_sentence(decide),
                    "heldout": heldout_contrast(losses, arm, other, isolates,
                                                trained=set(runs) if runs is not None else None)})
    return out


def sentence(what: str, d: dict[str, Any]) -> str:
    """One plain sentence on a paired difference, as the numbers say."""
    if d["low"] is None:
        return f"{what}: {d['mean']:+.4f} from one seed, no interval: no conclusion."
    interval = f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
    if d["low"] > 0:
        return f"{what}: {interval}, significant (the interval is above 0)."
    if d["high"] < 0:
        return f"{what}: {interval}, significant (the interval is below 0)."
    return f"{what}: {interval}, not significant (the interval includes 0)."


def heldout_curves(runs: dict[str, dict[int, Path]]) -> dict[str, dict[str, list[float]]]:
    """Per arm, the held-out loss against step over its seeds (mean, min, max at each step all
    seeds recorded), from the train.json of each run; arms without curves are left out."""
    curves = {}
    for arm, by_seed in runs.items():
        per_seed = [{h["step"]: h["loss"] for h in _read(d / "train.json").get("heldout_history") or []}
                    for d in by_seed.values()]
        steps = sorted(set.intersection(*(set(c) for c in per_seed))) if per_seed else []
        if steps:
            at = [[c[step] for c in per_seed] for step in steps]
            curves[arm] = {"step": steps, "mean": [statistics.fmean(v) for v in at],
                           "min": [min(v) for v in at], "max": [max(v) for v in at],
                           "seeds": len(per_seed)}
    return curves


def to_markdown(result: dict[str, Any]) -> str:
    """The table people read: arms, reference rows, then one sentence per contrast."""
    metric = result["metric"]
    lines = [f"# {result['name']}: {result['task']} ({metric})", "",
             f"teacher `{result['teacher']}` → student `{result['student']}`; seeds "
             f"{', '.join(map(str, result['seeds']))}", "",
             f"| arm | {metric} mean ± std | per seed | Δ vs lora (95% CI, paired) |",
             "|---|---|---|---|"]
    for row in result["arms"]:
        per_seed = ", ".join(f"{v:.4f}" for v in row["seeds"].values())
        d = row.get("vs_lora")
        if d is None:
            delta = "baseline" if row["arm"] == "lora" else "—"
        elif d["low"] is None:
            delta = f"{d['mean']:+.4f} (one seed: no interval)"
        else:
            delta = f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
        lines.append(f"| {row['arm']} | {row['mean']:.4f} ± {row['std']:.4f} | {per_seed} | {delta} |")
    for ref in result["references"]:
        lines.append(f"| *{ref['name']}* (reference) | {ref['value']:.4f} | — | — |")
    said = [f"{c['sentence']} {c['decide_sentence']}." if "decide_sentence" in c
            else c["sentence"] for c in result.get("contrasts", [])]
    if said:
        lines += ["", *(f"- {x}" for x in said)]
    if "heldout" in (result["arms"][0] if result["arms"] else {}):
        from paratransfer.experiment.heldout_contrasts import markdown as heldout_markdown

        lines += heldout_markdown(result)
    return "\n".join(lines) + "\n"


def _config(model_id: str):
    """The model's config (for where its roles live), without loading weights."""
    from transformers import AutoConfig

    from paratransfer.teacher.gguf import resolve_model

    return AutoConfig.from_pretrained(resolve_model(model_id))


def write_results(out: Path, recipe, metrics: dict[str, dict[int, Path]], refs: dict[str, Path],
                  adapters: dict[str, Path], sens: Path,
                  runs: dict[str, dict[int, Path]] | None = None) -> dict[str, Any]:
    """results.json, results.md, results.png and sensitivity.png; returns results.json's data.

    `runs` (arm -> seed -> training folder) supplies the held-out loss curves, when recorded.
    """
    from paratransfer.experiment.heldout_contrasts import arm_summary, measures_by_arm

    metric, rows = summarize_arms(metrics)
    losses = measures_by_arm(runs or {})
    for row in rows:
        row["heldout"] = arm_summary(losses, row["arm"],
                                     trained=set(runs) if runs is not None else None)
    references = []
    for who, path in refs.items():
        m = _read(path)
        references.append({"name": who, "value": m["value"], "metrics": m["metrics"]})
    result = {
        "name": recipe.name, "task": recipe.task.type, "metric": metric,
        "teacher": recipe.teacher, "student": recipe.student, "seeds": recipe.seeds,
        "arms": rows, "references": references,
        "contrasts": contrasts(rows, metrics, runs, references),
        "heldout_curves": heldout_curves(runs or {}),
        "runtime": runtime(),  # of the `run` process; each step's own file records its own
    }
    with atomic_file(out / "results.json", overwrite=True) as tmp:
        write_json(tmp, result)
    with atomic_file(out / "results.md", overwrite=True) as tmp:
        tmp.write_text(to_markdown(result), encoding="utf-8")
    with atomic_file(out / "results.png", overwrite=True) as tmp:
        plot_results(result, tmp.with_suffix(".png"))
        tmp.with_suffix(".png").replace(tmp)
    main_adapter = adapters.get("transfer") or next(iter(adapters.values()), None)
    if main_adapter is not None:
        with atomic_file(out / "sensitivity.png", overwrite=True) as tmp:
            plot_sensitivity(_read(main_adapter / "transfer.json"), tmp.with_suffix(".png"),
                             SensitivityFile(sens), _config(recipe.teacher))
            tmp.with_suffix(".png").replace(tmp)
    return result
