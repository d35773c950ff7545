"""`merge`: a standalone model folder that computes what student + adapter computes, loadable
by `AutoModelForCausalLM.from_pretrained` alone (tied GPT-2 included)."""

from __future__ import annotations

import json

import pytest
import torch

from paratransfer.cli.entry import main
from paratransfer.teacher.models import load_model
from tolerances import logits


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_model_computes_student_plus_adapter(family, capsys, model_pairs, adapters, tmp_path,
                                                    tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student_dir = model_pairs[family][1]
    out = tmp_path / "merged"
    code, stdout, _ = run_cli(capsys, "merge", "--student", student_dir, "--adapter",
                              adapters[family], "--out", out)
    assert code == 0 and f"wrote {out}" in stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", "merge.json"} <= {
        p.name for p in out.iterdir()}

    ids = torch.randint(7, len(tokenizer), (2, 40), generator=torch.Generator().manual_seed(0))
    want = logits(PeftModel.from_pretrained(load_model(str(student_dir)), str(adapters[family])), ids)
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert (logits(merged, ids) - want).abs().max().item() < 1e-4
    assert (want - logits(load_model(str(student_dir)), ids)).abs().max().item() > 1e-2
    assert AutoTokenizer.from_pretrained(str(out)).get_vocab() == tokenizer.get_vocab()

    if family == "gpt2":  # the embedding changed, the head did not: saved untied
        original = load_model(str(student_dir))
        assert merged.config.tie_word_embeddings is False
        assert torch.equal(merged.lm_head.weight, original.lm_head.weight)
        assert not torch.equal(merged.transformer.wte.weight, original.transformer.wte.weight)
        assert json.loads((out / "merge.json").read_text())["untied_head"] is True


def test_refuses_to_overwrite_without_flag(capsys, model_pairs, adapters, tmp_path):
    student = model_pairs["llama"][1]
    out = tmp_path / "merged"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, _, err = run_cli(capsys, "merge", "--student", student, "--adapter", adapters["llama"],
                           "--out", out)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "mine.txt").read_text() == "keep"
    code, _, _ = run_cli(capsys, "merge", "--student", student, "--adapter", adapters["llama"],
                         "--out", out, "--overwrite", "--dtype", "bfloat16")
    assert code == 0 and not (out / "mine.txt").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_adapter_that_does_not_fit(capsys, model_pairs, adapters, tmp_path):
    out = tmp_path / "merged"
    code, _, err = run_cli(capsys, "merge", "--student", model_pairs["llama"][0], "--adapter",
                           adapters["llama"], "--out", out)
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "model.embed_tokens.lora_embedding_B" in errors[0]
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
