"""The control initializations `pissa` and `spectrum`: the student is unchanged at step 0,
the plain-LoRA export, the merged model and the live model agree after training, and each
init holds what it claims (the student's own principal components; the transfer's spectrum on
directions that are not the teacher's)."""

from __future__ import annotations

import pytest
import torch

from conftest import ADAPTER_RANK
from paratransfer.adapter import inject
from paratransfer.arch import arch_for
from paratransfer.demo.world import arithmetic_records, write_jsonl
from paratransfer.tasks.examples import load_tokenized
from paratransfer.teacher.models import load_model
from paratransfer.train import (
    INITS,
    TrainSettings,
    build_lora_model,
    init_lora,
    lora_targets,
    resolve_settings,
    run_train,
)
from paratransfer.train.inits import spectrum_factors
from tolerances import logits

FAMILIES = ["llama", "qwen2", "gpt2"]
FAST = dict(lr=1e-2, batch_size=4, micro_batch_size=2, max_length=160, max_steps=3, dropout=0.0)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("inits") / "train.jsonl", arithmetic_records(8, seed=3))


@pytest.fixture(scope="module")
def prompts(train_file, tokenizer) -> torch.Tensor:
    rows = [t["input_ids"][:60] for t in load_tokenized(train_file, tokenizer, limit=3)]
    width = min(len(r) for r in rows)
    return torch.tensor([r[:width] for r in rows])


def initialized(student_dir, adapter_dir, init: str, seed: int = 1):
    """The student wrapped with LoRA and initialized as `init` (rank/alpha/modules of the adapter)."""
    student = load_model(str(student_dir))
    adapter = inject.read_adapter(adapter_dir)
    settings = resolve_settings(TrainSettings(init=init, dropout=0.0, seed=seed), adapter,
                                arch_for(student))
    specs, _ = lora_targets(student, settings.modules)
    model = build_lora_model(student, specs, settings, str(student_dir))
    report = init_lora(model, settings, adapter)
    return model, adapter, report


def module_factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (B, A) as B @ A is laid out (`[out, in]`, `[d, vocab]` for the embedding)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in inject.lora_parameters(model).items():
        part = "B" if ("lora_B" in name or "lora_embedding_B" in name) else "A"
        out.setdefault(inject.module_of(name), {})[part] = p.detach().double()
    return {m: (f["B"], f["A"]) for m, f in out.items()}


@pytest.mark.parametrize("init", ["pissa", "spectrum"])
@pytest.mark.parametrize("family", FAMILIES)
def test_step0_invariance(init, family, model_pairs, adapters, prompts):
    student_dir = model_pairs[family][1]
    want = logits(load_model(str(student_dir)), prompts)
    model, _, report = initialized(student_dir, adapters[family], init)
    assert (logits(model, prompts) - want).abs().max().item() < 1e-4
    assert report["modules"] == len(inject.lora_layers(model)) > 0
    with model.disable_adapter():  # not vacuous: the base alone computes something else
        assert (logits(model, prompts) - want).abs().max().item() > 1e-2


