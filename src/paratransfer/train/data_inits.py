"""Teacher-free initializations from the student's own task data: EVA and CorDA, through PEFT's
own implementations, with the training data as their data.

The strongest alternative explanation of a transfer gain is a good start that needs no teacher.
These two start from the student's activations on the training examples:

- `eva`   (Explained Variance Adaptation) A = the top-r principal directions of each layer's
          inputs at the answer tokens, B = 0; the base is unchanged (PEFT's
          `initialize_lora_eva_weights`, `EvaConfig(rho=1)`: every layer keeps rank r, the budget
          of the other arms).
- `corda` (Context-oriented Decomposition Adaptation, instruction-previewed mode) the top-r
          singular triplets of W·C, C the covariance of the layer's inputs over the examples,
          mapped back through C⁻¹; base made residual (PEFT's `preprocess_corda` before the
          LoRA wrap, `init_lora_weights="corda"`).

Their data: the first `init_batches` effective batches of training, in training order, tokenized
as training tokenizes them (CorDA's covariance hooks take one example per forward, so it reads
the same examples one at a time). train.json records which batches and how many tokens.

PEFT does both for Linear (and GPT-2's Conv1D, fused c_attn included) layers only; its embedding
layer has neither. As PiSSA's embedding does (inits.py), the embedding gets the same quantity
from the project's own path, laid out as PEFT lays out its embedding factors: the embedding's
input is a token's one-hot vector, so EVA's principal directions are the eigenvectors of the
centred one-hot covariance diag(p) − ppᵀ (p: token frequencies at the answer tokens), and
CorDA's covariance is the diagonal of token counts per example.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from paratransfer.adapter.inject import (
    ADAPTER_NAME,
    lora_layers,
    lora_parameters,
    module_of,
    set_residual_factors,
)
from paratransfer.arch.ties import base_layer
from paratransfer.io.errors import UserError
from paratransfer.train.batches import Example, batch_digest, batch_indices, collate, micro_batches

#: Why the embedding's factors come from the project's path (train.json and the console).
EMBEDDING_REASON = ("PEFT's {name} covers Linear and Conv1D layers only; its embedding layer "
                    "gets the same quantity from the project's own path (docs/method.md)")


@dataclass(frozen=True)
class InitData:
    """The training data as a data-driven init reads it: padded micro-batches (input_ids,
    attention_mask, labels) and the same examples one by one."""

    batches: list[dict[str, torch.Tensor]]
    examples: list[torch.Tensor]  # input_ids of each example, unpadded
    record: dict  # what was read, for train.json


def init_data(examples: list[Example], batch_size: int, micro_batch_size: int, seed: int,
              steps: int, pad_id: int, device: torch.device) -> InitData:
    """The first `steps` effective batches of training (same order, same tokens)."""
    from paratransfer.tasks.examples import IGNORE_INDEX

    picked: list[list[int]] = [batch_indices(len(examples), batch_size, seed, step)
                               for step in range(steps)]
    batches, singles = [], []
    for indices in picked:
        for mb in micro_batches(indices, micro_batch_size):
            batches.append({k: v.to(device) for k, v in collate(examples, mb, pad_id).items()})
        singles += [examples[i].input_ids.to(device) for i in indices]
    answer = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    record = {"batches": steps, "examples": len(singles), "micro_batches": len(batches),
              "tokens": sum(len(x) for x in singles), "answer_tokens": answer,
              "batch_digests": [batch_digest(i) for i in picked]}
    return InitData(batches, singles, record)


def _forward(model, inputs: dict[str, torch.Tensor]):
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


def _embedding_layers(peft_model) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import layer as lora_layer

    return {n: m for n, m in lora_layers(peft_model).items() if isinstance(m, lora_layer.Embedding)}


def _params_of(peft_model, module: str) -> dict[str, str]:
    """'A'/'B' -> the parameter name of a LoRA embedding module's factors."""
    out = {}
    for name in lora_parameters(peft_model):
        if module_of(name) == module:
            out["B" if "lora_embedding_B" in name else "A"] = name
    return out


def _report(peft_model, init: str, name: str, data: InitData, own: list[str]) -> dict:
    layers = lora_layers(peft_model)
    report = {"modules": len(layers), "by_peft": [n for n in layers if n not in own],
              "by_own_path": own, "data": data.record}
    if own:
        from paratransfer.io.console import notice

        report["own_path_reason"] = EMBEDDING_REASON.format(name=name)
        notice(f"--init {init}: {', '.join(own)} by the project's own path ("
               f"{EMBEDDING_REASON.format(name=name)}); the other {len(layers) - len(own)} "
               "modules by PEFT (train.json: injection)")
    return report


# --------------------------------------------------------------------------- EVA


def eva_embedding_components(token_ids: torch.Tensor, vocab: int, rank: int) -> torch.Tensor:
    """A [rank, vocab]: the top principal directions of the tokens' one-hot vectors (centred,
    as PEFT's incremental PCA centres), each row of unit norm, its largest entry positive.

    Their covariance is diag(p) − ppᵀ on the tokens that occur (p: frequencies); rows beyond
    the number of directions the data has (fewer distinct tokens than the rank) stay zero.
    """
    counts = torch.bincount(token_ids.flatten().cpu(), minlength=vocab).double()
    support = torch.nonzero(counts).flatten()
    p = counts[support] / counts.sum()
    values, vectors = torch.linalg.eigh(torch.diag(p) - torch.outer(p, p))
    take = min(rank, int((values > 1e-12 * values.max().clamp(min=1e-300)).sum()))
    out = torch.zeros(rank, vocab, dtype=torch.float64)
    top = vectors[:, values.argsort(descending=True)[:take]].T  # [take, k]
    signs = torch.sign(top.gather(1, top.abs().argmax(dim=1, keepdim=True)))
    out[:take, support] = top * signs
    return out


