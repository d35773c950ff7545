"""The real-model tier: Gemma 3 270M (teacher) and SmolLM2-135M-Instruct (student), real
pretrained weights from GGUF files on the package index (dequantized: 4-bit quantization noise
included), end to end. Cross-family, cross-tokenizer (262,144 SentencePiece tokens against
49,152 byte-level BPE tokens) and a shallower teacher (18 layers for 30); then the reverse
direction, a deeper and narrower teacher (`--allow-pad`).

Short sequences, few seeds, float32; skipped with the reason when the packages cannot be had
(tests/real_models.py). Conversions are cached outside the repository, so only the first run
pays for them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from paratransfer.pipeline import SensitivitySettings, run_extract, run_sensitivity

from conftest import SHARED_DATA
from paratransfer import data, inject
from paratransfer.demo import arithmetic_records, write_jsonl
from paratransfer.extract import ExtractSettings
from paratransfer.sensitivity import SensitivityFile
from paratransfer.teacher.models import fingerprint, load_model, load_tokenizer
from paratransfer.train import TrainSettings, run_train
from real_models import GEMMA3_270M, SMOLLM2_135M, real_model_folder
from tolerances import logits

pytestmark = pytest.mark.real

RANK, ALPHA = 8, 16.0
#: "Unchanged" on a real model in float32: the largest logit difference within this share of the
#: largest logit (5e-5 ≈ 400 float32 rounding steps of it). Each residual weight W − s·B·A is
#: rounded once and the LoRA path adds s·B·A back in another order, through 18–30 layers: on
#: this pair that moves logits of size ~15 by 1e-4–4e-4, while the errors these tests exist to
#: catch (a scale missed, an embedding part dropped, a tied head changed) move them by 1e-2 to
#: 1e2 (the `disable_adapter` checks below show how far the base alone is).
RTOL = 5e-5


def assert_unchanged(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    diff = (got - want).abs().max().item()
    assert diff <= RTOL * want.abs().max().item(), (what, diff, want.abs().max().item())
ARMS = ("transfer", "standard", "pissa", "spectrum")
SHORT = SensitivitySettings(max_length=96)
#: Two optimizer steps of one short example each, float32, no dropout (the tests compare
#: logits); on 2 busy cores one such step of SmolLM2 took ~10 s.
STEPS = dict(batch_size=1, micro_batch_size=1, max_length=96, max_steps=2, dropout=0.0,
             checkpoint_every=100)


@pytest.fixture(autouse=True, scope="module")
def two_threads():
    """Real models do gain from both cores (the tiny-model tests pin one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before if before > 1 else 2))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict:
    """GGUF files and converted folders of both models, seed and training files, prompts."""
    gemma_file, gemma = real_model_folder(GEMMA3_270M)
    smol_file, smol = real_model_folder(SMOLLM2_135M)
    root = tmp_path_factory.mktemp("real")
    shared = SHARED_DATA / "gsm" / "sample_gsm.jsonl"
    records = ([json.loads(line) for line in shared.read_text().splitlines()[:3]]
               if shared.is_file() else arithmetic_records(3, seed=11))
    seeds = write_jsonl(root / "seeds.jsonl", records[:3])
    # GSM-format problems of ~80 tokens: each answer fits the short training length
    train = write_jsonl(root / "train.jsonl", arithmetic_records(3, seed=12))
    return dict(gemma_file=gemma_file, gemma=gemma, smol_file=smol_file, smol=smol,
                seeds=seeds, train=train, root=root)


def prompts_for(tokenizer, path: Path, width: int = 48) -> torch.Tensor:
    rows = [t["input_ids"][:width] for t in data.load_tokenized(path, tokenizer, limit=2)]
    width = min(len(r) for r in rows)
    return torch.tensor([r[:width] for r in rows])


@pytest.fixture(scope="module")
def gemma_sensitivity(real) -> Path:
    out = real["root"] / "gemma.safetensors"
    run_sensitivity(str(real["gemma"]), real["seeds"], out, SHORT, torch.float32,
                    torch.device("cpu"), progress=False)
    return out


