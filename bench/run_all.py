"""`make bench`: run every ``bench/bench_*.py`` and (re)write ``BENCHMARKS.md`` at the repo root.

Each benchmark module exposes ``main(argv=None) -> dict`` (called here as ``main([])``; it also
saves its result as ``bench/results/<name>.json``) and may expose ``to_markdown(result) -> str``
(its section: a short table and a few lines) and ``summary(result) -> list[dict]`` (its rows of
the summary table at the top: ``what``, ``headline``, ``goal``, ``met``). BENCHMARKS.md stays
short; every raw figure is in ``bench/results/``.

``--only a,b`` runs those benchmarks and shows the saved results of the others;
``--from-results`` runs nothing. A saved result may carry its own ``markdown`` and ``summary``
(figures carried over from an earlier report whose raw result was not kept): they are shown as
they are. Modules are imported by file path, one at a time; a missing or failing benchmark is
recorded in the report and the others still run.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REPORT = ROOT / "BENCHMARKS.md"
RESULTS = HERE / "results"

#: Reported first, in this order (as missing if the file is not there); any other bench_*.py too.
EXPECTED = ("bench_extract", "bench_extract_command", "bench_sensitivity")


def benchmark_names() -> list[str]:
    found = sorted(p.stem for p in HERE.glob("bench_*.py"))
    return list(EXPECTED) + [n for n in found if n not in EXPECTED]


def load(name: str):
    """Import bench/<name>.py by path (None if the file does not exist)."""
    path = HERE / f"{name}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses & pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def result_path(name: str) -> Path:
    return RESULTS / f"{name.removeprefix('bench_')}.json"


def describe(entry: dict, module) -> None:
    """Fill the entry's section body and summary rows from its result."""
    result = entry["result"]
    try:
        if "markdown" in result:
            entry["markdown"] = result["markdown"]
        else:
            formatter = getattr(module, "to_markdown", None)
            entry["markdown"] = formatter(result) if callable(formatter) else goal_lines(result)
        rows = result.get("summary")
        if rows is None:
            summarize = getattr(module, "summary", None)
            rows = summarize(result) if callable(summarize) else []
        entry["summary"] = rows
    except Exception:
        entry["markdown"] = (goal_lines(result) + "\n\n(its report failed: "
                             f"`{traceback.format_exc().strip().splitlines()[-1]}`)")
        entry["summary"] = []


def saved_one(name: str) -> dict:
    """An entry from the JSON a benchmark saved in bench/results/ (no rerun)."""
    entry: dict = {"name": name, "seconds": None}
    path = result_path(name)
    module = load(name)
    if module is None or not path.is_file():
        entry.update(status="missing", error=f"{path.relative_to(ROOT)} does not exist")
        return entry
    entry.update(status="saved", result=json.loads(path.read_text()))
    describe(entry, module)
    return entry


def run_one(name: str) -> dict:
    """{'name', 'status': ran|missing|failed, 'result'|'error', 'seconds', 'markdown', ...}."""
    entry: dict = {"name": name}
    t0 = time.perf_counter()
    try:
        module = load(name)
        if module is None:
            entry.update(status="missing", error=f"bench/{name}.py does not exist")
            return entry
        entry.update(status="ran", result=module.main([]))
        describe(entry, module)
    except BaseException as e:  # SystemExit from argparse, KeyboardInterrupt is re-raised
        if isinstance(e, KeyboardInterrupt):
            raise
        entry.update(status="failed", error=traceback.format_exc())
    finally:
        entry["seconds"] = time.perf_counter() - t0
    return entry


# --------------------------------------------------------------------------- markdown


def goal_lines(result: dict) -> str:
    """For a benchmark without `to_markdown`: its goals (a `goals` or `goal` mapping), if any."""
    goals = result.get("goals") or ({"goal": result["goal"]} if "goal" in result else {})
    lines = []
    for name, g in goals.items():
        if isinstance(g, dict) and "value" in g:
            met = g.get("met")
            state = "" if met is None else (": met" if met else ": NOT met")
            lines.append(f"- {name}: **{g['value']:.4g}** (goal {g.get('target', '?')}{state})")
    return "\n".join(lines) or "(no figures to show: see the raw result)"


def machine_label(result: dict) -> str:
    """Where and when a result was measured, in a few words."""
    m = result.get("machine") or {}
    cpu = str(m.get("cpu", "?")).strip()
    parts = [f"{cpu}, {m.get('cores', '?')} cores"]
    if m.get("torch"):
        parts.append(f"torch {m['torch']}")
    date = str(result.get("date", ""))[:10]
    return ", ".join(parts) + (f"; {date}" if date else "")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _met(met) -> str:
    return "not judged" if met is None else ("yes" if met else "**no**")


def summary_table(entries: list[dict]) -> list[str]:
    lines = ["| benchmark | what was measured | headline | goal | met | measured on |",
             "|---|---|---|---|---|---|"]
    for e in entries:
        title = e["name"].removeprefix("bench_")
        rows = e.get("summary") or []
        if not rows:
            state = e["status"] if e["status"] in ("missing", "failed") else "see its section"
            lines.append(f"| [{title}](#{title}) | – | {state} | – | – | – |")
        for row in rows:
            lines.append(f"| [{title}](#{title}) | {_cell(row['what'])} | "
                         f"{_cell(row['headline'])} | {_cell(row['goal'])} | "
                         f"{_met(row.get('met'))} | {_cell(machine_label(e['result']))} |")
    return lines


def render(entries: list[dict], started: _dt.datetime) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`bench/run_all.py`) on {started:%Y-%m-%d %H:%M}. Each row was "
        "measured in one run on the machine it names; the ratios within a run hold better across "
        "machines than the absolute times. Raw figures: `bench/results/<benchmark>.json`.",
        "",
        *summary_table(entries),
        "",
    ]
    for e in entries:
        title = e["name"].removeprefix("bench_")
        lines += [f"## {title}", ""]
        if e["status"] == "missing":
            lines += [f"Not available: {e['error']}.", ""]
            continue
        if e["status"] == "failed":
            tail = "\n".join(e["error"].strip().splitlines()[-12:])
            lines += [f"`bench/{e['name']}.py` failed:", "", "```", tail, "```", ""]
            continue
        how = (f"run now ({e['seconds']:.0f} s)" if e["status"] == "ran" else "saved result")
        lines += [f"`bench/{e['name']}.py`, {how}; measured on "
                  f"{machine_label(e['result'])}; raw: "
                  f"`{result_path(e['name']).relative_to(ROOT)}`", ""]
        if e["result"].get("carried_over"):
            lines += [f"*{e['result']['carried_over']}*", ""]
        lines += [e["markdown"].rstrip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                 ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # benchmarks may import each other's helpers
    only: set[str] | None = None
    if "--from-results" in argv:
        only = set()
    if "--only" in argv:
        only = {f"bench_{n.removeprefix('bench_')}" for n in argv[argv.index("--only") + 1].split(",")}
    started = _dt.datetime.now()
    entries = []
    for name in benchmark_names():
        run = only is None or name in only
        print(f"=== {name}" + ("" if run else " (saved result)"), flush=True)
        entry = run_one(name) if run else saved_one(name)
        entries.append(entry)
        if entry["status"] in ("missing", "failed"):
            print(f"=== {name}: {entry['status']}\n{entry['error']}", file=sys.stderr, flush=True)
    REPORT.write_text(render(entries, started))
    print(f"\nwritten {REPORT}")
    for e in entries:
        print(f"  {e['name']}: {e['status']}")
    return 1 if any(e["status"] == "failed" for e in entries) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
