"""Residual initialization from an extracted adapter, and conversion back to a plain LoRA.

Transfer init (docs/method.md §5): every LoRA module starts at the extracted factors (B0, A0) and
its base weight W becomes W - s·B0·A0 (s = alpha / r), so that at step 0 the student computes
exactly what it computed before. The base weights are changed in memory only.

After training to (B, A), the change to the *unmodified* student is
s·(B·A - B0·A0) = s·[B | -B0]·[A ; A0]: a LoRA of rank 2r with alpha 2·alpha (same scale).
PEFT's `save_pretrained(..., path_initial_model_for_weight_conversion=...)` writes exactly this
for Linear layers (lm_head included) but silently drops embedding adapters, so those are
concatenated here by hand (checked by the round-trip tests).

A tied student (GPT-2: lm_head shares the embedding matrix) is untied first (the head gets its
own copy), so subtracting s·B0·A0 from the embedding leaves the head as it was: the converted
adapter on the tied original changes the input embedding only, and so does the training here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from paratransfer.adapter.lora import ADAPTER_NAME
from paratransfer.arch.ties import TIED_HEAD_REASON, base_layer, is_tied, untie_head  # noqa: F401
from paratransfer.io.errors import UserError

#: Folder (and temporary PEFT adapter) name of the initial factors; must differ from ADAPTER_NAME.
INITIAL_NAME = "initial"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_EMBED_PARTS = ("lora_embedding_A", "lora_embedding_B")


@dataclass(frozen=True)
class AdapterFiles:
    """A PEFT LoRA adapter folder read into memory: its config and its tensors (file keys)."""

    folder: Path
    config: dict
    tensors: dict[str, torch.Tensor]

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        return float(self.config["lora_alpha"])

    @property
    def targets(self) -> list[str]:
        targets = self.config.get("target_modules") or []
        return [targets] if isinstance(targets, str) else list(targets)


def read_adapter(folder: str | Path) -> AdapterFiles:
    """Read `adapter_config.json` + `adapter_model.safetensors`; one-line errors when unusable
    (a damaged file, or a rank, alpha or dropout that is not a usable number)."""
    from paratransfer.io.readers import load_tensors, read_json

    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for p in (config_path, weights_path):
        if not p.is_file():
            raise UserError(f"{folder}: no {p.name} (expected a PEFT LoRA adapter folder, "
                            "e.g. from `paratransfer extract`)")
    config = read_json(config_path, "a PEFT adapter config")
    if (not isinstance(config, dict) or config.get("peft_type") != "LORA" or "r" not in config
            or "lora_alpha" not in config):
        raise UserError(f"{config_path}: not a LoRA adapter config (expected peft_type LORA with "
                        "r and lora_alpha)")
    for key in ("use_dora", "use_rslora"):
        if config.get(key):
            raise UserError(f"{config_path}: {key} is set; only plain LoRA adapters are supported")
    check_adapter_numbers(config, config_path)
    tensors = load_tensors(weights_path)
    if not tensors:
        raise UserError(f"{weights_path}: holds no tensors")
    bad = next((k for k, t in tensors.items() if not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise UserError(f"{weights_path}: tensor {bad} holds NaN or infinite values")
    return AdapterFiles(folder, config, tensors)


def check_adapter_numbers(config: dict, where: Path) -> None:
    """r a whole number of at least 1, lora_alpha finite and positive, lora_dropout in [0, 1)."""
    from paratransfer.io.checks import finite_number, whole_number

    try:
        whole_number("r", config["r"], 1)
        alpha = finite_number("lora_alpha", config["lora_alpha"])
        dropout = finite_number("lora_dropout", config.get("lora_dropout", 0.0) or 0.0)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    if alpha <= 0:
        raise UserError(f"{where}: lora_alpha must be positive (got {alpha})")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"{where}: lora_dropout must be in [0, 1) (got {dropout})")


def model_key(file_key: str, adapter_name: str = ADAPTER_NAME) -> str:
    """An adapter file key -> the PEFT model's parameter name (PEFT inserts the adapter name)."""
    for part in ("lora_A", "lora_B"):
        if f".{part}." in file_key:
            return file_key.replace(f".{part}.", f".{part}.{adapter_name}.", 1)
    for part in _EMBED_PARTS:
        if file_key.endswith("." + part):
            return f"{file_key}.{adapter_name}"
    raise UserError(f"adapter tensor {file_key!r} is not a LoRA factor (expected lora_A/lora_B or "
                    "lora_embedding_A/lora_embedding_B)")


def saved_base_weight(file_key: str) -> bool:
    """Whether an adapter tensor is a base layer's weight PEFT saved beside the factors
    (`save_embedding_layers`), not a LoRA factor."""
    return file_key.endswith(".base_layer.weight")


def module_of(param_name: str) -> str:
    """`base_model.model.<module>.lora_A.default.weight` -> `<module>`."""
    name = param_name.removeprefix("base_model.model.")
    for part in ("lora_A", "lora_B", *_EMBED_PARTS):
        if f".{part}." in name or name.endswith("." + part):
            return name.split(f".{part}", 1)[0]
    return name