@pytest.fixture(scope="module")
def smol_sensitivity(real) -> Path:
    """Sensitivity of SmolLM2 computed from its .gguf file given as the teacher."""
    out = real["root"] / "smol.safetensors"
    run_sensitivity(str(real["smol_file"]), real["seeds"], out, SHORT, torch.float32,
                    torch.device("cpu"), progress=False)
    return out


@pytest.fixture(scope="module")
def forward_adapter(real, gemma_sensitivity) -> tuple[Path, dict]:
    """Gemma 3 -> SmolLM2 through the CLI, with the .gguf file itself as the teacher."""
    from paratransfer.cli import main

    out = real["root"] / "gemma-to-smol"
    code = main(["extract", "--teacher", str(real["gemma_file"]), "--student", str(real["smol"]),
                 "--sensitivity", str(gemma_sensitivity), "--seeds", str(real["seeds"]),
                 "--rank", str(RANK), "--alpha", str(ALPHA), "--out", str(out), "--quiet"])
    assert code in (0, None)
    return out, json.loads((out / "transfer.json").read_text())


def test_the_conversion_is_cached_and_keyed_by_the_file(real):
    from paratransfer.teacher.gguf import SOURCE_FILE, converted_folder, file_sha256

    for file, folder, model in ((real["gemma_file"], real["gemma"], GEMMA3_270M),
                                (real["smol_file"], real["smol"], SMOLLM2_135M)):
        assert file_sha256(file) == model.sha256 and folder.name == model.sha256
        assert converted_folder(file) == folder  # the second call finds the folder
        source = json.loads((folder / SOURCE_FILE).read_text())
        assert source["sha256"] == model.sha256 and "quantization" in source["note"]
        assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert json.loads((real["gemma"] / "config.json").read_text())["model_type"] == "gemma3_text"
    assert json.loads((real["smol"] / "config.json").read_text())["model_type"] == "llama"


def test_sensitivity_of_the_real_student_from_its_gguf_file(real, smol_sensitivity):
    sens = SensitivityFile(smol_sensitivity)
    meta = dict(sens.metadata)
    assert meta["teacher_gguf"]["sha256"] == SMOLLM2_135M.sha256
    assert int(meta["samples"]) == 3
    model = load_model(str(real["smol"]))
    assert meta["teacher_fingerprint"] == fingerprint(model)  # the file and its folder agree
    names = {n for n, _ in model.named_parameters()}
    assert names <= set(sens)
    layer0 = sens["model.layers.0.self_attn.q_proj.weight"]
    assert torch.isfinite(layer0).all() and layer0.sum() > 0


def test_gemma3_to_smollm2_maps_every_student_layer_in_order(forward_adapter):
    _, report = forward_adapter
    layers = report["selected_layers"]
    assert report["layer_rule"] == "depth" and len(layers) == 30
    assert layers == sorted(layers) and set(layers) == set(range(18))
    assert (report["teacher_family"], report["student_family"]) == ("gemma", "llama")
    assert report["vocabulary"]["coverage"] > 0.9
    assert report["teacher_gguf"]["sha256"] == GEMMA3_270M.sha256
    heads = [s for s in report["skipped"] if s["role"] == "head"]
    assert heads and "tied" in heads[0]["reason"]  # SmolLM2's head is tied to its embedding
    assert all(e["energy"] > 0 for e in report["modules"])


def test_every_arm_leaves_the_real_student_unchanged_at_lr_1e_12(real, forward_adapter):
    adapter, _ = forward_adapter
    tok = load_tokenizer(str(real["smol"]))
    prompts = prompts_for(tok, real["train"])
    want = logits(load_model(str(real["smol"])), prompts)
    for arm in ARMS:
        result = run_train(str(real["smol"]), real["train"], real["root"] / f"step0-{arm}",
                           TrainSettings(init=arm, lr=1e-12, **{**STEPS, "max_steps": 1}),
                           adapter_dir=adapter, progress=False)
        assert_unchanged(logits(result.model, prompts), want, arm)
        if arm != "standard":  # not vacuous: the base moved, the LoRA path carries it back
            with result.model.disable_adapter():
                assert (logits(result.model, prompts) - want).abs().max().item() > 1e-2, arm


