"""Loading teachers and students: anything `AutoModelForCausalLM.from_pretrained` takes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from paratransfer.io.errors import UserError

#: Files a tokenizer saved with `save_pretrained` leaves in a model folder (any one will do).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def looks_like_path(name: str) -> bool:
    """Whether a model name can only be a local path (a hub id is `name` or `org/name`; a name
    ending in `.gguf` is a file)."""
    return (name.startswith((".", "/", "~")) or "\\" in name or name.endswith("/")
            or name.count("/") > 1 or name.lower().endswith(".gguf"))


def check_source(name_or_path: str) -> None:
    """A missing local path is a one-line "no such folder", not a failed hub download; a
    local folder's config and safetensors files must be whole (`readers.check_model_folder`)."""
    from paratransfer.io.readers import check_model_folder
    from paratransfer.teacher.gguf import resolve_model

    name_or_path = resolve_model(name_or_path)  # a .gguf file: its converted folder
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{name_or_path}: is a file (expected a model folder or hub id)")
        check_model_folder(path)
    elif looks_like_path(str(name_or_path)):
        raise UserError(f"{name_or_path}: no such folder (expected a model folder or hub id)")


def _load_failed(name_or_path: str, what: str, e: Exception) -> UserError:
    if not Path(name_or_path).expanduser().exists():
        return UserError(f"{name_or_path}: no such folder, and no {what} by that hub id could "
                         f"be loaded ({_first_line(e)})")
    return UserError(f"{name_or_path}: cannot load a {what} ({_first_line(e)})")


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", device_map: str | dict | None = None):
    """A causal LM in evaluation mode (dropout off), with a one-line error when it can't load.

    `device_map` ("auto", "balanced", ... or a dict) spreads the layers over the available
    devices with accelerate instead of moving the model to `device`. Placements on "disk" are
    refused: accelerate's offloaded parameters silently get no gradient.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from paratransfer.teacher.gguf import resolve_model

    name_or_path = resolve_model(str(name_or_path))
    check_source(str(name_or_path))
    kwargs = {"device_map": device_map} if device_map is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise _load_failed(str(name_or_path), "causal LM", e) from e
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


def check_causal(model, name: str) -> None:
    """Refuse a model whose prediction at a position depends on later tokens (an encoder such
    as BERT loaded through its LM head): scores and generations of it would mean nothing.

    Two inputs that differ only in their last token must give the same logits at the first.
    """
    vocab = model.get_input_embeddings().weight.shape[0]
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([[1 % vocab, 2 % vocab, 3 % vocab], [1 % vocab, 2 % vocab, 4 % vocab]],
                       device=device)
    with torch.inference_mode():
        first = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, 0].float()
    scale = float(first.abs().max()) + 1.0
    eps = torch.finfo(next(model.parameters()).dtype).eps
    if float((first[0] - first[1]).abs().max()) > 64 * eps * scale:
        raise UserError(f"{name}: not a causal LM (its prediction at the first position changes "
                        f"with a later token; a {model.config.model_type} model reads both ways)")


def load_tokenizer(name_or_path: str):
    """The model's tokenizer, with a pad token (EOS when the tokenizer defines none)."""
    from transformers import AutoTokenizer

    from paratransfer.teacher.gguf import resolve_model

    name_or_path = resolve_model(str(name_or_path))
    folder = Path(name_or_path).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{name_or_path}: no tokenizer in this folder (expected one of "
                        f"{', '.join(TOKENIZER_FILES[:2])}, ...; save the tokenizer with the model)")
    if not folder.exists() and looks_like_path(str(name_or_path)):
        raise UserError(f"{name_or_path}: no such folder (expected a model folder or hub id)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _load_failed(str(name_or_path), "tokenizer", e) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