def lora_parameters(peft_model, adapter_name: str = ADAPTER_NAME) -> dict[str, torch.nn.Parameter]:
    """The adapter's LoRA factors by parameter name, in model order."""
    suffixes = (f".{adapter_name}.weight", f".{adapter_name}")
    return {n: p for n, p in peft_model.named_parameters()
            if "lora_" in n and n.endswith(suffixes)}


def _expected_shapes(module: torch.nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(A, B) shapes PEFT gives a LoRA of rank r on this base module."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Embedding):
        return (rank, module.num_embeddings), (module.embedding_dim, rank)
    if isinstance(module, torch.nn.Linear):
        return (rank, module.in_features), (module.out_features, rank)
    if isinstance(module, Conv1D):  # weight stored [in, out]
        n_in, n_out = module.weight.shape
        return (rank, n_in), (n_out, rank)
    raise UserError(f"LoRA on {type(module).__name__} modules is not supported (expected Linear, "
                    "Conv1D or Embedding)")


def check_adapter_shapes(model: torch.nn.Module, adapter: AdapterFiles) -> None:
    """Check every adapter factor against the (plain) student, in model order.

    A one-line UserError names the first factor that has the wrong shape, or that names a
    module the student does not have.
    """
    if adapter.config.get("rank_pattern") or adapter.config.get("alpha_pattern"):
        raise UserError(f"{adapter.folder}: rank_pattern / alpha_pattern are not supported")
    module_names = {n: i for i, (n, _) in enumerate(model.named_modules())}
    located = []
    for key, t in adapter.tensors.items():
        if saved_base_weight(key):  # loaded by PEFT as it is (merge, evaluate)
            continue
        module = module_of(model_key(key))
        if module not in module_names:
            raise UserError(f"{adapter.folder}: adapter tensor {key} (shape {list(t.shape)}) names "
                            f"module {module!r}, which the student does not have (was the adapter "
                            "extracted for this student?)")
        located.append((module_names[module], key.rsplit("lora_", 1)[1], key, module, t))
    for _, part, key, module, t in sorted(located, key=lambda x: x[:2]):
        want_a, want_b = _expected_shapes(base_layer(model.get_submodule(module)), adapter.rank)
        want = want_a if part.startswith(("A", "embedding_A")) else want_b
        if tuple(t.shape) != want:
            raise UserError(f"{adapter.folder}: {key} has shape {list(t.shape)}, but the student's "
                            f"{module} needs {list(want)} at rank {adapter.rank} (was the adapter "
                            "extracted for this student?)")


def adapter_factors(peft_model, adapter: AdapterFiles,
                    adapter_name: str = ADAPTER_NAME) -> dict[str, torch.Tensor]:
    """Model parameter name -> the adapter's tensor, for every LoRA factor of the model.

    The shapes are checked first (`check_adapter_shapes`); a targeted module the adapter has
    no factors for is a one-line UserError.
    """
    check_adapter_shapes(peft_model.base_model.model, adapter)
    base = next((k for k in adapter.tensors if saved_base_weight(k)), None)
    if base is not None:
        raise UserError(f"{adapter.folder}: the adapter also holds base weights ({base}); "
                        "training starts from LoRA factors only (expected an adapter from "
                        "`paratransfer extract`)")
    by_model = {model_key(k, adapter_name): t for k, t in adapter.tensors.items()}
    out = {}
    for name, p in lora_parameters(peft_model, adapter_name).items():
        if name not in by_model:
            raise UserError(f"{adapter.folder}: the adapter has no factors for the student's "
                            f"{module_of(name)} (pass --modules to target fewer modules)")
        if tuple(by_model[name].shape) != tuple(p.shape):
            raise UserError(f"{adapter.folder}: {name} has shape {list(by_model[name].shape)}, "
                            f"but the LoRA layer has {list(p.shape)}")
        out[name] = by_model[name]
    return out


def lora_delta(layer, adapter_name: str = ADAPTER_NAME) -> torch.Tensor:
    """s·B·A of one PEFT LoRA layer in fp32, laid out like its base weight.

    Linear: `[out, in]` (`[in, out]` for Conv1D / fan_in_fan_out); Embedding: `[vocab, d]`.
    """
    from peft.tuners.lora import layer as lora_layer

    s = float(layer.scaling[adapter_name])
    if isinstance(layer, lora_layer.Embedding):
        a, b = layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]
        return (b.detach().float() @ a.detach().float()).T * s
    if isinstance(layer, lora_layer.Linear):
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        delta = b.detach().float() @ a.detach().float()
        return (delta.T if layer.fan_in_fan_out else delta) * s
    raise UserError(f"LoRA layer type {type(layer).__name__} is not supported by the transfer "
                    "init (expected Linear, Conv1D or Embedding)")


