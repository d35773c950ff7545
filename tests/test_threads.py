"""The default thread count: the CPUs this process may use (affinity, cgroup quota), overridable
with --threads, applied by every model-running command and recorded in each output's `runtime`;
OMP_WAIT_POLICY=PASSIVE unless the user chose, set before torch is imported."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paratransfer.cli.entry import main
from paratransfer.demo.world import arithmetic_records, write_jsonl
from paratransfer.io.threads import affinity_cpus, cgroup_quota_cpus, choose_threads


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


# --------------------------------------------------------------------------- the command line

@pytest.fixture
def restore_threads():
    """Commands set torch's thread count for the process; later tests get theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _merge(adapters, model_pairs, out, *extra: str) -> dict:
    student = model_pairs["llama"][1]
    code = main(["merge", "--student", str(student), "--adapter", str(adapters["llama"]),
                 "--out", str(out), *extra])
    assert code == 0
    return json.loads((out / "merge.json").read_text())["runtime"]


def test_threads_flag_is_applied_and_recorded(restore_threads, adapters, model_pairs, tmp_path):
    runtime = _merge(adapters, model_pairs, tmp_path / "m", "--threads", "2")
    assert (runtime["threads"], runtime["source"]) == (2, "--threads")
    assert torch.get_num_threads() == 2


def test_threads_follow_omp_num_threads_when_set(restore_threads, adapters, model_pairs, tmp_path,
                                                  monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runtime = _merge(adapters, model_pairs, tmp_path / "m")
    assert (runtime["threads"], runtime["source"]) == (1, "OMP_NUM_THREADS")


def test_default_threads_are_the_cpus_this_process_may_use(restore_threads, adapters, model_pairs,
                                                          tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    runtime = _merge(adapters, model_pairs, tmp_path / "m")
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = cgroup_quota_cpus()
    want = allowed if quota is None else min(allowed, max(1, math.floor(quota)))
    assert runtime["threads"] == want == torch.get_num_threads()
    assert runtime["source"] in ("affinity", "cgroup quota")
    assert runtime["affinity_cpus"] == affinity_cpus() and runtime["cgroup_quota_cpus"] == quota


def test_bad_thread_counts_are_usage_errors(capsys):
    for value in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as e:
            main(["merge", "--student", "s", "--adapter", "a", "--out", "o", "--threads", value])
        assert e.value.code == 2
        assert "--threads" in capsys.readouterr().err


def test_every_output_json_records_the_runtime(restore_threads, model_pairs, seeds_file, tmp_path,
                                               capsys):
    """sensitivity, extract, train, evaluate and stability, as the CLI runs them."""
    teacher, student = (str(p) for p in model_pairs["llama"])
    seeds = str(seeds_file)
    data = str(write_jsonl(tmp_path / "train.jsonl", arithmetic_records(4, seed=5)))
    common = ("--threads", "1", "--quiet")
    sens, adapter, run, ev, stab = (str(tmp_path / n) for n in ("s.safetensors", "adapter",
                                                                  "run", "eval", "stab"))
    for argv in (["sensitivity", "--teacher", teacher, "--seeds", seeds, "--out", sens],
                 ["extract", "--teacher", teacher, "--student", student, "--sensitivity", sens,
                  "--out", adapter, "--rank", "4"],
                 ["train", "--student", student, "--adapter", adapter, "--data", data, "--out",
                  run, "--max-steps", "1", "--batch-size", "2", "--micro-batch-size", "2"],
                 ["evaluate", "--model", student, "--adapter", run, "--task", "gsm", "--data",
                  data, "--out", ev, "--limit", "2", "--max-new-tokens", "4"],
                 ["stability", "--teacher", teacher, "--student", student, "--seeds", seeds,
                  "--out", stab, "--sizes", "2", "--draws", "1", "--rank", "4"]):
        assert main([*argv, *common]) == 0, capsys.readouterr().err
    from paratransfer.sensitivity.accumulate import SensitivityFile

    records = {"sensitivity": SensitivityFile(sens).metadata["runtime"]}
    for name, path in (("transfer", f"{adapter}/transfer.json"), ("train", f"{run}/train.json"),
                       ("metrics", f"{ev}/metrics.json"), ("stability", f"{stab}/stability.json")):
        records[name] = json.loads(open(path).read())["runtime"]
    for name, runtime in records.items():
        assert (runtime["threads"], runtime["source"]) == (1, "--threads"), name
        assert runtime["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY"), name


#: Records OMP_WAIT_POLICY at the moment torch is first imported, then runs the CLI.
WAIT_PROBE = """
import importlib.abc, json, os, sys
seen = {}
class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "policy" not in seen:
            seen["policy"] = os.environ.get("OMP_WAIT_POLICY")
        return None
sys.meta_path.insert(0, Spy())
from paratransfer.cli import main
code = main(sys.argv[1:])
print("PROBE " + json.dumps({"code": code, **seen}))
"""


@pytest.mark.parametrize("given,want", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_wait_policy_is_set_before_torch_is_imported(given, want, adapters, model_pairs, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    out = tmp_path / "m"
    argv = ["merge", "--student", str(model_pairs["llama"][1]), "--adapter",
            str(adapters["llama"]), "--out", str(out)]
    proc = subprocess.run([sys.executable, "-c", WAIT_PROBE, *argv], env=env, capture_output=True,
                          text=True, timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert line, proc.stderr[-2000:]
    assert json.loads(line[-1][6:]) == {"code": 0, "policy": want}
    assert json.loads((out / "merge.json").read_text())["runtime"]["omp_wait_policy"] == want


def test_runtime_says_where_the_count_came_from(restore_threads, monkeypatch):
    from paratransfer.io import threads

    monkeypatch.setattr(threads, "_applied", None)
    assert threads.runtime()["source"] == "torch default"
    threads.apply_threads(threads.ThreadChoice(1, "--threads", 2, None))
    assert (threads.runtime()["threads"], threads.runtime()["source"]) == (1, "--threads")
    torch.set_num_threads(2)  # code that changes it afterwards (the demo does)
    assert (threads.runtime()["threads"], threads.runtime()["source"]) == (2, "set in code")
