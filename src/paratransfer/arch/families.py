"""The supported families, as data. Adding a family is one `register(ArchSpec(...))`."""

from __future__ import annotations

from paratransfer.arch.spec import ArchSpec, ModuleSpec, register

#: Llama and its close relatives share one layout (Qwen2 adds q/k/v biases, which LoRA leaves
#: alone; grouped-query attention only makes k/v narrower, which sizes from weights handle).
LLAMA = register(
    ArchSpec(
        family="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        layers="model.layers",
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

#: GPT-2: Conv1D weights stored [in, out]; `c_attn` fuses q | k | v along its output.
GPT2 = register(
    ArchSpec(
        family="gpt2",
        model_types=("gpt2",),
        layers="transformer.h",
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
