"""Writing outputs so that an interrupted run never leaves anything half-written, never
destroys an input, and leaves nothing behind once the same output is written again.

Every command goes through the same steps:

- `check_output_path` before any work: the output is not one of the inputs (nor holds one, nor
  lies inside one, nor holds the working folder), it does not exist unless `--overwrite` was
  given, and its folder can be written;
- `atomic_dir` / `atomic_file` write into a temporary beside the output and rename it into
  place on success; an existing output is replaced only then (`replace_with`);
- temporaries are named `.NAME.partial-PID-XXXXXXXX` (and `.NAME.old-PID-XXXXXXXX` while an
  old output is moved away; XXXXXXXX: the 8 random characters `tempfile` adds): `clean_stale`
  removes those whose process is gone (killed), the next time the same output is written.
  Only names carrying that whole marker count: a user's `.adapter.old-backup` is never touched;
- long runs that write into their output as they go (`train`, `run`) hold `output_lock`, so a
  second run on the same output is refused at once;
- what is written gets the permissions the user's umask gives new files and folders.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from paratransfer.io.errors import UserError

#: A temporary of this module: `.NAME.partial-PID-XXXXXXXX` or `.NAME.old-PID-XXXXXXXX`, the
#: tail being the 8 characters `tempfile.mkdtemp`/`mkstemp` draw (lower-case letters, digits, _).
_SCRATCH = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<pid>[1-9]\d*)-[a-z0-9_]{8}$")


def absolute(path: str | Path) -> Path:
    """`path` made absolute without resolving symlinks (`.` becomes the working folder)."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


# --------------------------------------------------------------------------- permissions


def umask() -> int:
    """The process's umask (read without changing it where the system allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give `path` (and everything under it) the modes new files and folders get from the umask.

    Temporary files and folders are created private (0600 / 0700); an output renamed into place
    must look like any other file the user creates.
    """
    mask = umask()
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                full = os.path.join(root, f)
                if not os.path.islink(full):
                    os.chmod(full, 0o666 & ~mask)
        os.chmod(path, 0o777 & ~mask)
    elif path.exists() and not path.is_symlink():
        os.chmod(path, 0o666 & ~mask)


# --------------------------------------------------------------------------- checks before work


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies somewhere under it."""
    return path == folder or folder in path.parents


def _local_inputs(inputs: Iterable[str | Path | None]) -> list[Path]:
    """The inputs that are local files or folders (hub ids and None are not), absolute."""
    out = []
    for item in inputs:
        if item is None or str(item) == "":
            continue
        path = absolute(item)
        if path.exists():
            out.append(path)
    return out


def check_not_an_input(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output that is an input, holds one or lies inside one (compared both as given
    and with symlinks resolved), or that is or holds the working folder.

    Replacing such an output (`--overwrite`) would destroy the input it is reading.
    """
    out = absolute(out)
    real_out = Path(os.path.realpath(out))
    for path in _local_inputs(inputs):
        real = Path(os.path.realpath(path))
        for o, i in ((out, path), (real_out, real)):
            if o == i:
                raise UserError(f"{out}: is also an input of this command (give another --out)")
            if _inside(i, o):
                raise UserError(f"{out}: holds the input {path} (writing it would replace that "
                                "input; give another --out)")
            if _inside(o, i):
                raise UserError(f"{out}: lies inside the input {path} (give an --out outside it)")
    cwd = absolute(".")
    if _inside(cwd, out) or _inside(Path(os.path.realpath(cwd)), real_out):
        raise UserError(f"{out}: is the working folder or holds it (give a new folder as --out)")


def check_writable(out: str | Path) -> None:
    """Refuse an output that cannot be written, before any work: the nearest existing folder on
    its way must be a folder in which a file can be created."""
    out = absolute(out)
    _check_nearest_folder(str(out), out.parent)