def lora_layers(peft_model, adapter_name: str = ADAPTER_NAME) -> dict[str, torch.nn.Module]:
    """Module name -> PEFT LoRA layer holding `adapter_name`, in model order."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.base_model.model
    return {n: m for n, m in base.named_modules()
            if isinstance(m, LoraLayer) and adapter_name in m.scaling}


def inject_transfer_init(peft_model, adapter: AdapterFiles,
                         adapter_name: str = ADAPTER_NAME) -> dict:
    """Set the LoRA factors to the adapter's and replace each base weight W by W - s·B·A.

    Returns what was done, for train.json.
    """
    return set_residual_factors(peft_model, adapter_factors(peft_model, adapter, adapter_name),
                                adapter_name)


def set_residual_factors(peft_model, factors: dict[str, torch.Tensor],
                         adapter_name: str = ADAPTER_NAME) -> dict:
    """Set these LoRA factors (model parameter name -> tensor) and make the base weight of every
    layer they belong to residual, W - s·B·A, so the model computes what it computed before.

    The residual is computed in fp32 from the factors as the model holds them (after any
    dtype cast), so that base + LoRA reproduces W up to the rounding of W's own dtype. A tied
    head is untied first when the embedding (or head) is among the layers.
    """
    params = lora_parameters(peft_model, adapter_name)
    layers = {n: m for n, m in lora_layers(peft_model, adapter_name).items()
              if any(module_of(p) == n for p in factors)}
    untied = (untie_head(peft_model.base_model.model)
              if _touches_tied(peft_model, adapter_name, layers.values()) else False)
    with torch.no_grad():
        for name, t in factors.items():
            params[name].copy_(t.to(dtype=params[name].dtype, device=params[name].device))
        for layer in layers.values():
            weight = base_layer(layer).weight
            residual = weight.float() - lora_delta(layer, adapter_name).to(weight.device)
            weight.copy_(residual.to(weight.dtype))
    return {"modules": len(layers), "untied_head": untied,
            "scale": float(next(iter(layers.values())).scaling[adapter_name]) if layers else None}


def _touches_tied(peft_model, adapter_name: str, layers=None) -> bool:
    """Whether a LoRA module (of `layers`, default all) wraps the tied embedding or head,
    whose base weight is shared."""
    model = peft_model.base_model.model
    if not is_tied(model):
        return False
    targets = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    layers = lora_layers(peft_model, adapter_name).values() if layers is None else layers
    return any(id(m) in targets for m in layers)


def save_plain_lora(peft_model, out_dir: str | Path, initial_dir: str | Path | None,
                    adapter_name: str = ADAPTER_NAME) -> None:
    """Write the adapter as a plain LoRA for the unmodified student.

    `initial_dir` is the adapter saved right after the transfer init (None for a standard
    run, whose base weights are untouched: the adapter is saved as it is). Base weights are
    never saved (`save_embedding_layers=False`): the model's are the modified ones.
    """
    out_dir = Path(out_dir)
    if initial_dir is None:
        peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)
        return
    initial_dir = Path(initial_dir)
    if initial_dir.name == adapter_name:
        raise ValueError(f"initial adapter folder must not be named {adapter_name!r}")
    with warnings.catch_warnings():
        # PEFT reads the initial adapter with save_embedding_layers="auto" and says so; only
        # its LoRA factors are used, nothing of the base is written.
        warnings.filterwarnings("ignore", message="Setting `save_embedding_layers`")
        # The conversion loads the initial factors as a second adapter, which PEFT warns about
        # for a PiSSA init; converting to a plain LoRA is exactly what it recommends.
        warnings.filterwarnings("ignore", message="PiSSA changes the base weights")
        warnings.filterwarnings("ignore", message="CorDA changes the base weights")
        # ... and keeps a CorDA init's sub-config beside `init_lora_weights=True` (harmless).
        warnings.filterwarnings("ignore", message="`corda_config` specified but will be ignored")
        peft_model.save_pretrained(str(out_dir), save_embedding_layers=False,
                                   path_initial_model_for_weight_conversion=str(initial_dir))
    _add_embedding_differences(peft_model, out_dir, initial_dir, adapter_name)


def _add_embedding_differences(peft_model, out_dir: Path, initial_dir: Path,
                               adapter_name: str) -> None:
    """The embedding part PEFT's conversion drops: A' = [A; A0], B' = [B | -B0] (r, alpha doubled)."""
    from peft.utils import get_peft_model_state_dict

    trained = get_peft_model_state_dict(peft_model, adapter_name=adapter_name,
                                        save_embedding_layers=False)
    embed_keys = [k for k in trained if k.endswith(_EMBED_PARTS)]
    if not embed_keys:
        return
    initial = load_file(str(initial_dir / ADAPTER_WEIGHTS))
    path = out_dir / ADAPTER_WEIGHTS
    written = load_file(str(path))
    for key in embed_keys:
        now = trained[key].detach().cpu()
        start = initial[key].to(now.dtype)
        if key.endswith("lora_embedding_A"):
            written[key] = torch.cat([now, start], dim=0).contiguous()
        else:
            written[key] = torch.cat([now, -start], dim=1).contiguous()
    save_file(written, str(path), metadata={"format": "pt"})
