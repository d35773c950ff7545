"""`run --jobs 2` as a process: its workers never outlive it (kill -9 or `kill` of the run), a
killed worker is one line naming its chain, and `kill` is handled as Ctrl-C is. Linux only
(the processes are found through /proc); every wait has a deadline, so nothing can hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from paratransfer.demo.world import arithmetic_records, write_jsonl

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="finds the worker processes through /proc")
ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 240.0


def _state(pid: int) -> str | None:
    """The process's state letter, None once it is gone (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return None if state in ("Z", "X") else state


def children_of(parent: int) -> dict[int, str]:
    """pid -> command line of every process `parent` started (workers, and any helper such as
    a multiprocessing resource tracker: none may outlive the run)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent:
            out[int(stat.parent.name)] = cmd
    return out


def chain_workers(children: dict[int, str]) -> dict[int, str]:
    return {pid: cmd for pid, cmd in children.items() if "resource_tracker" not in cmd}


@pytest.fixture
def recipe(model_pairs, seeds_file, tmp_path) -> Path:
    """Two chains (transfer and lora, seed 1) that train long enough to be caught training."""
    teacher, student = model_pairs["llama"]
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_records(8, seed=4))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "teacher": str(teacher), "student": str(student), "seeds": [1], "references": [],
        "task": {"type": "gsm", "seeds": str(seeds_file), "train": str(data), "eval": str(data)},
        "rank": 4, "alpha": 8, "max_length": 160, "max_steps": 100000, "batch_size": 2,
        "micro_batch_size": 2, "checkpoint_every": 1, "limit": 2, "max_new_tokens": 4,
        "eval_batch_size": 2, "dtype": "float32", "device": "cpu"}))
    return path


def start_run(recipe: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen([sys.executable, "-m", "paratransfer", "run", str(recipe), "--out",
                             str(out), "--jobs", "2", "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def wait_until_training(run: subprocess.Popen, out: Path) -> dict[int, str]:
    """The run's processes once both chains are past their first checkpoint."""
    deadline = time.monotonic() + DEADLINE
    while True:
        workers = children_of(run.pid)
        if len(chain_workers(workers)) >= 2 and len(list(out.glob("arms/*/seed-1/train/checkpoints/step-*"))) >= 2:
            return workers
        if run.poll() is not None or time.monotonic() > deadline:
            os.killpg(run.pid, signal.SIGKILL)
            _, err = run.communicate()
            pytest.fail(f"the run did not reach training (exit {run.returncode}): {err[-2000:]}")
        time.sleep(0.05)


def assert_gone(pids, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while any(_state(pid) for pid in pids):
        if time.monotonic() > deadline:
            alive = [pid for pid in pids if _state(pid)]
            for pid in alive:
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"workers {alive} outlived the run")
        time.sleep(0.05)


def finish(run: subprocess.Popen, timeout: float = 60.0) -> tuple[int, str, str]:
    try:
        out, err = run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        run.communicate()
        pytest.fail("the run did not end after it was stopped")
    return run.returncode, out, err


def test_workers_die_with_a_run_killed_by_sigkill(recipe, tmp_path):
    run = start_run(recipe, tmp_path / "run")
    workers = wait_until_training(run, tmp_path / "run")
    run.kill()
    finish(run)
    assert_gone(workers)


def test_sigterm_is_handled_as_ctrl_c(recipe, tmp_path):
    """A plain `kill` of the run: its workers stop, one line, a clean exit, nothing leaked."""
    run = start_run(recipe, tmp_path / "run")
    workers = wait_until_training(run, tmp_path / "run")
    run.terminate()
    code, _, err = finish(run)
    assert_gone(workers, within=5.0)  # stopped by the run, before it exited
    assert code == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "leaked" not in err, err
    assert err.strip().splitlines()[-1].startswith("interrupted"), err


def test_a_killed_worker_is_one_line_naming_its_chain(recipe, tmp_path):
    run = start_run(recipe, tmp_path / "run")
    workers = wait_until_training(run, tmp_path / "run")
    victim, cmd = sorted(chain_workers(workers).items())[0]
    arm = cmd.split("paratransfer.experiment.worker ", 1)[-1].split()[1:2]
    os.kill(victim, signal.SIGKILL)  # as the out-of-memory killer would
    code, _, err = finish(run)
    assert_gone(workers, within=5.0)
    assert code == 2 and "Traceback" not in err and "leaked" not in err, err
    last = err.strip().splitlines()[-1]
    assert arm and last.startswith(f"error: arm {arm[0]} seed 1: its worker process was killed "
                                   "(SIGKILL")
    assert "--resume" in last
