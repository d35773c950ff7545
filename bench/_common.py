"""Small helpers every benchmark shares (imported as `_common`: bench/ is on sys.path both when
a benchmark runs as a script and when bench/run_all.py imports it)."""

from __future__ import annotations

import json
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def save_result(result: dict, out: str | Path | None) -> None:
    """Write a benchmark's result as JSON (for run_all.py --from-results), when asked to."""
    if not out:
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten {out}")


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (from /proc/stat), or None."""
    import os

    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
