"""What every command does with its output: never replaces one of its inputs, refuses an output
it cannot write before any work, leaves no temporaries of killed runs behind, writes files with
the user's umask, and writes the same bytes twice for the same inputs (timing apart)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from paratransfer.cli.entry import main
from paratransfer.demo.world import arithmetic_records, write_jsonl
from paratransfer.io.errors import UserError


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) -> the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture()
def inputs(model_pairs, adapters, seeds_file, tmp_path) -> dict[str, Path]:
    """Copies of a student, an adapter, seeds and training data, so a failure cannot harm the
    session's fixtures; the training data sits in a folder of its own."""
    data = tmp_path / "data"
    data.mkdir()
    return {"teacher": model_pairs["llama"][0],
            "student": Path(shutil.copytree(model_pairs["llama"][1], tmp_path / "student")),
            "adapter": Path(shutil.copytree(adapters["llama"], tmp_path / "adapter")),
            "seeds": Path(shutil.copy(seeds_file, tmp_path / "seeds.jsonl")),
            "data": data,
            "train": write_jsonl(data / "train.jsonl", arithmetic_records(6, seed=3))}


# --------------------------------------------------------------------------- inputs are safe


def test_overwrite_never_replaces_an_input(capsys, inputs, tmp_path):
    i = inputs
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.parent.mkdir()
    recipe.write_text(yaml.safe_dump({
        "teacher": str(i["teacher"]), "student": str(i["student"]),
        "task": {"type": "gsm", "seeds": str(i["seeds"]), "train": str(i["train"]),
                 "eval": str(i["train"])}}))
    before = tree(tmp_path)
    cases = [  # (the probe's commands) output = an input, holds one, lies inside one
        ("is also an input", ["extract", "--teacher", i["teacher"], "--student", i["student"],
                              "--seeds", i["seeds"], "--out", i["student"]]),
        ("is also an input", ["sensitivity", "--teacher", i["teacher"], "--seeds", i["seeds"],
                              "--out", i["seeds"]]),
        ("is also an input", ["evaluate", "--model", i["student"], "--task", "gsm", "--data",
                              i["seeds"], "--out", i["student"]]),
        ("holds the input", ["train", "--student", i["student"], "--data", i["train"],
                             "--out", i["data"], "--init", "standard"]),
        ("lies inside the input", ["merge", "--student", i["student"], "--adapter", i["adapter"],
                                   "--out", i["adapter"] / "merged"]),
        ("holds the input", ["run", recipe, "--out", recipe.parent]),
    ]
    for needle, argv in cases:
        code, _, err = run_cli(capsys, *argv, "--overwrite")
        assert needle in one_line_error(code, err), (argv[0], err)
    assert tree(tmp_path) == before


def test_inputs_compared_through_symlinks(tmp_path):
    from paratransfer.io.outputs import check_not_an_input

    (tmp_path / "model").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "model")
    with pytest.raises(UserError, match="is also an input"):
        check_not_an_input(tmp_path / "link", [tmp_path / "model"])
    check_not_an_input(tmp_path / "out", [tmp_path / "model", "org/hub-model", None])


def test_out_dot_with_overwrite_is_refused(capsys, inputs, tmp_path, monkeypatch):
    """`extract --out . --overwrite` would replace the working folder (and crashed before)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep")
    monkeypatch.chdir(work)
    code, _, err = run_cli(capsys, "extract", "--teacher", inputs["teacher"], "--student",
                           inputs["student"], "--seeds", inputs["seeds"], "--out", ".",
                           "--overwrite", "--quiet")
    assert "working folder" in one_line_error(code, err)
    assert (work / "notes.txt").read_text() == "keep"


# --------------------------------------------------------------------------- before any work


def _unwritable(tmp_path: Path) -> Path:
    """A folder nobody may create files in (a read-only one as a user; /sys as root)."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return locked
    if os.access("/sys", os.W_OK) and Path("/sys").is_dir():
        try:
            Path("/sys/.paratransfer-probe").touch()
        except OSError:
            return Path("/sys")
        Path("/sys/.paratransfer-probe").unlink()
    pytest.skip("no read-only folder to test with")