def _check_nearest_folder(label: str, path: Path) -> None:
    """The nearest existing folder on the way to `path` is a folder a file can be created in
    (else a one-line error starting with `label`)."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{label}: cannot be created, {probe} is a file (expected a folder)")
    try:
        fd, name = tempfile.mkstemp(prefix=".paratransfer-write-test-", dir=probe)
    except OSError as e:
        raise UserError(f"{label}: cannot write in {probe} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)


def refuse_existing(path: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) when `path` exists and `--overwrite` was not given."""
    path = absolute(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise UserError(f"{path}: already exists (pass --overwrite to replace it)")
    return path


def check_output_path(out: str | Path, overwrite: bool,
                      inputs: Iterable[str | Path | None] = ()) -> Path:
    """Everything that can be checked about an output before any work; returns it absolute."""
    out = absolute(out)
    check_not_an_input(out, inputs)
    refuse_existing(out, overwrite)
    check_writable(out)
    return out


def check_work_folder(folder: str | Path, flag: str) -> Path:
    """Refuse a working folder (such as `--work-dir`) that is a file or cannot be written, before
    any work; returns it absolute. It need not exist yet: its nearest existing folder must be
    writable then."""
    folder = absolute(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder}: is a file (expected a folder)")
    _check_nearest_folder(f"{flag} {folder}", folder)
    return folder


# --------------------------------------------------------------------------- a full disk


def human_size(n: int) -> str:
    """Bytes for people: 512 B, 40.0 KiB, 3.2 GiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def free_space(path: str | Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing folder)."""
    path = absolute(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` says the disk (or the quota) is full: an OSError ENOSPC/EDQUOT, or the
    safetensors writer's error that wraps one (`SafetensorError: ... code: 28 ...`)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return type(e).__name__ == "SafetensorError" and (
        "code: 28" in text or "No space left" in text or "StorageFull" in text
        or "QuotaExceeded" in text)


def disk_full_error(target: Path, written: Path | None = None, hint: str = "") -> UserError:
    """The one line a full disk gives: the output, what had been written, what is free."""
    done = ""
    if written is not None and written.exists():
        with contextlib.suppress(OSError):
            done = f"{human_size(_tree_size(written))} of it written, "
    return UserError(f"{target}: no space left on the device while writing it ({done}"
                     f"{human_size(free_space(target))} free there; it needs more: free some "
                     f"space or write elsewhere{hint})")


@contextlib.contextmanager
def disk_full_as_error(target: str | Path, written: Path | None = None,
                       hint: str = "") -> Iterator[None]:
    """Turn a full disk inside the block into a one-line UserError naming `target` (and the
    size of the temporary `written` so far, measured before it is removed)."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise disk_full_error(absolute(target), written, hint) from None


# --------------------------------------------------------------------------- temporaries


def scratch_dir(parent: Path, name: str, kind: str = "partial") -> Path:
    """A new private folder `.NAME.KIND-PID-XXXX` in `parent` (which is created if needed)."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-{os.getpid()}-", dir=parent))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError as e:
        return e.errno != errno.ESRCH
    return True


def stale(entry: Path, name: str | None = None) -> bool:
    """Whether `entry` is a temporary of this module (for output `name`, if given) whose writing
    process is gone. A name without the whole marker (process id and tempfile's 8 characters)
    is someone else's and never stale."""
    m = _SCRATCH.match(entry.name)
    if m is None or (name is not None and m["name"] != name):
        return False
    return not _alive(int(m["pid"]))


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()


def clean_stale(folder: Path, name: str | None = None, recursive: bool = False) -> list[Path]:
    """Remove the stale temporaries in `folder` (only output `name`'s, if given; in every
    subfolder too with `recursive`); returns what was removed."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        if stale(entry, name):
            _remove(entry)
            removed.append(entry)
        elif recursive and entry.is_dir() and not entry.is_symlink():
            removed += clean_stale(entry, name, recursive=True)
    return removed


def replace_with(new: Path, path: Path) -> None:
    """Rename the complete `new` into place as `path`; an old `path` is removed only once the
    new one is in place (interrupted in between, the old one waits in a stale temporary)."""
    if path.exists() or path.is_symlink():
        old = scratch_dir(path.parent, path.name, "old")
        os.replace(path, old / path.name)
        os.replace(new, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, path)


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; rename it into place only on success."""
    path = refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent, path.name)
    with disk_full_as_error(path):
        tmp = scratch_dir(path.parent, path.name)
    try:
        with disk_full_as_error(path, tmp):
            yield tmp
            if path.exists() and not overwrite:
                raise UserError(f"{path}: was created by another process meanwhile (pass "
                                "--overwrite to replace it)")
            follow_umask(tmp)
            replace_with(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; rename it into place only on success."""
    path = refuse_existing(path, overwrite)
    if path.is_dir():
        raise UserError(f"{path}: is a folder (expected a file path)")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent, path.name)
    with disk_full_as_error(path):
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with disk_full_as_error(path, tmp):
            yield tmp
            if path.exists() and not overwrite:
                raise UserError(f"{path}: was created by another process meanwhile (pass "
                                "--overwrite to replace it)")
            follow_umask(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- long runs


def replacing_dir(out: Path) -> Path:
    """Where a run that replaces an existing output (`--overwrite`) works until it is complete;
    `--resume` continues it there."""
    return out.parent / f".{out.name}.replacing"


@contextlib.contextmanager
def output_lock(out: str | Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside the output for the whole run: a second run on the same output
    is refused at once instead of mixing its files into this one's."""
    import fcntl

    out = absolute(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{out}: another paratransfer process is writing it (wait for it to "
                            "finish, or give another --out)") from None
        try:  # the file we locked may have been removed by its last holder meanwhile
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


# --------------------------------------------------------------------------- records


def write_json(path: str | Path, data: Any) -> None:
    """JSON for people and programs: indented, keys in insertion order, trailing newline."""
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def relocate_records(folder: Path, old: Path, new: Path) -> None:
    """Rewrite the paths under `old` that JSON records in `folder` mention as paths under `new`
    (a run that worked in a temporary folder names its outputs where they end up)."""
    old_s, new_s = str(old), str(new)

    def fix(value: Any) -> Any:
        if isinstance(value, str) and (value == old_s or value.startswith(old_s + os.sep)):
            return new_s + value[len(old_s):]
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    for path in sorted(folder.rglob("*.json")):
        text = path.read_text(encoding="utf-8")
        if old_s in text:
            write_json(path, fix(json.loads(text)))
