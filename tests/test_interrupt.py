"""kill -9 at three points of `train` and of `run`: a finished output is never lost, the run
resumed after each kill ends with the same bytes as an uninterrupted one (timing and the
process's runtime apart: the threads each process ran with are provenance, not results), and
nothing is left behind (no partial folder, no lock, no replacement in waiting)."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from paratransfer.demo.world import arithmetic_records, write_jsonl
from paratransfer.experiment.recipe import load_recipe
from paratransfer.experiment.runner import run_experiment
from paratransfer.train import TrainSettings, run_train

SETTINGS = dict(lr=1e-2, batch_size=2, micro_batch_size=2, max_length=160, max_steps=6,
                checkpoint_every=1)


def contents(folder: Path) -> dict[str, object]:
    """Every file under `folder`: JSON without its `timing` and `runtime` blocks (how long, and
    with which threads, each process ran), other files as bytes."""
    out: dict[str, object] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            key = str(p.relative_to(folder))
            if p.suffix == ".json":
                data = json.loads(p.read_text())
                if isinstance(data, dict):
                    data.pop("timing", None)
                out[key] = _without_runtime(data)
            else:
                out[key] = p.read_bytes()
    return out


def _without_runtime(data: object) -> object:
    """`data` with every `runtime` entry removed, wherever it is nested (a checkpoint's state
    keeps train.json's metadata under `meta`)."""
    if isinstance(data, dict):
        return {k: _without_runtime(v) for k, v in data.items() if k != "runtime"}
    if isinstance(data, list):
        return [_without_runtime(v) for v in data]
    return data


def leftovers(root: Path) -> list[Path]:
    """Temporaries, locks and replacements anywhere under `root`."""
    return [p for p in root.rglob(".*") if any(m in p.name for m in (
        ".partial-", ".old-", ".lock", ".replacing"))]


def _child(work: Callable[..., object], args: tuple, kwargs: dict) -> None:
    import torch

    torch.set_num_threads(1)
    work(*args, **kwargs)


def kill_when(ready: Callable[[], bool], delay: float, work: Callable[..., object], *args,
              **kwargs) -> None:
    """Run `work` in a forked process and SIGKILL it `delay` seconds after `ready()` holds."""
    process = multiprocessing.get_context("fork").Process(target=_child,
                                                          args=(work, args, kwargs))
    process.start()
    deadline = time.monotonic() + 120
    while not ready():
        assert process.is_alive(), "the run ended before the point it was to be killed at"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    time.sleep(delay)
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    assert process.exitcode == -signal.SIGKILL, "the run ended before it was killed"


def exists(pattern_root: Path, pattern: str) -> Callable[[], bool]:
    return lambda: any(pattern_root.glob(pattern))


@pytest.fixture(autouse=True)
def one_thread():
    """Every part of a run on one thread, as the killed children are: bytes are compared, and
    another thread count may add floats in another order."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("kill-data") / "train.jsonl",
                       arithmetic_records(8, seed=4))


@pytest.mark.parametrize("replacing", [False, True], ids=["fresh", "overwrite"])
def test_kill_train_at_three_points(model_pairs, adapters, data, tmp_path, replacing):
    rng = random.Random(11)
    student, adapter = str(model_pairs["llama"][1]), adapters["llama"]
    new = TrainSettings(**SETTINGS)
    reference = tmp_path / "reference"
    run_train(student, data, reference, new, adapter_dir=adapter, progress=False)

    out = tmp_path / "kill" / "run"
    work = out
    finished = None
    if replacing:  # a finished run (other settings) that `--overwrite` is to replace
        run_train(student, data, out, TrainSettings(**{**SETTINGS, "lr": 5e-3}),
                  adapter_dir=adapter, progress=False)
        finished = contents(out)
        work = out.parent / ".run.replacing"
    points = [  # in the first steps, a later step, the final save
        exists(work, "checkpoints/step-000001/state.json"),
        exists(work, "checkpoints/step-000004/state.json"),
        exists(work, "checkpoints/step-000006/state.json"),
    ]
    for i, ready in enumerate(points):
        kill_when(ready, rng.uniform(0, 0.05), run_train, student, data, out, new,
                  adapter_dir=adapter, progress=False, overwrite=replacing and i == 0,
                  resume=i > 0)
        if replacing:
            assert contents(out) in (finished, contents(reference)), f"lost at kill {i + 1}"
        else:
            assert not (out / "train.json").exists()
    result = run_train(student, data, out, new, adapter_dir=adapter, progress=False, resume=True)
    assert result.complete and len(result.summary["timing"]["resumed_from"]) >= 2
    assert contents(out) == contents(reference)
    assert leftovers(tmp_path) == [] and sorted(p.name for p in out.parent.iterdir()) == ["run"]


def test_kill_run_at_three_points(model_pairs, seeds_file, data, tmp_path):
    """`run --overwrite` of a finished run, killed three times and resumed: the finished run
    stays whole until the new one takes its place, with the bytes of an uninterrupted run."""
    rng = random.Random(12)
    teacher, student = model_pairs["llama"]
    settings = {
        "teacher": str(teacher), "student": str(student), "seeds": [1], "references": [],
        "task": {"type": "gsm", "seeds": str(seeds_file), "train": str(data), "eval": str(data)},
        "rank": 4, "alpha": 8, "max_length": 160, "max_steps": 3, "batch_size": 2,
        "micro_batch_size": 2, "checkpoint_every": 1, "limit": 2, "max_new_tokens": 4,
        "eval_batch_size": 2, "lr": 1e-2, "dtype": "float32", "device": "cpu"}
    (tmp_path / "new.yaml").write_text(yaml.safe_dump(settings))
    (tmp_path / "old.yaml").write_text(yaml.safe_dump({**settings, "lr": 5e-3}))
    recipe, old = load_recipe(tmp_path / "new.yaml"), load_recipe(tmp_path / "old.yaml")
    out = tmp_path / "run"
    run_experiment(recipe, out, progress=False, log=lambda line: None)
    reference = contents(out)  # records name `out`: the interrupted run is made there too
    os.rename(out, tmp_path / "reference")
    run_experiment(old, out, progress=False, log=lambda line: None)
    finished = contents(out)

    arms = tmp_path / ".run.replacing" / "arms"
    points = [  # writing the adapter, during training, as the last evaluation starts
        exists(arms, "transfer/.adapter.partial-*"),
        exists(arms, "transfer/seed-1/train/checkpoints/step-000002"),
        exists(arms, "lora/seed-1/train/train.json"),
    ]
    for i, ready in enumerate(points):
        kill_when(ready, rng.uniform(0, 0.02), run_experiment, recipe, out, resume=i > 0,
                  overwrite=i == 0, progress=False, log=lambda line: None)
        assert contents(out) == finished, f"the finished run was touched at kill {i + 1}"
    result = run_experiment(recipe, out, resume=True, progress=False, log=lambda line: None)
    assert result["steps"]["reused"] >= 3
    assert contents(out) == reference
    assert leftovers(tmp_path) == []
