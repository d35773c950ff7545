"""A full disk while writing (issue 23, item 7): one line naming the output and the space,
nothing half-written left; and stability's own checks of its work folder (items 6, 8, 19)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from paratransfer.cli.entry import main
from paratransfer.io.errors import UserError


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line_error(code: int, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture()
def small_disk(tmp_path):
    """A 96 KiB tmpfs: big enough to start writing, too small for any tiny model's output."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_a_full_disk_inside_an_atomic_output_is_one_line(tmp_path, kind):
    from safetensors import SafetensorError

    from paratransfer.io.outputs import atomic_dir, atomic_file

    full = (OSError(errno.ENOSPC, "No space left on device") if kind == "oserror" else
            SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                            'message: "No space left on device" })'))
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        with atomic_dir(out) as tmp:
            (tmp / "part").write_bytes(b"x" * 3000)
            raise full
    message = str(e.value)
    assert message.startswith(f"{out}: no space left on the device while writing it (2.9 KiB "
                              "of it written, ") and " free there" in message
    assert "\n" not in message and leftovers(tmp_path) == []
    with pytest.raises(UserError, match=r"out\.bin: no space left on the device"):
        with atomic_file(tmp_path / "out.bin") as tmp:
            raise full
    assert leftovers(tmp_path) == []
    with pytest.raises(OSError, match="Permission"):  # any other error stays what it is
        with atomic_dir(out):
            raise PermissionError(errno.EACCES, "Permission denied")


def test_every_writer_on_a_full_disk(capsys, small_disk, model_pairs, adapters, seeds_file,
                                     tmp_path):
    teacher, student = model_pairs["llama"]
    cases = {
        "sensitivity": ["sensitivity", "--teacher", teacher, "--seeds", seeds_file, "--out",
                        small_disk / "sens.safetensors", "--quiet"],
        "train": ["train", "--student", student, "--data", seeds_file, "--init", "standard",
                  "--out", small_disk / "run", "--rank", "4", "--max-steps", "1",
                  "--batch-size", "2", "--micro-batch-size", "2", "--quiet"],
        "merge": ["merge", "--student", student, "--adapter", adapters["llama"], "--out",
                  small_disk / "merged"],
        "extract": ["extract", "--teacher", teacher, "--student", student, "--seeds",
                    seeds_file, "--out", small_disk / "adapter", "--rank", "4", "--quiet"],
    }
    for name, argv in cases.items():
        line = one_line_error(*run_cli(capsys, *argv))
        assert "no space left on the device while writing it" in line, (name, line)
        assert str(small_disk) in line and " free there" in line, (name, line)
        leftover = [p for p in leftovers(small_disk) if ".partial-" in p or ".old-" in p]
        assert leftover == [], (name, leftover)


def test_stability_checks_its_work_folder_before_loading(capsys, model_pairs, seeds_file,
                                                         tmp_path, monkeypatch):
    """--work-dir onto a file or a read-only folder is refused before any model loads
    (item 8); too little space is refused before the pass, naming the work folder the user
    gave (not a deleted temporary) and counting each file's header (items 6, 19)."""
    import paratransfer.stability.pool as pool

    teacher, student = model_pairs["llama"]
    base = ["stability", "--teacher", teacher, "--student", student, "--seeds", seeds_file,
            "--sizes", "2", "--draws", "1", "--rank", "4", "--quiet"]
    loaded: list[str] = []
    import paratransfer.teacher.models as models

    original = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loaded.append("model") or
                        original(*a, **k))
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = one_line_error(*run_cli(capsys, *base, "--out", tmp_path / "r1", "--work-dir", afile))
    assert f"--work-dir {afile}: is a file" in line
    line = one_line_error(*run_cli(capsys, *base, "--out", tmp_path / "r2", "--work-dir",
                                   afile / "below"))
    assert "is a file" in line and loaded == []
    if os.geteuid() != 0:  # root writes anywhere: read-only is only checkable for others
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        line = one_line_error(*run_cli(capsys, *base, "--out", tmp_path / "r3", "--work-dir", ro))
        assert f"--work-dir {ro}: cannot write" in line and loaded == []

    work = tmp_path / "work"
    work.mkdir()
    measured: dict[str, int] = {}
    real_pool_bytes = pool.pool_bytes

    def spy(teacher_model, samples, metadata):
        measured["need"] = real_pool_bytes(teacher_model, samples, metadata)
        measured["data"] = samples * 4 * sum(p.numel() for p in teacher_model.parameters())
        return measured["need"]

    monkeypatch.setattr(pool, "pool_bytes", spy)
    monkeypatch.setattr(pool, "free_bytes", lambda folder: measured["data"] + 40 * 1024)
    line = one_line_error(*run_cli(capsys, *base, "--out", tmp_path / "r4", "--work-dir", work))
    assert line.startswith(f"error: {work}: the per-sample sensitivity needs ")
    assert "only " in line and "free" in line and ".partial-" not in line
    assert measured["need"] > measured["data"]  # each file's header counted
    assert leftovers(work) == [] and not (tmp_path / "r4").exists()


def test_stability_removes_the_work_folder_a_killed_run_left(capsys, model_pairs, seeds_file,
                                                             tmp_path):
    """A killed stability run leaves `.paratransfer-stability.partial-PID-XXXXXXXX` with its
    per-sample files; the next run in that work folder removes it (item 6)."""
    teacher, student = model_pairs["llama"]
    work = tmp_path / "work"
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = work / f".paratransfer-stability.partial-{dead.pid}-abcd1234"
    left.mkdir(parents=True)
    (left / "sample-000000.safetensors").write_bytes(b"\0" * 4096)
    mine = work / "notes"  # the user's own files there stay
    mine.write_text("keep")
    argv = ["stability", "--teacher", teacher, "--student", student, "--seeds", seeds_file,
            "--sizes", "2", "--draws", "1", "--rank", "4", "--quiet", "--out",
            tmp_path / "report", "--work-dir", work]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert leftovers(work) == ["notes"] and mine.read_text() == "keep"
    report = json.loads((tmp_path / "report" / "stability.json").read_text())
    assert "seconds" not in report and report["timing"]["seconds"] >= 0


def test_stability_work_dir_on_a_read_only_mount(capsys, model_pairs, seeds_file, tmp_path):
    """--work-dir on a read-only file system: one line before any model loads (item 8)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a read-only tmpfs needs root and mount(8)")
    ro = tmp_path / "ro"
    ro.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        teacher, student = model_pairs["llama"]
        line = one_line_error(*run_cli(capsys, "stability", "--teacher", teacher, "--student",
                                       student, "--seeds", seeds_file, "--out",
                                       tmp_path / "report", "--work-dir", ro / "work", "--quiet"))
        assert f"--work-dir {ro / 'work'}: cannot write in {ro}" in line
        assert not (tmp_path / "report").exists()
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)
