"""How many CPUs this process may really use, and the intra-op thread count that follows.

Torch starts one thread per *visible* core. Inside a container whose CPU quota is below the
visible count, or a process pinned to fewer cores, those threads wait on each other at every
parallel region, and a command runs several times slower than its work needs. So the default
is the smaller of the process's CPU affinity and its cgroup CPU quota; `--threads N` overrides.

Standard library only at import: the command line imports this module before torch, whose
OpenMP runtime reads `OMP_NUM_THREADS` and `OMP_WAIT_POLICY` when it loads.

Why `OMP_WAIT_POLICY=PASSIVE` by default: under the default policy an OpenMP thread that
finishes its share spins on its core waiting for the others. Beside another busy process on a
2-core machine that meant a 2-thread torch workload ran 10-20x slower than with 1 thread; with
PASSIVE waiting threads sleep, and 2 threads ran about as fast as 1 or faster
(bench/bench_threads.py measures it).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
WAIT_POLICY = "OMP_WAIT_POLICY"

#: The choice `apply_threads` made in this process (None: none made, torch's own default).
_applied: ThreadChoice | None = None


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


def prefer_passive_waiting() -> None:
    """OpenMP threads sleep rather than spin while they wait, unless the user chose a policy.
    Only effective before torch is imported (and inherited by spawned workers and torchrun's
    children, which get this process's environment)."""
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")


def apply_threads(choice: ThreadChoice) -> ThreadChoice:
    """Set torch's intra-op thread count before any work, and remember it for `runtime()`."""
    global _applied
    import torch

    torch.set_num_threads(choice.threads)
    _applied = choice
    return choice


def runtime() -> dict:
    """The `runtime` entry of every output JSON: the threads torch used, where their count came
    from, the CPUs the process could use, and the OpenMP wait policy. The count is torch's own
    (what the run used); the source says "torch default" when nothing set it, "set in code"
    when the code changed it after `apply_threads` (the demo builds its models on one thread)."""
    import torch

    threads = torch.get_num_threads()
    choice = _applied
    if choice is None or choice.threads != threads:
        source = "torch default" if choice is None else "set in code"
        choice = ThreadChoice(threads, source, affinity_cpus(), cgroup_quota_cpus())
    return {**choice.as_dict(), "omp_wait_policy": os.environ.get(WAIT_POLICY)}
