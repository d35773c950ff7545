"""Sensitivity: the hook-accumulator path against a naive reference, and the saved file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from paratransfer.sensitivity.accumulate import (
    SensitivityFile,
    accumulate_sensitivity,
    layer_scores,
    sum64,
)
from paratransfer.sensitivity.step import SensitivitySettings, run_sensitivity
from paratransfer.tasks import examples as data
from paratransfer.teacher.models import load_model


def naive_sensitivity(model, samples) -> dict[str, torch.Tensor]:
    """The reference approach: keep every gradient, build a per-sample |θ·g| dict, add up."""
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for s in samples:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=torch.tensor([s["input_ids"]]),
                     labels=torch.tensor([s["labels"]])).loss
        loss.backward()
        per_sample = {n: (p.detach().double() * p.grad.double()).abs()
                      for n, p in model.named_parameters() if p.grad is not None}
        for n, v in per_sample.items():
            total[n] += v
    model.zero_grad(set_to_none=True)
    return total


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_accumulated_equals_naive(family, model_pairs, seeds_file, tokenizer):
    teacher = load_model(str(model_pairs[family][0]))
    samples = data.load_tokenized(seeds_file, tokenizer)
    fast, used = accumulate_sensitivity(teacher, samples)
    ref = naive_sensitivity(teacher, samples)
    assert used == len(samples)
    assert set(fast) == set(ref)
    for name, value in fast.items():
        assert value.dtype == torch.float32
        assert all(p.grad is None for p in teacher.parameters()), "gradients must be freed"
        torch.testing.assert_close(value.double(), ref[name], rtol=1e-5, atol=1e-12, msg=name)
    # Summing |θ·g| per sample differs from |θ·Σg|: the test data must be able to tell.
    assert any(v.sum() > 0 for v in fast.values())


def test_per_sample_abs_is_not_abs_of_sum(model_pairs, seeds_file, tokenizer):
    teacher = load_model(str(model_pairs["llama"][0]))
    samples = data.load_tokenized(seeds_file, tokenizer)
    fast, _ = accumulate_sensitivity(teacher, samples)
    teacher.zero_grad()
    for s in samples:
        teacher(input_ids=torch.tensor([s["input_ids"]]), labels=torch.tensor([s["labels"]])).loss.backward()
    name = "model.layers.0.mlp.up_proj.weight"
    p = dict(teacher.named_parameters())[name]
    abs_of_sum = (p.detach() * p.grad).abs()
    assert not torch.allclose(fast[name], abs_of_sum, rtol=1e-3)
    assert (fast[name] >= abs_of_sum - 1e-6).all()  # triangle inequality


def test_sensitivity_file_roundtrip(model_pairs, seeds_file, tmp_path):
    teacher_dir = str(model_pairs["llama"][0])
    out = tmp_path / "sens.safetensors"
    meta = run_sensitivity(teacher_dir, seeds_file, out, SensitivitySettings(max_samples=3),
                           torch.float32, torch.device("cpu"), progress=False)
    assert meta["samples"] == 3
    f = SensitivityFile(out)
    assert f.metadata["samples"] == 3
    assert f.metadata["seeds_sha256"] == data.file_digest(seeds_file)
    assert f.metadata["prompt_format"] == "tulu"
    teacher = load_model(teacher_dir)
    assert set(f) == {n for n, _ in teacher.named_parameters()}
    loaded = load_file(str(out))
    samples = data.load_tokenized(seeds_file, teacher_tokenizer(teacher_dir), limit=3)
    ref, _ = accumulate_sensitivity(teacher, samples)
    for name in ref:
        torch.testing.assert_close(loaded[name], ref[name])
        torch.testing.assert_close(f[name], ref[name])
    # Layer scores are sums over each decoder layer's parameters.
    from paratransfer.arch import arch_for

    scores = layer_scores(f, arch_for(teacher).layer_of, 4)
    want = [sum(float(v.double().sum()) for n, v in ref.items() if n.startswith(f"model.layers.{i}."))
            for i in range(4)]
    assert scores == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0,), (7,), (300, 1000), (1000, 300)])
def test_sum64_is_the_float64_sum(dtype, shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    for view in (x, x.mT if x.dim() == 2 else x):
        assert sum64(view) == pytest.approx(float(view.double().sum()), rel=1e-12, abs=0)


def test_existing_output_refused_before_work(model_pairs, seeds_file, tmp_path):
    from paratransfer.io.errors import UserError

    out = tmp_path / "sens.safetensors"
    out.write_text("keep me")
    with pytest.raises(UserError, match="already exists"):
        run_sensitivity(str(model_pairs["llama"][0]), seeds_file, out, SensitivitySettings(),
                        torch.float32, torch.device("cpu"), progress=False)
    assert out.read_text() == "keep me"


def teacher_tokenizer(path):
    from paratransfer.teacher.models import load_tokenizer

    return load_tokenizer(path)


def test_accumulating_in_two_calls_equals_one(model_pairs, seeds_file, tokenizer):
    """Accumulators passed back in keep their sums (the hooks work on Σ|g| internally)."""
    teacher = load_model(str(model_pairs["gpt2"][0]))
    samples = data.load_tokenized(seeds_file, tokenizer)
    once, _ = accumulate_sensitivity(teacher, samples)
    part, n1 = accumulate_sensitivity(teacher, samples[:2])
    both, n2 = accumulate_sensitivity(teacher, samples[2:], accumulators=part)
    assert n1 + n2 == len(samples)
    for name in once:
        torch.testing.assert_close(both[name], once[name], rtol=1e-5, atol=1e-12)
