"""Adding translated vectors to the student's located neurons: as weight deltas (differentiable,
for training the translator), in place (the injected student), or as an exact LoRA adapter.

A row role (up, v) gets ΔW[rows, :] += T; a column role (down, o) gets ΔW[:, cols] += Tᵀ. In a
fused module (GPT-2 `c_attn`, Phi-3 `qkv_proj`) the role's rows are found through the family's
own split, so any layout works. As a LoRA of scale 1 the same delta is B·A with a one-hot
selection on one side: rows → B = one-hot [out, k], A = T; columns → B = Tᵀ, A = one-hotᵀ
[k, in]; ranks are padded with zero columns/rows to one common rank r, which changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from paratransfer.arch.spec import ArchSpec, ModuleSpec
from paratransfer.extract import ModuleFactors
from paratransfer.laten.locate import KIND, Located
from paratransfer.laten.settings import ROW_ROLES


def fused_rows(spec: ArchSpec, module: ModuleSpec, config, out_rows: int, role: str) -> torch.Tensor:
    """For each row of the role's own matrix, its row in the (maybe fused) module."""
    index = torch.arange(out_rows).unsqueeze(1)
    return spec.split(module, config, index)[role][:, 0].clone()


def _places(student: torch.nn.Module, spec: ArchSpec, located: Located, role: str):
    """(parameter name, module spec, layer, indices in the module's `[out, in]` matrix) per layer."""
    module = spec.module_for(role)
    for layer, idx in zip(located.layers[KIND[role]], located.neurons[role], strict=True):
        name = module.param_name(spec.layers, layer)
        index = torch.tensor(idx)
        if role in ROW_ROLES and module.fused:
            rows = module.to_linear(student.get_parameter(name)).shape[0]
            index = fused_rows(spec, module, student.config, rows, role)[index]
        yield name, module, index


def weight_deltas(student: torch.nn.Module, spec: ArchSpec, located: Located,
                  translated: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter name -> ΔW in `[out, in]` orientation (float32, differentiable in `translated`)."""
    deltas: dict[str, torch.Tensor] = {}
    for role, vectors in translated.items():
        for i, (name, module, index) in enumerate(_places(student, spec, located, role)):
            weight = student.get_parameter(name)
            shape = tuple(module.to_linear(weight).shape)
            delta = deltas.get(name)
            if delta is None:
                delta = torch.zeros(shape, dtype=torch.float32, device=weight.device)
            index = index.to(weight.device)
            t = vectors[i].to(weight.device)
            delta = delta.index_add(0, index, t) if role in ROW_ROLES \
                else delta.index_add(1, index, t.t())
            deltas[name] = delta
    return deltas


def injected_parameters(student: torch.nn.Module, spec: ArchSpec,
                        deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter name -> W + ΔW in the stored orientation and dtype (for `functional_call`)."""
    out = {}
    for name, delta in deltas.items():
        weight = student.get_parameter(name)
        module = _spec_of(spec, name)
        out[name] = weight + module.from_linear(delta).to(weight.dtype)
    return out


def apply_deltas(student: torch.nn.Module, spec: ArchSpec, deltas: Mapping[str, torch.Tensor]) -> None:
    """W += ΔW in place: the injected student."""
    with torch.no_grad():
        for name, value in injected_parameters(student, spec, deltas).items():
            student.get_parameter(name).copy_(value)


def _spec_of(spec: ArchSpec, param_name: str) -> ModuleSpec:
    path = param_name.split(".", len(spec.layers.split(".")) + 1)[-1].removesuffix(".weight")
    return next(m for m in spec.layer_modules if m.path == path)


def lora_factors(student: torch.nn.Module, spec: ArchSpec, located: Located,
                 translated: Mapping[str, torch.Tensor]) -> tuple[list[ModuleFactors], int]:
    """The exact LoRA (B·A = ΔW, scale 1) of the injection, every module at one rank r."""
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    specs: dict[str, ModuleSpec] = {}
    with torch.no_grad():
        for role, vectors in translated.items():
            for i, (name, module, index) in enumerate(_places(student, spec, located, role)):
                out_rows, in_cols = module.to_linear(student.get_parameter(name)).shape
                t = vectors[i].detach().float().cpu()
                select = torch.zeros(len(index), out_rows if role in ROW_ROLES else in_cols)
                select[torch.arange(len(index)), index] = 1.0
                pair = (select.t(), t) if role in ROW_ROLES else (t.t(), select)
                parts.setdefault(name, []).append(pair)
                specs[name] = module
    rank = max(sum(b.shape[1] for b, _ in pairs) for pairs in parts.values())
    factors = []
    for name, pairs in parts.items():
        b = torch.cat([p[0] for p in pairs], dim=1)
        a = torch.cat([p[1] for p in pairs], dim=0)
        pad = rank - b.shape[1]
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])], dim=0)
        factors.append(ModuleFactors(specs[name], name.removesuffix(".weight"), b, a, 1.0))
    return factors, rank
