"""Architecture adapters: every role found where the description says, in [out, in] orientation."""

from __future__ import annotations

import pytest
import torch

from paratransfer.arch import ROLES, arch_for, parse_roles, supported_model_types
from paratransfer.errors import UserError
from paratransfer.tiny import tiny_model


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
def test_every_module_is_where_the_spec_says(family):
    model = tiny_model(family, vocab=40, hidden=16, layers=2, heads=4, kv_heads=2, mlp=24)
    arch = arch_for(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    assert arch.num_layers(model) == 2
    for spec in arch.modules():
        for layer in ([0, 1] if spec.in_layer else [None]):
            name = spec.param_name(arch.layers, layer)
            assert name in params, name
            assert spec.module_name(arch.layers, layer) in modules
            linear = spec.to_linear(params[name])
            rows = arch.role_rows(spec, model.config, tuple(linear.shape))
            assert sum(size for _, size in rows.values()) == linear.shape[0]
            assert spec.from_linear(linear).data_ptr() == params[name].data_ptr()


def test_llama_gqa_sizes_come_from_weights():
    model = tiny_model("llama", vocab=40, hidden=16, layers=1, heads=4, kv_heads=2, mlp=24)
    arch = arch_for(model)
    k = next(m for m in arch.layer_modules if m.roles == ("k",))
    w = k.to_linear(dict(model.named_parameters())[k.param_name(arch.layers, 0)])
    assert tuple(w.shape) == (8, 16)  # 2 kv heads x head_dim 4, in 16


def test_gpt2_c_attn_split_matches_the_model_computation():
    """q|k|v rows of the [out, in] view of c_attn are what GPT-2's attention computes."""
    model = tiny_model("gpt2", vocab=40, hidden=16, layers=1, heads=4)
    arch = arch_for(model)
    spec = arch.layer_modules[0]
    conv = model.transformer.h[0].attn.c_attn
    linear = spec.to_linear(conv.weight)
    x = torch.randn(3, 16)
    fused = conv(x)  # x @ W + b, with W stored [in, out]
    rows = arch.role_rows(spec, model.config, tuple(linear.shape))
    for i, role in enumerate(("q", "k", "v")):
        lo, n = rows[role]
        assert (lo, n) == (16 * i, 16)
        torch.testing.assert_close(x @ linear[lo:lo + n].T + conv.bias[lo:lo + n],
                                   fused[:, 16 * i:16 * (i + 1)])


def test_embedding_is_handled_transposed():
    model = tiny_model("llama", vocab=40, hidden=16, layers=1, heads=4)
    arch = arch_for(model)
    w = arch.embed.to_linear(model.get_input_embeddings().weight)
    assert tuple(w.shape) == (16, 40)


def test_parse_roles():
    assert parse_roles("embed,attn,mlp,head") == ROLES
    assert parse_roles("v,q") == ("q", "v")
    assert parse_roles(["mlp"]) == ("gate", "up", "down")
    with pytest.raises(UserError, match="ffn"):
        parse_roles("attn,ffn")


def test_unsupported_architecture_names_type_and_supported():
    class Cfg:
        model_type = "rwkv"

    with pytest.raises(UserError) as e:
        arch_for(Cfg())
    assert "rwkv" in str(e.value)
    for t in supported_model_types():
        assert t in str(e.value)
