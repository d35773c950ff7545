"""The default thread count: the CPUs this process may use (affinity, cgroup quota), overridable."""

from __future__ import annotations

from pathlib import Path

import pytest

from paratransfer.io.threads import cgroup_quota_cpus, choose_threads


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_cgroup_v2_quota_read_from_the_process_cgroup(tmp_path):
    _write(tmp_path, "box/cpu.max", "150000 100000")
    assert cgroup_quota_cpus(tmp_path, "0::/box\n") == pytest.approx(1.5)


def test_cgroup_v2_unlimited_is_none(tmp_path):
    _write(tmp_path, "box/cpu.max", "max 100000")
    _write(tmp_path, "cpu.max", "max 100000")
    assert cgroup_quota_cpus(tmp_path, "0::/box\n") is None


def test_cgroup_v2_ancestor_quota_limits_the_child(tmp_path):
    _write(tmp_path, "a/cpu.max", "100000 100000")
    _write(tmp_path, "a/b/cpu.max", "max 100000")
    assert cgroup_quota_cpus(tmp_path, "0::/a/b\n") == pytest.approx(1.0)


def test_cgroup_v1_quota(tmp_path):
    _write(tmp_path, "cpu,cpuacct/job/cpu.cfs_quota_us", "300000")
    _write(tmp_path, "cpu,cpuacct/job/cpu.cfs_period_us", "100000")
    text = "4:memory:/job\n2:cpu,cpuacct:/job\n0::/\n"
    assert cgroup_quota_cpus(tmp_path, text) == pytest.approx(3.0)


def test_cgroup_v1_unlimited_and_missing_files(tmp_path):
    _write(tmp_path, "cpu/cpu.cfs_quota_us", "-1")
    _write(tmp_path, "cpu/cpu.cfs_period_us", "100000")
    assert cgroup_quota_cpus(tmp_path, "1:cpu:/\n") is None
    assert cgroup_quota_cpus(tmp_path / "nothing", "garbage line\n0::/x\n") is None


def test_tightest_of_several_quotas_wins(tmp_path):
    _write(tmp_path, "x/cpu.max", "400000 100000")
    _write(tmp_path, "cpu/x/cpu.cfs_quota_us", "200000")
    _write(tmp_path, "cpu/x/cpu.cfs_period_us", "100000")
    assert cgroup_quota_cpus(tmp_path, "0::/x\n1:cpu:/x\n") == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("flag", "env", "affinity", "quota", "expected", "source"),
    [
        (None, {}, 8, None, 8, "affinity"),
        (None, {}, 8, 2.0, 2, "cgroup quota"),
        (None, {}, 8, 1.5, 1, "cgroup quota"),   # a second thread would be throttled
        (None, {}, 8, 0.5, 1, "cgroup quota"),   # never zero
        (None, {}, 2, 4.0, 2, "affinity"),       # a quota above the affinity does not add CPUs
        (None, {"OMP_NUM_THREADS": "3"}, 8, 2.0, 3, "OMP_NUM_THREADS"),
        (None, {"OMP_NUM_THREADS": "zero"}, 4, None, 4, "affinity"),
        (5, {"OMP_NUM_THREADS": "3"}, 8, 2.0, 5, "--threads"),
    ],
)
def test_choose_threads(flag, env, affinity, quota, expected, source):
    choice = choose_threads(flag, env, affinity=affinity, quota=quota)
    assert (choice.threads, choice.source) == (expected, source)
    assert choice.as_dict()["threads"] == expected


def test_this_process_gets_at_least_one_thread():
    choice = choose_threads(None, {})
    assert 1 <= choice.threads <= choice.affinity