def test_unwritable_output_refused_before_any_work(capsys, inputs, tmp_path, monkeypatch):
    import paratransfer.extract.step as pipeline

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr(pipeline, "load_model", no_work)
    monkeypatch.setattr(pipeline, "extraction_teacher", no_work)
    out = _unwritable(tmp_path) / "sub" / "sens.safetensors"
    code, _, err = run_cli(capsys, "sensitivity", "--teacher", inputs["teacher"], "--seeds",
                           inputs["seeds"], "--out", out, "--quiet")
    assert "cannot write" in one_line_error(code, err)
    (tmp_path / "notes.txt").write_text("a file on the way")
    code, _, err = run_cli(capsys, "extract", "--teacher", inputs["teacher"], "--student",
                           inputs["student"], "--seeds", inputs["seeds"], "--out",
                           tmp_path / "notes.txt" / "adapter", "--quiet")
    assert "is a file" in one_line_error(code, err)


def test_second_train_on_the_same_output_is_refused(capsys, inputs, tmp_path):
    from paratransfer.io.outputs import output_lock

    out = tmp_path / "run"
    with output_lock(out):  # as a first `train` holds it while it runs
        code, _, err = run_cli(capsys, "train", "--student", inputs["student"], "--data",
                               inputs["train"], "--out", out, "--init", "standard", "--quiet")
        assert "another paratransfer process" in one_line_error(code, err)
    assert not out.exists()
    assert not list(tmp_path.glob(".run.*"))  # the lock file goes with its holder


# --------------------------------------------------------------------------- leftovers


def test_temporaries_of_killed_runs_are_removed_next_time(capsys, inputs, tmp_path):
    from paratransfer.io.outputs import clean_stale, stale

    gone, mine = dead_pid(), os.getpid()
    out = tmp_path / "adapter-out"
    leftovers = [tmp_path / f".adapter-out.partial-{gone}-abc_1234",
                 tmp_path / f".adapter-out.old-{gone}-x0x0x0x0"]
    for p in leftovers:
        (p / "inner").mkdir(parents=True)
    live = tmp_path / f".adapter-out.partial-{mine}-livelive"  # a writer that is still running
    other = tmp_path / f".other.partial-{gone}-yyyyyyyy"  # another output's: not this run's
    for p in (live, other):
        p.mkdir()
    assert all(stale(p, "adapter-out") for p in leftovers) and not stale(live, "adapter-out")
    code, _, err = run_cli(capsys, "extract", "--teacher", inputs["teacher"], "--student",
                           inputs["student"], "--seeds", inputs["seeds"], "--out", out, "--rank",
                           "4", "--quiet")
    assert code == 0, err
    assert not any(p.exists() for p in leftovers) and live.is_dir() and other.is_dir()
    assert clean_stale(tmp_path) == [other] and live.is_dir()


def test_folders_the_tool_did_not_create_are_never_removed(capsys, inputs, tmp_path):
    """Only names with the whole marker (.NAME.partial|old-PID-XXXXXXXX) are temporaries: a
    user's own `.adapter.old-backup` beside the output must survive writing it."""
    from paratransfer.io.outputs import clean_stale, stale

    gone = dead_pid()
    users = [tmp_path / ".u-adapter.old-backup", tmp_path / ".u-adapter.old-v1",
             tmp_path / ".u-adapter.partial-notes", tmp_path / f".u-adapter.old-{gone}-mine",
             tmp_path / f".u-adapter.partial-{gone}-TOOLONG12"]
    for p in users:
        (p / "keep.txt").parent.mkdir(parents=True)
        (p / "keep.txt").write_text("mine")
    assert not any(stale(p, "u-adapter") for p in users)
    code, _, err = run_cli(capsys, "extract", "--teacher", inputs["teacher"], "--student",
                           inputs["student"], "--seeds", inputs["seeds"], "--out",
                           tmp_path / "u-adapter", "--rank", "4", "--quiet")
    assert code == 0, err
    assert all((p / "keep.txt").read_text() == "mine" for p in users)
    assert clean_stale(tmp_path) == []