def apply_eva(peft_model, data: InitData) -> dict:
    """PEFT's EVA on the Linear/Conv1D layers, the embedding's by `eva_embedding_components`."""
    from peft import initialize_lora_eva_weights

    from paratransfer.tasks.examples import IGNORE_INDEX

    passes = [0]

    def forward(model, inputs):
        passes[0] += 1
        return _forward(model, inputs)

    embeddings = _embedding_layers(peft_model)
    rank = peft_model.peft_config[ADAPTER_NAME].r
    most = max(int((b["labels"] != IGNORE_INDEX).sum()) for b in data.batches)
    if most < rank:  # PEFT skips such batches, and with none left would loop for ever
        raise UserError(f"--init eva: no micro-batch of the first {data.record['batches']} "
                        f"training batches has {rank} answer tokens (the most is {most}); EVA "
                        "needs at least the rank: raise --micro-batch-size or --init-batches")
    with warnings.catch_warnings():
        # PEFT says it left the embedding at its default init: that is done below.
        warnings.filterwarnings("ignore", message="the following layers were initialized with")
        with contextlib.redirect_stdout(None):  # its "skipping SVD" lines for small batches
            initialize_lora_eva_weights(peft_model, dataloader=data.batches, forward_fn=forward,
                                        gather_distributed_inputs=False, show_progress_bar=False)
    answer_ids = torch.cat([b["input_ids"][b["labels"] != IGNORE_INDEX] for b in data.batches])
    with torch.no_grad():
        for name, layer in embeddings.items():
            parts = _params_of(peft_model, name)
            params = lora_parameters(peft_model)
            a = eva_embedding_components(answer_ids, base_layer(layer).num_embeddings,
                                         layer.r[ADAPTER_NAME])
            params[parts["A"]].copy_(a.to(params[parts["A"]].dtype))
            params[parts["B"]].zero_()
    check_ranks(peft_model, "eva")
    return {**_report(peft_model, "eva", "EVA", data, list(embeddings)), "forward_passes": passes[0]}


def check_ranks(peft_model, name: str) -> None:
    """Every LoRA layer kept the rank the arm was given (the same budget as the other arms)."""
    config = peft_model.peft_config[ADAPTER_NAME]
    if config.rank_pattern or config.alpha_pattern:
        raise UserError(f"--init {name}: PEFT changed the rank of some layers "
                        f"({sorted(config.rank_pattern)[:3]}); every arm trains rank {config.r}")


# --------------------------------------------------------------------------- CorDA


def prepare_corda(student, config, data: InitData) -> None:
    """PEFT's CorDA preprocessing on the plain student: the covariance of each target layer's
    inputs over the examples (one per forward, as its hooks expect), then the decomposition
    that `init_lora_weights="corda"` reads when the LoRA layers are built."""
    try:
        from peft.tuners.lora.corda import preprocess_corda
    except ImportError as e:  # its `attrs` import, which PEFT does not declare
        raise UserError(f"--init corda: PEFT's CorDA cannot be imported ({e}); install the "
                        "`attrs` package") from None

    def run_model() -> None:
        for ids in data.examples:
            student(input_ids=ids[None])

    was_training = student.training
    preprocess_corda(student, config, run_model=run_model)
    student.train(was_training)


def corda_embedding_factors(weight: torch.Tensor, token_ids: list[torch.Tensor], rank: int,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [d, r], A [r, vocab]) of CorDA's instruction-previewed mode for an embedding
    `weight` [vocab, d], as PEFT computes them for a Linear layer of weight Eᵀ [d, vocab].

    A one-hot input's covariance is diagonal: C = token counts / examples (each example's
    inputs divided by their maximum, 1). Damped as PEFT damps (C + 0.01·mean(diag C)·I, exact
    for a diagonal); W·C = U S Vᵀ; V' = C⁻¹V; s·B·A = U_r S_r V'_rᵀ, split √(S/s) on each side.
    """
    vocab = weight.shape[0]
    counts = torch.zeros(vocab, dtype=torch.float64)
    for ids in token_ids:
        counts += torch.bincount(ids.flatten().cpu(), minlength=vocab).double()
    c = counts / len(token_ids)
    c = c + c.mean() * 0.01
    u, s, vh = torch.linalg.svd(weight.detach().double().cpu().T * c, full_matrices=False)
    v = (vh / c).T
    root = torch.sqrt(s[:rank] / scale)
    return u[:, :rank] * root, root[:, None] * v[:, :rank].T


def apply_corda(peft_model, data: InitData) -> dict:
    """PEFT did the Linear/Conv1D layers while wrapping; the embedding's by the same
    decomposition here, base made residual."""
    embeddings = _embedding_layers(peft_model)
    factors: dict[str, torch.Tensor] = {}
    for name, layer in embeddings.items():
        parts = _params_of(peft_model, name)
        b, a = corda_embedding_factors(base_layer(layer).weight.detach(), data.examples,
                                       layer.r[ADAPTER_NAME], float(layer.scaling[ADAPTER_NAME]))
        factors[parts["B"]], factors[parts["A"]] = b, a
    report = set_residual_factors(peft_model, factors) if factors else {}
    return {**_report(peft_model, "corda", "CorDA", data, list(embeddings)),
            "untied_head": report.get("untied_head", False), "method": "ipm"}
