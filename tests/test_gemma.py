"""The Gemma families (gemma, gemma2, gemma3_text) on tiny offline configs, tied and untied heads:
every arm leaves the student unchanged at step 0 (the √hidden-scaled embedding included), the
plain-LoRA export, the merged model and the live model agree after training, streamed
sensitivity equals the in-memory one, and a Gemma 3 teacher with another tokenizer and fewer
layers feeds a Llama student in order."""

from __future__ import annotations

import json

import pytest
import torch
from paratransfer.pipeline import run_extract
from safetensors.torch import load_file

from paratransfer import data, inject
from paratransfer.arch import arch_for
from paratransfer.demo import arithmetic_records, write_jsonl
from paratransfer.demo.tiny import char_tokenizer, save_tiny, tiny_model
from paratransfer.extract import ExtractSettings
from paratransfer.sensitivity import accumulate_sensitivity
from paratransfer.sensitivity.streamed import streamed_sensitivity
from paratransfer.teacher.lazy import SafetensorsWeights
from paratransfer.teacher.models import load_model, load_tokenizer
from paratransfer.train import (
    TrainSettings,
    build_lora_model,
    init_lora,
    lora_targets,
    resolve_settings,
    run_train,
)
from tolerances import logits

GEMMAS = ["gemma", "gemma2", "gemma3_text"]
CASES = [(f, tied) for f in GEMMAS for tied in (True, False)]
RANK, ALPHA = 4, 8.0
FAST = dict(lr=1e-2, batch_size=4, micro_batch_size=2, max_length=160, max_steps=3, dropout=0.0)


def _id(case) -> str:
    return f"{case[0]}-{'tied' if case[1] else 'untied'}"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma-data")
    return {"seeds": write_jsonl(root / "seeds.jsonl", arithmetic_records(3)),
            "train": write_jsonl(root / "train.jsonl", arithmetic_records(8, seed=3))}


@pytest.fixture(scope="module")
def gemma_pairs(tmp_path_factory, files) -> dict:
    """(family, tied) -> dict(teacher, student, adapter): teacher of the same family, deeper and
    wider (tied, as released); the adapter extracted from it for the student."""
    tok = char_tokenizer()
    root = tmp_path_factory.mktemp("gemma")
    out = {}
    for i, (family, tied) in enumerate(CASES):
        name = _id((family, tied))
        teacher = save_tiny(tiny_model(family, vocab=len(tok), hidden=48, layers=3, heads=6,
                                       kv_heads=2, mlp=96, seed=50 + i), tok, root / f"{name}-t")
        student = save_tiny(tiny_model(family, vocab=len(tok), hidden=32, layers=2, heads=4,
                                       kv_heads=2, mlp=64, seed=60 + i,
                                       tie_word_embeddings=tied), tok, root / f"{name}-s")
        adapter = root / f"{name}-adapter"
        run_extract(str(teacher), str(student), adapter, ExtractSettings(rank=RANK, alpha=ALPHA),
                    seeds=files["seeds"], progress=False)
        out[(family, tied)] = dict(teacher=teacher, student=student, adapter=adapter)
    return out


@pytest.fixture(scope="module")
def prompts(files) -> torch.Tensor:
    rows = [t["input_ids"][:60] for t in data.load_tokenized(files["train"], char_tokenizer(),
                                                            limit=3)]
    width = min(len(r) for r in rows)
    return torch.tensor([r[:width] for r in rows])


def initialized(student_dir, adapter_dir, init: str):
    student = load_model(str(student_dir))
    adapter = inject.read_adapter(adapter_dir)
    settings = resolve_settings(TrainSettings(init=init, dropout=0.0, seed=1), adapter,
                                arch_for(student))
    specs, _ = lora_targets(student, settings.modules)
    model = build_lora_model(student, specs, settings, str(student_dir))
    return model, init_lora(model, settings, adapter)


def test_the_families_are_registered_as_gemma():
    for family in GEMMAS:
        model = tiny_model(family, vocab=40, hidden=16, heads=2, kv_heads=1, mlp=24)
        arch = arch_for(model)
        assert arch.family == "gemma" and arch.num_layers(model) == 2
        params = dict(model.named_parameters(remove_duplicate=False))
        for spec in arch.modules():
            for layer in ([0, 1] if spec.in_layer else [None]):
                assert spec.param_name(arch.layers, layer) in params
        assert "Scaled" in type(model.get_input_embeddings()).__name__  # √hidden in forward


