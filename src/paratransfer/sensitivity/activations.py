"""Kept activations of streamed sensitivity (hidden states, incoming gradients): in memory up to a
budget, beyond it in files under an offload folder, removed when done."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux MemAvailable), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_budget() -> int:
    """In-memory budget for kept activations: a quarter of the available memory (else 2 GiB)."""
    available = available_memory()
    return available // 4 if available else 2 << 30


class ActivationStore:
    """Tensors kept between stages, by key: in memory up to `budget` bytes, beyond it in files.

    Files go to a fresh temporary folder inside `folder` (the system's temporary folder when
    None), removed by `close()`. Tensors are kept on the CPU and come back on `device`.
    """

    def __init__(self, folder: str | Path | None = None, budget: int | None = None,
                 device: torch.device | str = "cpu"):
        self.budget = default_budget() if budget is None else budget
        self.device = torch.device(device)
        self._parent = Path(folder) if folder is not None else None
        self._dir: Path | None = None
        self._memory: dict[tuple, torch.Tensor] = {}
        self._files: dict[tuple, Path] = {}
        self.bytes_in_memory = 0
        self.peak_bytes_in_memory = 0
        self.bytes_written = 0

    def _folder(self) -> Path:
        if self._dir is None:
            if self._parent is not None:
                self._parent.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="paratransfer-activations-",
                                              dir=self._parent))
        return self._dir

    def put(self, key: tuple, tensor: torch.Tensor) -> None:
        from safetensors.torch import save_file

        self.pop(key, missing_ok=True)
        tensor = tensor.detach()
        nbytes = tensor.numel() * tensor.element_size()
        if self.bytes_in_memory + nbytes <= self.budget:
            self._memory[key] = tensor.to("cpu")
            self.bytes_in_memory += nbytes
            self.peak_bytes_in_memory = max(self.peak_bytes_in_memory, self.bytes_in_memory)
            return
        path = self._folder() / ("-".join(str(k) for k in key) + ".safetensors")
        save_file({"t": tensor.to("cpu").contiguous()}, str(path))
        self._files[key] = path
        self.bytes_written += nbytes

    def get(self, key: tuple) -> torch.Tensor:
        from safetensors.torch import load_file

        if key in self._memory:
            return self._memory[key].to(self.device)
        return load_file(str(self._files[key]))["t"].to(self.device)

    def pop(self, key: tuple, missing_ok: bool = False) -> torch.Tensor | None:
        if key in self._memory:
            tensor = self._memory.pop(key)
            self.bytes_in_memory -= tensor.numel() * tensor.element_size()
            return tensor.to(self.device)
        if key in self._files:
            tensor = self.get(key)
            self._files.pop(key).unlink(missing_ok=True)
            return tensor
        if missing_ok:
            return None
        raise KeyError(key)

    def close(self) -> None:
        self._memory.clear()
        self._files.clear()
        self.bytes_in_memory = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def offload_folder(out: str | Path, offload_dir: str | Path | None) -> Path:
    """Where spilled activations go: `--offload-dir`, else beside the output file."""
    return Path(offload_dir) if offload_dir is not None else Path(os.path.abspath(out)).parent