@pytest.mark.parametrize("init", ["pissa", "spectrum"])
@pytest.mark.parametrize("family", FAMILIES)
def test_plain_lora_export_equals_merged_and_live_model(init, family, model_pairs, adapters,
                                                        train_file, prompts, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from paratransfer.adapter.merge import run_merge

    student_dir = model_pairs[family][1]
    out = tmp_path / "run"
    result = run_train(str(student_dir), train_file, out, TrainSettings(init=init, **FAST),
                       adapter_dir=adapters[family], progress=False)
    live = logits(result.model, prompts)
    assert (live - logits(load_model(str(student_dir)), prompts)).abs().max().item() > 1e-3
    plain = PeftModel.from_pretrained(load_model(str(student_dir)), str(out))
    assert (logits(plain, prompts) - live).abs().max().item() < 1e-4
    run_merge(str(student_dir), out, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    assert (logits(merged, prompts) - live).abs().max().item() < 1e-4
    assert result.summary["adapter_rank"] == 2 * ADAPTER_RANK and result.summary["init"] == init


@pytest.mark.parametrize("family", FAMILIES)
def test_pissa_factors_are_the_students_own_principal_components(family, model_pairs, adapters):
    from peft.tuners.lora import layer as lora_layer

    student_dir = model_pairs[family][1]
    original = dict(load_model(str(student_dir)).named_parameters())
    model, _, report = initialized(student_dir, adapters[family], "pissa")
    layers = inject.lora_layers(model)
    embeddings = 0
    for name, (b, a) in module_factors(model).items():
        layer = layers[name]
        scale = float(layer.scaling["default"])
        weight = original[f"{name}.weight"].double()
        if isinstance(layer, lora_layer.Embedding):
            weight, embeddings = weight.T, embeddings + 1  # B @ A is laid out [d, vocab]
        elif getattr(layer, "fan_in_fan_out", False):
            weight = weight.T  # GPT-2 Conv1D stores [in, out]
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        r = b.shape[1]
        best = (u[:, :r] * s[:r]) @ vh[:r]
        torch.testing.assert_close(scale * b @ a, best, rtol=1e-4, atol=1e-5, msg=name)
    assert embeddings == report["embedding_layers_by_own_svd"] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_spectrum_has_the_transfer_spectrum_on_other_directions(family, model_pairs, adapters):
    student_dir = model_pairs[family][1]
    transfer, _, _ = initialized(student_dir, adapters[family], "transfer")
    spectrum, _, _ = initialized(student_dir, adapters[family], "spectrum", seed=1)
    again, _, _ = initialized(student_dir, adapters[family], "spectrum", seed=1)
    other, _, _ = initialized(student_dir, adapters[family], "spectrum", seed=2)
    t, s, s2, o = (module_factors(m) for m in (transfer, spectrum, again, other))
    overlaps = []
    for name, (b0, a0) in t.items():
        b, a = s[name]
        sv0 = torch.linalg.svdvals(b0 @ a0)[:b0.shape[1]]
        torch.testing.assert_close(torch.linalg.svdvals(b @ a)[:b.shape[1]], sv0,
                                   rtol=1e-4, atol=1e-6, msg=name)
        assert torch.equal(b, s2[name][0]) and torch.equal(a, s2[name][1])  # seeded
        if sv0.max() > 0:
            assert not torch.allclose(b, o[name][0])  # another seed, other directions
            # Mean cos² of the principal angles between the column spaces of B and B0:
            # 1 for the same directions, about r/m for random ones.
            q0, q = torch.linalg.qr(b0)[0], torch.linalg.qr(b)[0]
            overlaps.append(float((q0.T @ q).pow(2).sum() / q.shape[1]))
    assert overlaps and max(overlaps) < 0.75 and sum(overlaps) / len(overlaps) < 0.4


def test_spectrum_factors_oracle():
    """Brute force on one pair: same singular values; B has orthogonal columns scaled by them."""
    g = torch.Generator().manual_seed(0)
    b0, a0 = torch.randn(12, 3, generator=g), torch.randn(3, 9, generator=g)
    b, a = spectrum_factors(b0, a0, seed=4, module="m")
    torch.testing.assert_close(torch.linalg.svdvals(b.double() @ a.double())[:3],
                               torch.linalg.svdvals(b0.double() @ a0.double())[:3])
    torch.testing.assert_close(a @ a.T, torch.eye(3), atol=1e-6, rtol=0)
    gram = b.T @ b
    torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-5, rtol=0)


def test_every_init_is_registered_with_what_training_needs():
    assert set(INITS) == {"transfer", "standard", "pissa", "spectrum", "eva", "corda"}
    assert {n for n, i in INITS.items() if i.needs_adapter} == {"transfer", "spectrum"}
    assert {n for n, i in INITS.items() if i.residual} == {"transfer", "pissa", "spectrum",
                                                            "corda"}
    assert {n for n, i in INITS.items() if i.needs_data} == {"eva", "corda"}
    with pytest.raises(Exception, match="--init"):
        TrainSettings(init="nope")
