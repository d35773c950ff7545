"""`make bench`: run every ``bench/bench_*.py`` and (re)write ``BENCHMARKS.md`` at the repo root.

Each benchmark module exposes ``main(argv=None) -> dict`` (called here as ``main([])``) and may
expose ``to_markdown(result: dict) -> str`` for its section of BENCHMARKS.md; without one, its
result is shown as a key/value table. Modules are imported by file path, one at a time; a
missing or failing benchmark is recorded in the report and the others still run.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REPORT = ROOT / "BENCHMARKS.md"

#: Always reported (as missing if the file is not there yet); any other bench_*.py is run too.
EXPECTED = ("bench_sensitivity", "bench_extract", "bench_stability")


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    ram = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram,
            "python": platform.python_version(), "platform": platform.platform()}
    for lib in ("torch", "transformers", "peft"):
        try:
            info[lib] = __import__(lib).__version__
        except Exception:  # not installed, or broken: the report says so
            info[lib] = None
    return info


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


RESULTS = HERE / "results"


def saved_one(name: str) -> dict:
    """An entry from the JSON a benchmark saved in bench/results/ (`--from-results`: no rerun)."""
    entry: dict = {"name": name, "seconds": 0.0}
    path = RESULTS / f"{name.removeprefix('bench_')}.json"
    module = load(name)
    if module is None or not path.is_file():
        entry.update(status="missing", error=f"{path} does not exist")
        return entry
    result = json.loads(path.read_text())
    formatter = getattr(module, "to_markdown", None)
    entry.update(status="ok (saved result)", result=result,
                 markdown=formatter(result) if callable(formatter) else generic_markdown(result))
    return entry


def run_one(name: str) -> dict:
    """{'name', 'status': ok|missing|failed, 'result'|'error', 'seconds', 'markdown'}."""
    entry: dict = {"name": name}
    t0 = time.perf_counter()
    try:
        module = load(name)
        if module is None:
            entry.update(status="missing", error=f"bench/{name}.py does not exist")
            return entry
        result = module.main([])
        entry.update(status="ok", result=result)
        formatter = getattr(module, "to_markdown", None)
        try:
            entry["markdown"] = formatter(result) if callable(formatter) else generic_markdown(result)
        except Exception:
            entry["markdown"] = (generic_markdown(result) + "\n\n(its `to_markdown` failed: "
                                 f"`{traceback.format_exc().strip().splitlines()[-1]}`)")
    except BaseException as e:  # SystemExit from argparse, KeyboardInterrupt is re-raised
        if isinstance(e, KeyboardInterrupt):
            raise
        entry.update(status="failed", error=traceback.format_exc())
    finally:
        entry["seconds"] = time.perf_counter() - t0
    return entry


# --------------------------------------------------------------------------- markdown

def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"[{len(value)} values]"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            rows += _flatten(v, key + ".")
        else:
            rows.append((key, v))
    return rows


def generic_markdown(result: dict) -> str:
    """Goal lines (from a ``goals`` mapping, if any) and a key/value table of everything else."""
    lines = []
    goals = result.get("goals") if isinstance(result, dict) else None
    if isinstance(goals, dict):
        for goal, g in goals.items():
            if isinstance(g, dict) and "value" in g:
                met = g.get("met")
                state = "" if met is None else (": met" if met else ": NOT met")
                lines.append(f"- {goal}: **{_cell(g['value'])}** "
                             f"(goal {_cell(g.get('target', '?'))}{state})")
        if lines:
            lines.append("")
    if not isinstance(result, dict):
        return "\n".join(lines + [f"`{_cell(result)}`"])
    rest = {k: v for k, v in result.items() if k not in ("goals", "machine")}
    lines += ["| figure | value |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in _flatten(rest)]
    return "\n".join(lines)


def render(entries: list[dict], info: dict, started: _dt.datetime) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` (`bench/run_all.py`) on {started:%Y-%m-%d %H:%M}.",
        "",
        f"**Machine:** {info.get('cpu')}, {info.get('cores')} cores, {info.get('ram_gib')} GiB "
        f"RAM; {info.get('platform')}; Python {info.get('python')}, torch {info.get('torch')}, "
        f"transformers {info.get('transformers')}, peft {info.get('peft')}.",
        "",
        "Ratios come from one run on this machine; absolute times and memory vary by machine "
        "(and with other load on it), the ratios much less.",
        "",
    ]
    for e in entries:
        title = e["name"].removeprefix("bench_")
        lines += [f"## {title}", "", f"`bench/{e['name']}.py` — {e['status']}"
                  + (f", {e['seconds']:.0f} s" if e["status"] != "missing" else ""), ""]
        if e["status"].startswith("ok"):
            lines += [e["markdown"].rstrip(), ""]
        elif e["status"] == "missing":
            lines += ["Not run: the benchmark file is missing.", ""]
        else:
            tail = "\n".join(e["error"].strip().splitlines()[-12:])
            lines += ["Failed:", "", "```", tail, "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                 ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # benchmarks may import each other's helpers
    started = _dt.datetime.now()
    info = machine_info()
    entries = []
    saved = "--from-results" in (argv or [])
    for name in benchmark_names():
        print(f"=== {name}", flush=True)
        entry = saved_one(name) if saved else run_one(name)
        entries.append(entry)
        if not entry["status"].startswith("ok"):
            print(f"=== {name}: {entry['status']}\n{entry['error']}", file=sys.stderr, flush=True)
    REPORT.write_text(render(entries, info, started))
    print(f"\nwritten {REPORT}")
    for e in entries:
        print(f"  {e['name']}: {e['status']}")
    return 1 if any(e["status"] == "failed" for e in entries) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
