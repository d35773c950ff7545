"""Loading teachers and students: anything `AutoModelForCausalLM.from_pretrained` takes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from paratransfer.errors import UserError


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """A causal LM in evaluation mode (dropout off), with a one-line error when it can't load."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{name_or_path}: cannot load a causal LM ({first})") from e
    model.to(device)
    model.eval()
    return model


def load_tokenizer(name_or_path: str):
    """The model's tokenizer, with a pad token (EOS when the tokenizer defines none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{name_or_path}: cannot load a tokenizer ({first})") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def canonical_names(model: torch.nn.Module) -> dict[str, str]:
    """Every parameter name (tied aliases included) -> the name `named_parameters()` keeps."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(p), name)
    return out


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the parameter names, shapes and a slice of values: identifies a teacher."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)};".encode())
        h.update(p.detach().flatten()[:8].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_label(name_or_path: str) -> str:
    """How a model is named in reports: the path as given (resolved when it is a folder)."""
    p = Path(name_or_path)
    return str(p.resolve()) if p.exists() else str(name_or_path)