# --------------------------------------------------------------------------- the same bytes


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_follow_the_umask(capsys, inputs, tmp_path, mask):
    old = os.umask(mask)
    try:
        root = tmp_path / "out"
        sens, adapter, run = root / "sens.safetensors", root / "adapter", root / "run"
        assert run_cli(capsys, "sensitivity", "--teacher", inputs["teacher"], "--seeds",
                       inputs["seeds"], "--out", sens, "--quiet")[0] == 0
        assert run_cli(capsys, "extract", "--teacher", inputs["teacher"], "--student",
                       inputs["student"], "--sensitivity", sens, "--out", adapter, "--rank", "4",
                       "--quiet")[0] == 0
        assert run_cli(capsys, "train", "--student", inputs["student"], "--data", inputs["train"],
                       "--out", run, "--adapter", adapter, "--max-steps", "1", "--batch-size", "2",
                       "--micro-batch-size", "2", "--max-length", "160", "--quiet")[0] == 0
        assert run_cli(capsys, "merge", "--student", inputs["student"], "--adapter", run,
                       "--out", root / "merged")[0] == 0
    finally:
        os.umask(old)
    paths = [root, *root.rglob("*")]
    modes = {oct(p.stat().st_mode & 0o777) for p in paths if p.is_dir()}
    assert modes == {oct(0o777 & ~mask)}
    modes = {oct(p.stat().st_mode & 0o777) for p in paths if p.is_file()}
    assert modes == {oct(0o666 & ~mask)}


def _without_timing(folder: Path) -> dict[str, object]:
    """Every file's bytes, JSON files without their `timing` block."""
    out: dict[str, object] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            if p.suffix == ".json":
                data = json.loads(p.read_text())
                if isinstance(data, dict):
                    data.pop("timing", None)
                out[str(p.relative_to(folder))] = data
            else:
                out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_identical_runs_write_identical_folders(inputs, tmp_path):
    from paratransfer.extract.plan import ExtractSettings
    from paratransfer.extract.step import run_extract
    from paratransfer.train import TrainSettings, run_train

    settings = TrainSettings(max_steps=3, batch_size=2, micro_batch_size=2, max_length=160,
                             checkpoint_every=1)
    for name in ("a", "b"):
        run_extract(str(inputs["teacher"]), str(inputs["student"]), tmp_path / name / "adapter",
                    ExtractSettings(rank=4), seeds=inputs["seeds"], progress=False)
        run_train(str(inputs["student"]), inputs["train"], tmp_path / name / "run", settings,
                  adapter_dir=tmp_path / "a" / "adapter", progress=False)  # (paths recorded)
    for step in ("adapter", "run"):
        a, b = (_without_timing(tmp_path / name / step) for name in ("a", "b"))
        assert a == b, step
    report = json.loads((tmp_path / "a" / "adapter" / "transfer.json").read_text())
    assert report["timing"]["seconds"] > 0 and "seconds" not in report
    info = json.loads((tmp_path / "a" / "run" / "train.json").read_text())
    assert set(info["timing"]) == {"train_seconds", "tokens_per_second", "step_seconds",
                                   "resumed_from"}
    assert len(info["timing"]["step_seconds"]) == 3
    assert all("seconds" not in h for h in info["history"])
    # PEFT keeps target modules in a set, whose order changes between processes: sorted here.
    for config in (tmp_path / "a").rglob("adapter_config.json"):
        targets = json.loads(config.read_text())["target_modules"]
        assert targets == sorted(targets), config
