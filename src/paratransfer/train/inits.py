"""Initializations of the LoRA factors: the one thing an arm's training changes.

Each is a named entry: how PEFT builds the LoRA layers (`peft_init`), whether it reads the
extracted adapter, whether it makes the base weights residual (so the student computes what it
computed before, and the export becomes a rank-2r plain LoRA on the unmodified student), and the
function that sets the factors. The loop never looks at the name.

- `standard`  PEFT's default (A random, B zero): the baseline.
- `transfer`  the extracted teacher factors, base made residual (docs/method.md §5).
- `pissa`     the student's own top-r singular triplets on the same modules, rank and alpha,
              base made residual (PiSSA). PEFT does the Linear/Conv1D layers
              (`init_lora_weights="pissa"`); PEFT's embedding layer has no PiSSA, so the
              embedding's factors come from the project's own SVD path, split as PEFT splits them.
- `spectrum`  per module, the transferred factors' singular values on random orthonormal
              directions (seeded): the same norm and spectrum as `transfer`, none of the teacher's
              directions. Separates "a large, well-shaped start" from "the teacher's directions".
- `eva`, `corda`  teacher-free starts from the student's own activations on the training data
              (EVA: base unchanged; CorDA: base made residual), through PEFT; see data_inits.py.
              They read the training data (`needs_data`); CorDA's PEFT part runs before the LoRA
              wrap (`prepare`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

# The registry's names and help are read by `paratransfer --help`, which must not wait for
# torch or PEFT: the functions below import them when a run calls them.
if TYPE_CHECKING:
    import torch

    from paratransfer.adapter.inject import AdapterFiles

#: (peft model, the adapter or None, seed[, data=InitData]) -> what was done, for train.json
#: (None: nothing); `data` is passed to the inits that declare `needs_data`.
InitFn = Callable[..., dict | None]
#: (plain student, LoraConfig, InitData) -> None: work before the LoRA wrap.
PrepareFn = Callable[[object, object, object], None]


@dataclass(frozen=True)
class Init:
    """One way to start the LoRA factors."""

    name: str
    help: str
    peft_init: bool | str  # LoraConfig.init_lora_weights
    needs_adapter: bool  # reads an extracted adapter (`--adapter`)
    residual: bool  # base weights made residual; the export is a rank-2r LoRA on the original
    apply: InitFn | None = None
    needs_data: bool = False  # reads the training data (`init_batches` batches of it)
    prepare: PrepareFn | None = None  # before the LoRA wrap (on the plain student)
    lora_kwargs: Callable[[], dict] | None = None  # more LoraConfig arguments (PEFT sub-configs)


def _transfer(peft_model, adapter: AdapterFiles | None, seed: int) -> dict:
    from paratransfer.adapter.inject import inject_transfer_init

    return inject_transfer_init(peft_model, adapter)


def _pissa(peft_model, adapter: AdapterFiles | None, seed: int) -> dict:
    """PEFT made the Linear layers PiSSA; the embedding layers get the same here."""
    import torch
    from peft.tuners.lora import layer as lora_layer

    from paratransfer.adapter.inject import (
        lora_layers,
        lora_parameters,
        module_of,
        set_residual_factors,
    )
    from paratransfer.adapter.lora import ADAPTER_NAME
    from paratransfer.arch.ties import base_layer

    params = lora_parameters(peft_model)
    factors: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(peft_model).items():
        if not isinstance(layer, lora_layer.Embedding):
            continue
        weight = base_layer(layer).weight.detach().float().T  # [d, vocab], as B @ A is laid out
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        r, scale = layer.r[ADAPTER_NAME], float(layer.scaling[ADAPTER_NAME])
        root = torch.sqrt(s[:r] / scale)  # PEFT's PiSSA split: s·B·A = U_r S_r V_rᵀ
        by_part = {"lora_embedding_B": u[:, :r] * root, "lora_embedding_A": root[:, None] * vh[:r]}
        for param in params:
            if module_of(param) == name:
                factors[param] = by_part[param.rsplit(".", 2)[-2]]
    report = set_residual_factors(peft_model, factors) if factors else {}
    return {"modules": len(lora_layers(peft_model)), "embedding_layers_by_own_svd": len(factors) // 2,
            "untied_head": report.get("untied_head", False)}


def _orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A random [rows, cols] matrix with orthonormal columns (QR of a Gaussian, signs fixed)."""
    import torch

    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)