@pytest.mark.parametrize("arm", ARMS)
def test_after_real_steps_export_equals_merged_and_live(arm, real, forward_adapter, tmp_path):
    from peft import PeftModel

    from paratransfer.adapter.merge import merged_model

    adapter, _ = forward_adapter
    tok = load_tokenizer(str(real["smol"]))
    prompts = prompts_for(tok, real["train"])
    out = tmp_path / arm
    result = run_train(str(real["smol"]), real["train"], out,
                       TrainSettings(init=arm, lr=2e-3, **STEPS), adapter_dir=adapter,
                       progress=False)
    live = logits(result.model, prompts)
    del result
    student = load_model(str(real["smol"]))
    assert (live - logits(student, prompts)).abs().max().item() > 1e-3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = PeftModel.from_pretrained(student, str(out))
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    assert_unchanged(logits(plain, prompts), live, "export")
    del plain, student
    merged, _ = merged_model(str(real["smol"]), out, dtype=torch.float32)
    assert_unchanged(logits(merged, prompts), live, "merged")
    summary = json.loads((out / "train.json").read_text())
    assert summary["init"] == arm


def test_evaluate_gsm8k_with_the_chat_template(real, tmp_path):
    from paratransfer.evaluate.run import EvalSettings, run_evaluate

    test = SHARED_DATA / "gsm8k" / "test.jsonl"
    if not test.is_file():
        test = tmp_path / "gsm8k.jsonl"
        test.write_text("".join(json.dumps({"question": f"What is {a} plus {a}?",
                                            "answer": f"{a} + {a} = {2 * a}\n#### {2 * a}"}) + "\n"
                                for a in (3, 12)))
    metrics = run_evaluate(str(real["smol_file"]), test, tmp_path / "eval",
                           EvalSettings(task="gsm", limit=2, batch_size=2, max_new_tokens=48,
                                        prompt_format="chat-template"), progress=False)
    assert metrics["model_gguf"]["sha256"] == SMOLLM2_135M.sha256
    rows = [json.loads(line) for line in
            (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["prompt"].startswith("<|im_start|>") for r in rows)
    assert all(r["output"].strip() for r in rows)  # the real instruct model says something
    assert metrics["metric"] == "exact_match" and 0.0 <= metrics["value"] <= 1.0


def test_reverse_direction_deeper_narrower_teacher(real, smol_sensitivity, tmp_path):
    """SmolLM2 (30 layers, width 576) -> Gemma 3 (18 layers, 640): sensitivity selects 18 of 30;
    narrower matrices are zero-padded only with --allow-pad; the student is unchanged at step 0."""
    from paratransfer.io.errors import UserError
    from paratransfer.train import build_lora_model, lora_targets, resolve_settings

    settings = dict(rank=RANK, alpha=ALPHA, min_vocab_coverage=0.1)
    with pytest.raises(UserError, match="--allow-pad"):
        run_extract(str(real["smol_file"]), str(real["gemma"]), tmp_path / "refused",
                    ExtractSettings(**settings), sensitivity_path=smol_sensitivity,
                    progress=False)
    report = run_extract(str(real["smol_file"]), str(real["gemma"]), tmp_path / "adapter",
                         ExtractSettings(**settings, allow_pad=True),
                         sensitivity_path=smol_sensitivity, progress=False)
    layers = report["selected_layers"]
    assert report["layer_rule"] == "sensitivity" and len(layers) == 18
    assert layers == sorted(set(layers)) and layers[-1] < 30
    assert report["padded"] and (report["teacher_family"], report["student_family"]) == (
        "llama", "gemma")

    tok = load_tokenizer(str(real["gemma"]))
    prompts = prompts_for(tok, real["train"], width=32)
    student = load_model(str(real["gemma"]))
    want = logits(student, prompts)
    adapter = inject.read_adapter(tmp_path / "adapter")
    from paratransfer.arch import arch_for

    train_settings = resolve_settings(TrainSettings(dropout=0.0), adapter, arch_for(student))
    specs, _ = lora_targets(student, train_settings.modules)
    model = build_lora_model(student, specs, train_settings, str(real["gemma"]))
    injected = inject.inject_transfer_init(model, adapter)
    assert injected["untied_head"] is True  # Gemma's tied head, untied before the embedding moves
    assert_unchanged(logits(model, prompts), want, "reverse")
