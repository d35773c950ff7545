"""Loading teachers and students: anything `AutoModelForCausalLM.from_pretrained` takes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from paratransfer.errors import UserError


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", device_map: str | dict | None = None):
    """A causal LM in evaluation mode (dropout off), with a one-line error when it can't load.

    `device_map` ("auto", "balanced", ... or a dict) spreads the layers over the available
    devices with accelerate instead of moving the model to `device`. Placements on "disk" are
    refused: accelerate's offloaded parameters silently get no gradient.
    """
    from transformers import AutoModelForCausalLM

    kwargs = {"device_map": device_map} if device_map is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{name_or_path}: cannot load a causal LM ({first})") from e
    if device_map is None:
        model.to(device)
    else:
        placed = getattr(model, "hf_device_map", None) or {}
        offloaded = [k for k, v in placed.items() if str(v) == "disk"]
        offloaded += [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if offloaded:
            raise UserError(f"{name_or_path}: --device-map {device_map} left {offloaded[0]!r} (and "
                            f"{len(offloaded) - 1} more) off the devices; offloaded weights get no "
                            "gradient, so their sensitivity would be zero (use --stream instead)")
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


def _fingerprint_items(teacher):
    """(name, shape, first values) per parameter, in `named_parameters()` order, tied once."""
    if isinstance(teacher, torch.nn.Module):
        for name, p in teacher.named_parameters():
            yield name, tuple(p.shape), p.detach().flatten()[:8]
    elif hasattr(teacher, "canonical_names") and hasattr(teacher, "head"):  # read lazily
        for name in dict.fromkeys(teacher.canonical_names().values()):
            yield name, tuple(teacher.shape(name)), teacher.head(name, 8)
    elif isinstance(getattr(teacher, "model", None), torch.nn.Module):  # in-memory weights
        yield from _fingerprint_items(teacher.model)
    else:
        raise TypeError(f"cannot fingerprint {type(teacher).__name__}: expected a model or "
                        "a weights source with canonical_names() and head()")


def fingerprint(teacher) -> str:
    """A short hash of the parameter names, shapes and first values: identifies a teacher.

    `teacher` is a model or a weights source (`SafetensorsWeights`); both give the same hash.
    Only the first 8 values of each tensor are read, rounded to bfloat16, so the teacher loaded
    in fp32 or bf16, or read from its files, gives one fingerprint.
    """
    h = hashlib.sha256()
    for name, shape, head in _fingerprint_items(teacher):
        h.update(f"{name}:{shape};".encode())
        values = head.detach().to("cpu", torch.float32).to(torch.bfloat16)
        h.update(values.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def model_label(name_or_path: str) -> str:
    """How a model is named in reports: the path as given (resolved when it is a folder)."""
    p = Path(name_or_path)
    return str(p.resolve()) if p.exists() else str(name_or_path)
