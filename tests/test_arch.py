"""Architecture adapters: every role found where the description says, in [out, in] orientation."""

from __future__ import annotations

import pytest
import torch

from paratransfer.arch import ROLES, arch_for, parse_roles, supported_model_types
from paratransfer.demo.tiny import tiny_model
from paratransfer.io.errors import UserError

FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "gpt_neox", "phi3", "gemma", "gemma2",
            "gemma3_text"]
FUSED = [("gpt2", "attn.c_attn"), ("gpt_neox", "attention.query_key_value"),
         ("phi3", "self_attn.qkv_proj"), ("phi3", "mlp.gate_up_proj")]


def _tiny(family: str, layers: int = 2):
    kv_heads = None if family == "gpt_neox" else 2  # GPT-NeoX has no grouped-query attention
    return tiny_model(family, vocab=40, hidden=16, layers=layers, heads=4, kv_heads=kv_heads, mlp=24)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_module_is_where_the_spec_says(family):
    model = _tiny(family)
    arch = arch_for(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    assert arch.num_layers(model) == 2
    assert arch.count_layers(n for n, _ in model.named_parameters()) == 2
    for spec in arch.modules():
        for layer in ([0, 1] if spec.in_layer else [None]):
            name = spec.param_name(arch.layers, layer)
            assert name in params, name
            assert spec.module_name(arch.layers, layer) in modules
            linear = spec.to_linear(params[name])
            sizes = arch.role_sizes(spec, model.config, tuple(linear.shape))
            assert sum(sizes.values()) == linear.shape[0]
            assert {r: tuple(p.shape) for r, p in arch.split(spec, model.config, linear).items()} \
                == {r: (n, linear.shape[1]) for r, n in sizes.items()}
            assert spec.from_linear(linear).data_ptr() == params[name].data_ptr()


@pytest.mark.parametrize("family,path", FUSED)
def test_split_then_fuse_is_the_identity(family, path):
    model = _tiny(family, layers=1)
    arch = arch_for(model)
    spec = next(m for m in arch.layer_modules if m.path == path)
    stored = dict(model.named_parameters())[spec.param_name(arch.layers, 0)]
    matrix = spec.to_linear(stored).detach()
    parts = arch.split(spec, model.config, matrix)
    assert list(parts) == list(spec.roles)
    assert torch.equal(arch.fuse(spec, model.config, parts), matrix)
    # and fuse then split: distinct values per role come back in place
    marked = {r: torch.full_like(p, float(i)) + torch.arange(p.numel()).reshape(p.shape) / 1e4
              for i, (r, p) in enumerate(parts.items())}
    again = arch.split(spec, model.config, arch.fuse(spec, model.config, marked))
    assert all(torch.equal(again[r], marked[r]) for r in spec.roles)


def test_gpt_neox_split_matches_the_model_computation():
    """q, k, v split out of the per-head interleaved `query_key_value` are what attention uses."""
    model = _tiny("gpt_neox", layers=1)
    arch = arch_for(model)
    spec = arch.layer_modules[0]
    layer = model.gpt_neox.layers[0].attention.query_key_value
    x = torch.randn(3, 16)
    heads, size = 4, 4
    q, k, v = layer(x).view(3, heads, 3 * size).chunk(3, dim=-1)  # as GPTNeoXAttention does
    weights = arch.split(spec, model.config, layer.weight)
    biases = arch.split(spec, model.config, layer.bias[:, None])
    for role, want in zip("qkv", (q, k, v), strict=True):
        got = x @ weights[role].T + biases[role][:, 0]
        torch.testing.assert_close(got, want.reshape(3, heads * size))


def test_phi3_split_matches_the_model_computation():
    model = _tiny("phi3", layers=1)  # 4 heads, 2 key/value heads, head width 4
    arch = arch_for(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    x = torch.randn(3, 16)
    qkv = arch.split(arch.layer_modules[0], model.config, attn.qkv_proj.weight)
    out = attn.qkv_proj(x)
    for role, (lo, hi) in zip("qkv", ((0, 16), (16, 24), (24, 32)), strict=True):
        torch.testing.assert_close(x @ qkv[role].T, out[:, lo:hi])
    gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)  # as Phi3MLP does
    parts = arch.split(arch.layer_modules[2], model.config, mlp.gate_up_proj.weight)
    torch.testing.assert_close(x @ parts["gate"].T, gate)
    torch.testing.assert_close(x @ parts["up"].T, up)


@pytest.mark.parametrize("family,heads", [("llama", (4, 2, 4)), ("gpt2", (4, 4, 4)),
                                          ("gpt_neox", (4, 4, 4)), ("phi3", (4, 2, 4))])
def test_head_layout_from_config(family, heads):
    model = _tiny(family, layers=1)
    h = arch_for(model).heads(model.config)
    assert (h.heads, h.kv_heads, h.head_dim) == heads


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
