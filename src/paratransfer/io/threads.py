"""How many CPUs this process may really use, and the intra-op thread count that follows.

Torch starts one thread per *visible* core. Inside a container whose CPU quota is below the
visible count, or a process pinned to fewer cores, those threads wait on each other at every
parallel region, and a command runs several times slower than its work needs. So the default
is the smaller of the process's CPU affinity and its cgroup CPU quota; `--threads N` overrides.

Standard library only: this module is imported before torch, whose thread pool reads
`OMP_NUM_THREADS` when it starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count and where it came from, as recorded in a run's provenance."""

    threads: int
    source: str          # "--threads", "OMP_NUM_THREADS", "affinity", "cgroup quota"
    affinity: int
    quota: float | None  # CPUs allowed by the cgroup quota, None when unlimited

    def as_dict(self) -> dict:
        return {"threads": self.threads, "source": self.source, "affinity_cpus": self.affinity,
                "cgroup_quota_cpus": self.quota}


def affinity_cpus() -> int:
    """CPUs this process may be scheduled on (its affinity mask; all visible ones elsewhere)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """This process's cgroup v2 path and its v1 `cpu` controller path, from /proc/self/cgroup."""
    v2 = v1 = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(path: str | None) -> list[str]:
    """`/a/b` -> ["a/b", "a", ""]: a quota set on any ancestor limits this cgroup too."""
    parts = [p for p in (path or "").split("/") if p]
    return ["/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _quota_v2(text: str | None) -> float | None:
    """`cpu.max` holds "QUOTA PERIOD" or "max PERIOD"."""
    if not text:
        return None
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _quota_v1(quota_text: str | None, period_text: str | None) -> float | None:
    """`cpu.cfs_quota_us` is -1 when unlimited."""
    try:
        quota, period = int(quota_text or ""), int(period_text or "")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_quota_cpus(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """The tightest CPU quota on this process's cgroup or its ancestors, in CPUs (None: none)."""
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    v2, v1 = _cgroup_paths(proc_cgroup)
    found: list[float] = []
    for rel in _ancestors(v2):
        q = _quota_v2(_read(root / rel / "cpu.max"))
        if q is not None:
            found.append(q)
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        for rel in _ancestors(v1):
            base = root / mount / rel
            q = _quota_v1(_read(base / "cpu.cfs_quota_us"), _read(base / "cpu.cfs_period_us"))
            if q is not None:
                found.append(q)
    return min(found) if found else None


def choose_threads(flag: int | None = None, environ: os._Environ | dict | None = None,
                   affinity: int | None = None, quota: float | None | str = "read") -> ThreadChoice:
    """`--threads` when given, else `OMP_NUM_THREADS` when the user set it, else the CPUs this
    process may use: min(affinity, floor(cgroup quota)), at least 1 (a 1.5-CPU quota gets
    one thread: a second would be throttled in every period)."""
    env = os.environ if environ is None else environ
    affinity = affinity_cpus() if affinity is None else affinity
    quota = cgroup_quota_cpus() if quota == "read" else quota
    if flag is not None:
        return ThreadChoice(flag, "--threads", affinity, quota)
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return ThreadChoice(int(omp), "OMP_NUM_THREADS", affinity, quota)
    if quota is not None and max(1, math.floor(quota)) < affinity:
        return ThreadChoice(max(1, math.floor(quota)), "cgroup quota", affinity, quota)
    return ThreadChoice(affinity, "affinity", affinity, quota)
