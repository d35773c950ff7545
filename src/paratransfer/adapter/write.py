"""PEFT adapter folders: written from extracted factors, loadable by `PeftModel.from_pretrained`.

The adapter is built through PEFT itself (`get_peft_model` on the student, factors set, then
`save_pretrained`), so key names and config are exactly what PEFT expects to load.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from paratransfer.adapter.factors import ModuleFactors
from paratransfer.adapter.lora import ADAPTER_NAME, lora_config


def set_lora_factors(peft_model, factors: Sequence[ModuleFactors], dtype: torch.dtype,
                     adapter: str = ADAPTER_NAME) -> None:
    """Copy each module's (B, A) into the PEFT LoRA layer, in the given dtype."""
    base = peft_model.base_model.model
    for f in factors:
        layer = base.get_submodule(f.module_name)
        if f.spec.embedding:
            # PEFT's embedding layout: lora_embedding_A [r, vocab], lora_embedding_B [d, r].
            a, b = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
        else:
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        if tuple(a.shape) != tuple(f.A.shape) or tuple(b.shape) != tuple(f.B.shape):
            raise ValueError(f"{f.module_name}: factor shapes A{list(f.A.shape)} B{list(f.B.shape)}"
                             f" do not fit LoRA A{list(a.shape)} B{list(b.shape)}")
        with torch.no_grad():
            a.data = f.A.detach().to(device=a.device, dtype=dtype).contiguous()
            b.data = f.B.detach().to(device=b.device, dtype=dtype).contiguous()


def write_adapter(student: torch.nn.Module, factors: Sequence[ModuleFactors], folder: str | Path,
                  rank: int, alpha: float, dropout: float, student_id: str) -> None:
    """Wrap the student with LoRA, set the factors, save the adapter (the student is modified)."""
    from peft import get_peft_model

    dtype = next(student.parameters()).dtype
    config = lora_config(student, [f.spec for f in factors], rank, alpha, dropout,
                         base_model_name_or_path=student_id)
    peft_model = get_peft_model(student, config)
    set_lora_factors(peft_model, factors, dtype)
    peft_model.save_pretrained(str(folder), save_embedding_layers=False)
    canonical_adapter_config(folder)


def canonical_adapter_config(folder: str | Path) -> None:
    """Sort `target_modules` in the adapter_config.json PEFT wrote (from a Python set, in an
    order that changes from one process to the next), so identical runs write identical bytes."""
    import json

    path = Path(folder) / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("target_modules", "exclude_modules", "modules_to_save"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    # A data-driven init's sub-config, left beside `init_lora_weights: true` once the adapter
    # is converted to a plain LoRA (PEFT warns about it at every load): it no longer applies.
    for init in ("eva", "corda"):
        if config.get(f"{init}_config") is not None and config.get("init_lora_weights") != init:
            config[f"{init}_config"] = None
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
