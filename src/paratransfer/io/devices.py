"""Device and dtype from flags, with defaults that fit the machine (never a hard-coded cpu)."""

from __future__ import annotations

import torch

from paratransfer.io.errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def pick_device(flag: str | None = "auto") -> torch.device:
    """`auto` -> the first CUDA device when there is one, else CPU; otherwise as given."""
    if flag in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(flag)
    except RuntimeError as e:
        raise UserError(f"--device: {flag!r} is not a device (expected auto, cpu, cuda, cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device: {flag} asked for, but no CUDA device is available")
    return device


def pick_dtype(flag: str | None, device: torch.device) -> torch.dtype:
    """`auto` -> fp32 on CPU, bf16 on GPUs that support it (else fp16)."""
    if flag in (None, "", "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if flag not in DTYPES:
        raise UserError(f"--dtype: {flag!r} is not known (expected auto, {', '.join(DTYPES)})")
    return DTYPES[flag]
