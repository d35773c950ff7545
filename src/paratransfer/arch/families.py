"""The supported families, as data. Adding a family is one `register(ArchSpec(...))`.

Fused matrices keep their layout next to it: how the rows split into roles and how role parts
fuse back (each `split` is undone by its `fuse`; tests/test_arch.py checks both ways).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from paratransfer.arch.registry import register
from paratransfer.arch.spec import ArchSpec, FusedLayout, ModuleSpec, config_heads

#: Llama and its close relatives share one layout (Qwen2 adds q/k/v biases, which LoRA leaves
#: alone; grouped-query attention only makes k/v narrower, which sizes from weights handle).
LLAMA = register(
    ArchSpec(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        layers="model.layers",
        final_norm="model.norm",
        embed=ModuleSpec("model.embed_tokens", ("embed",), embedding=True, in_layer=False),
        head=ModuleSpec("lm_head", ("head",), in_layer=False),
        layer_modules=(
            ModuleSpec("self_attn.q_proj", ("q",)),
            ModuleSpec("self_attn.k_proj", ("k",)),
            ModuleSpec("self_attn.v_proj", ("v",)),
            ModuleSpec("self_attn.o_proj", ("o",)),
            ModuleSpec("mlp.gate_proj", ("gate",)),
            ModuleSpec("mlp.up_proj", ("up",)),
            ModuleSpec("mlp.down_proj", ("down",)),
        ),
    )
)

#: GPT-2: Conv1D weights stored [in, out]; `c_attn` fuses q | k | v along its output (stacked,
#: equal thirds); the MLP has no gate.
GPT2 = register(
    ArchSpec(
        family="gpt2",
        model_types=("gpt2",),
        layers="transformer.h",
        final_norm="transformer.ln_f",
        embed=ModuleSpec("transformer.wte", ("embed",), embedding=True, in_layer=False),
        head=ModuleSpec("lm_head", ("head",), in_layer=False),
        layer_modules=(
            ModuleSpec("attn.c_attn", ("q", "k", "v"), conv1d=True),
            ModuleSpec("attn.c_proj", ("o",), conv1d=True),
            ModuleSpec("mlp.c_fc", ("up",), conv1d=True),
            ModuleSpec("mlp.c_proj", ("down",), conv1d=True),
        ),
    )
)


# --- GPT-NeoX: `query_key_value` rows are interleaved per head: [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]


def split_per_head(config: object, matrix: torch.Tensor, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    """Per-head interleaved rows -> q, k, v, each in head order (the layout q_proj would have)."""
    heads = config_heads(config).heads
    rows, cols = matrix.shape
    if rows % heads or any(s % heads for s in sizes):
        raise ValueError(f"{rows} fused rows (parts {list(sizes)}) do not split into {heads} heads")
    per_head = matrix.reshape(heads, rows // heads, cols)
    return [p.reshape(s, cols) for p, s in
            zip(per_head.split([s // heads for s in sizes], dim=1), sizes, strict=True)]


def fuse_per_head(config: object, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of `split_per_head`: q, k, v in head order -> per-head interleaved rows."""
    heads = config_heads(config).heads
    cols = parts[0].shape[1]
    per_head = [p.reshape(heads, p.shape[0] // heads, cols) for p in parts]
    return torch.cat(per_head, dim=1).reshape(-1, cols)


GPT_NEOX = register(
    ArchSpec(
        family="gpt_neox",
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        embed=ModuleSpec("gpt_neox.embed_in", ("embed",), embedding=True, in_layer=False),
        head=ModuleSpec("lm_head", ("head",), in_layer=False),
        layer_modules=(
            ModuleSpec("attention.query_key_value", ("q", "k", "v")),
            ModuleSpec("attention.dense", ("o",)),
            ModuleSpec("mlp.dense_h_to_4h", ("up",)),
            ModuleSpec("mlp.dense_4h_to_h", ("down",)),
        ),
        fused={"attention.query_key_value": FusedLayout(split=split_per_head, fuse=fuse_per_head,
                                                        contiguous=False)},
    )
)


# --- Phi-3: `qkv_proj` rows are [q | k | v] with k, v sized by the key/value heads;
# `gate_up_proj` rows are [gate | up] (the model's `chunk(2)`).


def phi3_qkv_sizes(config: object, shape: tuple[int, int]) -> tuple[int, int, int]:
    """q: heads x head_dim rows, k and v: kv_heads x head_dim rows each."""
    h = config_heads(config)
    return h.heads * h.head_dim, h.kv_heads * h.head_dim, h.kv_heads * h.head_dim


PHI3 = register(
    ArchSpec(
        family="phi3",
        model_types=("phi3",),
        layers="model.layers",
        final_norm="model.norm",
        embed=ModuleSpec("model.embed_tokens", ("embed",), embedding=True, in_layer=False),
        head=ModuleSpec("lm_head", ("head",), in_layer=False),
        layer_modules=(
            ModuleSpec("self_attn.qkv_proj", ("q", "k", "v")),
            ModuleSpec("self_attn.o_proj", ("o",)),
            ModuleSpec("mlp.gate_up_proj", ("gate", "up")),
            ModuleSpec("mlp.down_proj", ("down",)),
        ),
        fused={"self_attn.qkv_proj": FusedLayout(sizes=phi3_qkv_sizes)},  # gate_up: equal halves
    )
)


def gemma_post_norms(config: object) -> tuple[str, str] | None:
    """Gemma 2 and 3 norm the attention and MLP outputs before the residual sum; Gemma 1's
    `post_attention_layernorm` is Llama's pre-MLP norm."""
    if getattr(config, "model_type", "") == "gemma":
        return None
    return ("post_attention_layernorm", "post_feedforward_layernorm")


#: Gemma, Gemma 2 and Gemma 3 (text): Llama's module layout. Their embedding is scaled by
#: √hidden in its forward (`Gemma*TextScaledWordEmbedding` in transformers 5); PEFT applies that
#: scale to the LoRA embedding path too, so base − s·B·A + s·B·A stays the base. The head is
#: tied by default (the untie-first rule of `inject.untie_head` carries them). Extra norms
#: (Gemma 3's q/k norms, Gemma 2's post-norms) are not LoRA targets.
GEMMA = register(
    ArchSpec(
        family="gemma",
        model_types=("gemma", "gemma2", "gemma3_text"),
        layers="model.layers",
        final_norm="model.norm",
        post_norms=gemma_post_norms,
        embed=ModuleSpec("model.embed_tokens", ("embed",), embedding=True, in_layer=False),
        head=ModuleSpec("lm_head", ("head",), in_layer=False),
        layer_modules=LLAMA.layer_modules,
    )
)