def _seed_for(seed: int, module: str) -> int:
    digest = hashlib.sha256(f"spectrum,{seed},{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def spectrum_factors(b0: torch.Tensor, a0: torch.Tensor, seed: int,
                     module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with the singular values of B0·A0 on random orthonormal directions:
    B = U·diag(σ), A = Vᵀ, as the transferred factors are laid out (B0 = U0·Σ, A0 = V0ᵀ)."""
    import torch

    qb, rb = torch.linalg.qr(b0.double())
    qa, ra = torch.linalg.qr(a0.double().T)
    sigma = torch.linalg.svdvals(rb @ ra.T)  # of B0·A0 = qb (rb raᵀ) qaᵀ, without forming it
    g = torch.Generator().manual_seed(_seed_for(seed, module))
    u = _orthonormal(b0.shape[0], b0.shape[1], g)
    v = _orthonormal(a0.shape[1], a0.shape[0], g)
    return (u * sigma).to(b0.dtype), v.T.contiguous().to(a0.dtype)


def _spectrum(peft_model, adapter: AdapterFiles | None, seed: int) -> dict:
    from paratransfer.adapter.inject import adapter_factors, module_of, set_residual_factors

    transferred = adapter_factors(peft_model, adapter)
    by_module: dict[str, dict[str, str]] = {}
    for param in transferred:
        part = "B" if ("lora_B" in param or "lora_embedding_B" in param) else "A"
        by_module.setdefault(module_of(param), {})[part] = param
    factors = {}
    for module, names in by_module.items():
        b, a = spectrum_factors(transferred[names["B"]], transferred[names["A"]], seed, module)
        factors[names["B"]], factors[names["A"]] = b, a
    return {**set_residual_factors(peft_model, factors), "directions_seed": seed}


def _eva(peft_model, adapter: AdapterFiles | None, seed: int, data=None) -> dict:
    from paratransfer.train.data_inits import apply_eva

    return apply_eva(peft_model, data)


def _corda(peft_model, adapter: AdapterFiles | None, seed: int, data=None) -> dict:
    from paratransfer.train.data_inits import apply_corda

    return apply_corda(peft_model, data)


def _prepare_corda(student, config, data) -> None:
    from paratransfer.train.data_inits import prepare_corda

    prepare_corda(student, config, data)


def _eva_config() -> dict:
    from peft import EvaConfig

    return {"eva_config": EvaConfig(rho=1.0)}  # no rank redistribution: every layer keeps r


def _corda_config() -> dict:
    from peft.tuners.lora.config import CordaConfig

    return {"corda_config": CordaConfig(corda_method="ipm")}


INITS: dict[str, Init] = {i.name: i for i in (
    Init("transfer", "start from --adapter's factors, base made residual (the method)",
         peft_init=True, needs_adapter=True, residual=True, apply=_transfer),
    Init("standard", "PEFT's default init, A random and B zero (the baseline)",
         peft_init=True, needs_adapter=False, residual=False),
    Init("pissa", "the student's own principal components (PiSSA), base made residual",
         peft_init="pissa", needs_adapter=False, residual=True, apply=_pissa),
    Init("spectrum", "--adapter's singular values on random orthonormal directions, base made "
         "residual (control: the transfer's spectrum without the teacher's directions)",
         peft_init=True, needs_adapter=True, residual=True, apply=_spectrum),
    Init("eva", "the principal directions of the student's own layer inputs on the training "
         "data (EVA, teacher-free), base unchanged",
         peft_init="eva", needs_adapter=False, residual=False, apply=_eva, needs_data=True,
         lora_kwargs=_eva_config),
    Init("corda", "the student's weights oriented by its own input covariance on the training "
         "data (CorDA, teacher-free), base made residual",
         peft_init="corda", needs_adapter=False, residual=True, apply=_corda, needs_data=True,
         prepare=_prepare_corda, lora_kwargs=_corda_config),
)}
