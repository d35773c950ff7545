"""GGUF files as models: a path ending in `.gguf` works wherever a model is read.

`transformers` reads a GGUF file (with the `gguf` package) and dequantizes it to float32, which
takes tens of seconds for a 270M model; a model it loads that way refuses `save_pretrained`
(it keeps a `quantization_config`). So the file is converted once: loaded, rebuilt from its
config without the quantization entry, and saved with its tokenizer as an ordinary model folder
in a cache keyed by the file's SHA-256. Every later command reads that folder, which streams,
loads lazily and fingerprints like any other. The weights are the file's dequantized values:
they carry its quantization noise.

The cache is `$PARATRANSFER_GGUF_CACHE`, else `gguf/` in the project's cache folder
(`$PARATRANSFER_CACHE`, `$XDG_CACHE_HOME/paratransfer` or `~/.cache/paratransfer`). A folder
is written under a temporary name and renamed into place; a lock file keeps two processes
from converting the same file at once, and the loser of a race discards its copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from paratransfer.io.errors import UserError

#: Environment variable that moves the conversion cache.
CACHE_ENV = "PARATRANSFER_GGUF_CACHE"
#: Written into every converted folder: which file it came from.
SOURCE_FILE = "gguf_source.json"
#: Bumped when the conversion changes, so older folders are not reused.
FORMAT = 1


def is_gguf(name_or_path: object) -> bool:
    """Whether a model argument names a GGUF file (by its suffix)."""
    return str(name_or_path).lower().endswith(".gguf")


def cache_root() -> Path:
    """Where converted folders live (outside any repository)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    from paratransfer.demo import cache_root as project_cache

    return project_cache() / "gguf"


def _digest_memo(path: Path) -> Path:
    """A memo of the file's SHA-256 keyed by its path, size and modification time, so that
    each command does not re-read hundreds of megabytes (as `git` trusts its index)."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return cache_root() / "digests" / key


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a GGUF file's bytes (memoized per path, size and mtime)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such file (expected a .gguf model file)")
    memo = _digest_memo(path)
    if memo.is_file():
        value = memo.read_text().strip()
        if len(value) == 64:
            return value
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    value = h.hexdigest()
    with contextlib.suppress(OSError):  # a read-only cache only costs the memo
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(value + "\n")
        os.replace(tmp, memo)
    return value


def _check_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading .gguf files needs the gguf package "
                        "(pip install 'paratransfer[gguf]')")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (POSIX); elsewhere the atomic rename suffices."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _complete(folder: Path, sha256: str) -> bool:
    try:
        source = json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return source.get("sha256") == sha256 and source.get("format") == FORMAT


def convert(path: Path, out: Path, sha256: str) -> None:
    """Load the GGUF file with `transformers` (dequantized, float32) and save it with its
    tokenizer as a plain model folder at `out` (which must not exist)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_package()
    where = (str(path.parent), path.name)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(where[0], gguf_file=where[1],
                                                      dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(where[0], gguf_file=where[1])
    except (ValueError, OSError, KeyError, RuntimeError, TypeError, NotImplementedError) as e:
        raise UserError(f"{path}: transformers cannot load this GGUF file ({_first_line(e)})") from e
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else save_pretrained refuses the model
    state = loaded.state_dict()
    del loaded
    torch.manual_seed(0)  # the random init is overwritten; seeded so nothing varies
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    del state
    model.tie_weights()
    # A tied head is not in the state dict of a tied model; anything else missing is a bug.
    tied = getattr(model, "_tied_weights_keys", None) or {}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UserError(f"{path}: converting the GGUF model left weights "
                        f"{'missing' if missing else 'unexpected'}: {(missing or unexpected)[:3]}")
    out.mkdir(parents=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / SOURCE_FILE).write_text(json.dumps({
        "file": str(path.resolve()), "sha256": sha256, "format": FORMAT,
        "model_type": config.model_type, "transformers": transformers.__version__,
        "note": "dequantized from the GGUF file: the weights carry its quantization noise",
    }, indent=2) + "\n")


def converted_folder(path: str | Path) -> Path:
    """The model folder converted from a GGUF file, converting it on first use."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such file (expected a .gguf model file)")
    sha256 = file_sha256(path)
    root = cache_root()
    folder = root / sha256
    if _complete(folder, sha256):
        return folder
    _check_gguf_package()
    with _lock(root / f".{sha256}.lock"):
        if _complete(folder, sha256):  # another process converted it meanwhile
            return folder
        from paratransfer.io.console import notice
        from paratransfer.io.outputs import clean_stale, follow_umask, scratch_dir

        notice(f"{path}: converting the GGUF file once into {folder} (dequantized to float32)")
        clean_stale(root, sha256)
        tmp = scratch_dir(root, sha256)
        try:
            convert(path, tmp / "model", sha256)
            follow_umask(tmp / "model")  # the scratch folder is private; the cache is not
            if folder.exists():  # an incomplete folder from an older format or a crash
                shutil.rmtree(folder)
            os.replace(tmp / "model", folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_model(name_or_path: str) -> str:
    """The name to hand to `from_pretrained`: a converted folder for a `.gguf` file, else the
    name itself."""
    if is_gguf(name_or_path):
        return str(converted_folder(name_or_path))
    return str(name_or_path)


def gguf_provenance(role: str, name_or_path: object) -> dict:
    """`{"<role>_gguf": {file, sha256, folder}}` for a GGUF model argument, else `{}`: the
    provenance a run records beside the model's label."""
    if name_or_path is None or not is_gguf(name_or_path):
        return {}
    path = Path(str(name_or_path)).expanduser()
    return {f"{role}_gguf": {"file": str(path.resolve()), "sha256": file_sha256(path),
                             "folder": str(converted_folder(path))}}