@pytest.mark.parametrize("init", ["transfer", "standard", "pissa", "spectrum"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_step0_invariance_every_arm(case, init, gemma_pairs, prompts):
    x = gemma_pairs[case]
    want = logits(load_model(str(x["student"])), prompts)
    model, report = initialized(x["student"], x["adapter"], init)
    assert (logits(model, prompts) - want).abs().max().item() < 1e-4
    if init == "standard":
        return  # B = 0: nothing moved; the other arms moved the base (not vacuous)
    assert report["modules"] == len(inject.lora_layers(model)) > 0
    assert report["untied_head"] is case[1]  # the embedding is targeted: a tied head is untied
    with model.disable_adapter():
        assert (logits(model, prompts) - want).abs().max().item() > 1e-2


def test_the_lora_embedding_path_carries_the_scale(gemma_pairs, prompts):
    """Without PEFT scaling the LoRA embedding path by √hidden, base − s·B·A + s·B·A would not
    be the base: check the embedding output itself, on the Gemma 3 student with its own head."""
    x = gemma_pairs[("gemma3_text", False)]
    model, _ = initialized(x["student"], x["adapter"], "transfer")
    embed = model.base_model.model.get_input_embeddings()
    original = load_model(str(x["student"])).get_input_embeddings()
    with torch.no_grad():
        assert torch.allclose(embed(prompts), original(prompts), atol=1e-5)
        scale = float(original.embed_scale)
        assert scale == pytest.approx(32 ** 0.5)
        lora = (embed(prompts) - embed.get_base_layer()(prompts)).abs().max().item()
    assert lora > 1e-3


@pytest.mark.parametrize("init", ["transfer", "pissa"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_export_equals_merged_and_live(case, init, gemma_pairs, files, prompts, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from paratransfer.adapter.merge import run_merge

    x = gemma_pairs[case]
    out = tmp_path / "run"
    result = run_train(str(x["student"]), files["train"], out, TrainSettings(init=init, **FAST),
                       adapter_dir=x["adapter"], progress=False)
    live = logits(result.model, prompts)
    assert (live - logits(load_model(str(x["student"])), prompts)).abs().max().item() > 1e-3
    plain = PeftModel.from_pretrained(load_model(str(x["student"])), str(out))
    assert (logits(plain, prompts) - live).abs().max().item() < 1e-4
    run_merge(str(x["student"]), out, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    assert (logits(merged, prompts) - live).abs().max().item() < 1e-4
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_embedding_A" in k for k in saved)  # the embedding is exported too


@pytest.mark.parametrize("family", GEMMAS)
def test_streamed_sensitivity_equals_in_memory(family, gemma_pairs, files, tmp_path):
    teacher = gemma_pairs[(family, True)]["teacher"]
    model = load_model(str(teacher))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    samples = data.load_tokenized(files["seeds"], load_tokenizer(str(teacher)))
    want, used = accumulate_sensitivity(model, samples)
    got, got_used = streamed_sensitivity(SafetensorsWeights(tmp_path / "sharded"), samples)
    assert got_used == used == len(samples) and set(got) == set(want)
    for name in want:
        ref = want[name].double()
        assert (got[name].double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item(), name


def test_shallower_gemma3_teacher_with_another_tokenizer_feeds_every_student_layer(files, tmp_path):
    """Gemma 3 (2 layers, SentencePiece-like tokens) -> Llama (5 layers, characters): each
    student layer takes the teacher layer at its relative depth, in order; vocabularies aligned
    by token strings; the student is unchanged at step 0."""
    from test_cross_family import spm_tokenizer

    t_tok, s_tok = spm_tokenizer(), char_tokenizer()
    teacher = save_tiny(tiny_model("gemma3_text", vocab=len(t_tok), hidden=48, layers=2, heads=6,
                                   kv_heads=2, mlp=96, seed=7), t_tok, tmp_path / "teacher")
    student = save_tiny(tiny_model("llama", vocab=len(s_tok), hidden=32, layers=5, heads=4,
                                   kv_heads=2, mlp=64, seed=8), s_tok, tmp_path / "student")
    report = run_extract(str(teacher), str(student), tmp_path / "adapter",
                         ExtractSettings(rank=RANK, alpha=ALPHA), seeds=files["seeds"],
                         progress=False)
    saved = json.loads((tmp_path / "adapter" / "transfer.json").read_text())
    assert saved["selected_layers"] == [0, 0, 1, 1, 1] and saved["layer_rule"] == "depth"
    assert {(e["student_layer"], e["teacher_layer"]) for e in saved["modules"]
            if e["student_layer"] is not None} == {(0, 0), (1, 0), (2, 1), (3, 1), (4, 1)}
    assert report["teacher_family"] == "gemma" and report["vocabulary"]["coverage"] > 0.5
    prompts = torch.tensor([s_tok("<|user|>\nWhat is 12 + 7?\n\n<|assistant|>\n19")["input_ids"]])
    want = logits(load_model(str(student)), prompts)
    model, _ = initialized(student, tmp_path / "adapter", "transfer")
    assert (logits(model, prompts) - want).abs().max().item() < 1e-4
