"""Transfer init: the student is unchanged at step 0 (docs/method.md §5), and a trained transfer
adapter converts into a plain rank-2r LoRA that computes the same on the unmodified student."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ADAPTER_ALPHA, ADAPTER_RANK
from paratransfer.adapter import inject
from paratransfer.demo.world import arithmetic_records, write_jsonl
from paratransfer.tasks import examples as data
from paratransfer.teacher.models import load_model
from paratransfer.train import TrainSettings, build_lora_model, lora_targets
from tolerances import logits

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
RANK, ALPHA = ADAPTER_RANK, ADAPTER_ALPHA  # the shared `adapters` fixture's



@pytest.fixture(scope="module")
def prompts(tokenizer, tmp_path_factory) -> torch.Tensor:
    """Real task prompts + answers (GSM seed set) when ../shared/data is present, else generated."""
    path = SHARED_DATA / "gsm" / "sample_gsm.jsonl"
    if not path.exists():
        path = write_jsonl(tmp_path_factory.mktemp("prompts") / "p.jsonl", arithmetic_records(4, seed=7))
    rows = [t["input_ids"][:96] for t in data.load_tokenized(path, tokenizer, limit=4)]
    width = min(len(r) for r in rows)
    return torch.tensor([r[:width] for r in rows])


def lora_model(student_dir, adapter_dir, dropout: float = 0.0):
    """The student wrapped exactly as `train` wraps it, with the adapter's rank/alpha/modules."""
    from paratransfer.arch import arch_for
    from paratransfer.train import resolve_settings

    student = load_model(str(student_dir))
    adapter = inject.read_adapter(adapter_dir)
    settings = resolve_settings(TrainSettings(dropout=dropout), adapter, arch_for(student))
    specs, _ = lora_targets(student, settings.modules)
    return build_lora_model(student, specs, settings, str(student_dir)), adapter


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_step0_invariance(family, model_pairs, adapters, prompts):
    student_dir = model_pairs[family][1]
    want = logits(load_model(str(student_dir)), prompts)
    model, adapter = lora_model(student_dir, adapters[family])
    report = inject.inject_transfer_init(model, adapter)
    got = logits(model, prompts)
    assert (got - want).abs().max().item() < 1e-4

    # Not vacuous: the factors are the adapter's, the base weights moved by s·B·A, and the
    # LoRA path alone changes the output a lot.
    params = inject.lora_parameters(model)
    saved = {inject.model_key(k): t for k, t in adapter.tensors.items()}
    assert params and all(torch.equal(params[n].detach(), saved[n].float()) for n in params)
    assert report["modules"] == len(inject.lora_layers(model)) > 0
    with model.disable_adapter():
        residual_only = logits(model, prompts)
    assert (residual_only - want).abs().max().item() > 1e-2


def test_tied_student_is_untied_and_head_unchanged(model_pairs, adapters):
    student_dir = model_pairs["gpt2"][1]
    original = load_model(str(student_dir))
    model, adapter = lora_model(student_dir, adapters["gpt2"])
    base = model.base_model.model
    assert inject.is_tied(base)
    report = inject.inject_transfer_init(model, adapter)
    assert report["untied_head"] is True and not inject.is_tied(base)
    assert base.config.tie_word_embeddings is False
    head = base.get_output_embeddings().weight
    wte = base.get_input_embeddings().get_base_layer().weight
    assert torch.equal(head, original.lm_head.weight) and not head.requires_grad
    assert not torch.allclose(wte, original.transformer.wte.weight)


def test_untied_student_stays_as_is(model_pairs, adapters):
    model, adapter = lora_model(model_pairs["llama"][1], adapters["llama"])
    assert inject.inject_transfer_init(model, adapter)["untied_head"] is False


def _simulate_training(model, seed: int = 0) -> None:
    """Move every LoRA factor as training would (B and A both change)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in inject.lora_parameters(model).values():
            p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_plain_lora_conversion(family, model_pairs, adapters, prompts, tmp_path):
    from peft import PeftModel

    student_dir = model_pairs[family][1]
    model, adapter = lora_model(student_dir, adapters[family])
    inject.inject_transfer_init(model, adapter)
    initial = tmp_path / inject.INITIAL_NAME
    model.save_pretrained(str(initial), save_embedding_layers=False)
    _simulate_training(model)
    trained = logits(model, prompts)
    out = tmp_path / "plain"
    inject.save_plain_lora(model, out, initial)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = PeftModel.from_pretrained(load_model(str(student_dir)), str(out))
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    assert (logits(plain, prompts) - trained).abs().max().item() < 1e-4
    assert (trained - logits(load_model(str(student_dir)), prompts)).abs().max().item() > 1e-2

    # Rank 2r everywhere, embedding included (PEFT alone drops it), no base weights saved.
    saved = load_file(str(out / inject.ADAPTER_WEIGHTS))
    config = inject.read_adapter(out).config
    assert (config["r"], config["lora_alpha"]) == (2 * RANK, 2 * ALPHA)
    embed = [k for k in saved if "lora_embedding_A" in k]
    assert len(embed) == 1 and saved[embed[0]].shape[0] == 2 * RANK
    assert all("lora_" in k for k in saved)
    assert all(t.shape[0] == 2 * RANK for k, t in saved.items() if "lora_A" in k)


def test_embedding_conversion_is_needed(model_pairs, adapters, prompts, tmp_path):
    """Without the by-hand embedding part the converted adapter would be wrong: PEFT's conversion drops embedding adapters."""
    from peft import PeftModel

    student_dir = model_pairs["llama"][1]
    model, adapter = lora_model(student_dir, adapters["llama"])
    inject.inject_transfer_init(model, adapter)
    initial = tmp_path / inject.INITIAL_NAME
    model.save_pretrained(str(initial), save_embedding_layers=False)
    _simulate_training(model)
    trained = logits(model, prompts)
    peft_only = tmp_path / "peft-only"
    model.save_pretrained(str(peft_only), save_embedding_layers=False,
                          path_initial_model_for_weight_conversion=str(initial))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = PeftModel.from_pretrained(load_model(str(student_dir)), str(peft_only))
    assert (logits(plain, prompts) - trained).abs().max().item() > 1e-3


def test_adapter_for_another_student_names_first_mismatch(model_pairs, adapters):
    teacher_dir = model_pairs["llama"][0]  # wider than the student the adapter was made for
    adapter = inject.read_adapter(adapters["llama"])
    with pytest.raises(inject.UserError) as e:
        inject.check_adapter_shapes(load_model(str(teacher_dir)), adapter)
    msg = str(e.value)
    assert "\n" not in msg
    assert "model.embed_tokens.lora_embedding_B" in msg and "[32, 4]" in msg and "[48, 4]" in msg


def test_adapter_of_another_family(model_pairs, adapters):
    adapter = inject.read_adapter(adapters["gpt2"])
    with pytest.raises(inject.UserError, match="names module .transformer.*which the student does not have"):
        inject.check_adapter_shapes(load_model(str(model_pairs["llama"][1])), adapter)


def test_not_an_adapter_folder(tmp_path):
    with pytest.raises(inject.UserError, match="adapter_config.json"):
        inject.read_adapter(tmp_path)
