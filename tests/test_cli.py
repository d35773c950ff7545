"""The command line: `python -m paratransfer` is `paratransfer`, and bad input gives one line
naming what is wrong, with nothing written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from paratransfer.cli.entry import main
from paratransfer.demo.tiny import save_tiny


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("Loading", "Writing"))
             and "it/s]" not in ln and "Warning" not in ln]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in errors[0], errors[0]


def nothing_written(out: Path) -> bool:
    """No output and no partial temp folder left beside it."""
    return not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))


def test_module_entry_point_matches_console_script():
    a = subprocess.run([sys.executable, "-m", "paratransfer", "--help"], capture_output=True, text=True)
    b = subprocess.run([str(Path(sys.executable).parent / "paratransfer"), "--help"],
                       capture_output=True, text=True)
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout and "extract" in a.stdout


def test_extract_via_cli(capsys, model_pairs, seeds_file, tmp_path):
    teacher, student = model_pairs["llama"]
    out = tmp_path / "adapter"
    code, stdout, _ = run_cli(capsys, "extract", "--teacher", teacher, "--student", student,
                              "--seeds", seeds_file, "--out", out, "--rank", "4", "--quiet")
    assert code == 0
    assert "teacher layers selected" in stdout
    report = json.loads((out / "transfer.json").read_text())
    assert len(report["selected_layers"]) == 2
    blocks = {m["name"]: m["svd"]["method"] for m in report["modules"]}
    krylov = sum(1 for v in blocks.values() if v == "krylov")
    assert re.search(rf"svd auto \([0-9.]+ s\): {krylov} certified by block Krylov", stdout)
    assert f"{len(blocks) - krylov} small enough for the exact SVD" in stdout


def _bad_seeds(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bad.jsonl"
    p.write_text(text)
    return p


GOOD = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'


@pytest.mark.parametrize("text,needle", [
    (GOOD + "{not json\n", "bad.jsonl:2"),
    (GOOD + '{"messages": []}\n', "bad.jsonl:2"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "bad.jsonl:1"),
])
def test_bad_seed_files(capsys, model_pairs, tmp_path, text, needle):
    teacher, student = model_pairs["llama"]
    out = tmp_path / "adapter"
    code, _, err = run_cli(capsys, "extract", "--teacher", teacher, "--student", student,
                           "--seeds", _bad_seeds(tmp_path, text), "--out", out, "--quiet")
    assert_one_line_error(code, err, needle)
    assert nothing_written(out)


def test_teacher_narrower_than_student(capsys, model_pairs, seeds_file, tmp_path):
    teacher, student = model_pairs["llama"]
    out = tmp_path / "adapter"
    code, _, err = run_cli(capsys, "extract", "--teacher", student, "--student", teacher,
                           "--seeds", seeds_file, "--out", out, "--quiet")
    assert_one_line_error(code, err)
    assert "fewer layers" in err or "smaller" in err
    assert nothing_written(out)


def test_teacher_narrower_but_deep_enough(capsys, model_pairs, seeds_file, tmp_path, tokenizer):
    from paratransfer.demo.tiny import tiny_model

    narrow = save_tiny(tiny_model("llama", vocab=len(tokenizer), hidden=24, layers=4, heads=4,
                                  kv_heads=2, mlp=48, seed=5), tokenizer, tmp_path / "narrow")
    out = tmp_path / "adapter"
    code, _, err = run_cli(capsys, "extract", "--teacher", narrow, "--student", model_pairs["llama"][1],
                           "--seeds", seeds_file, "--out", out, "--quiet")
    assert_one_line_error(code, err, "smaller than the student")
    assert nothing_written(out)


def test_rank_above_block_side(capsys, model_pairs, seeds_file, tmp_path):
    teacher, student = model_pairs["llama"]
    out = tmp_path / "adapter"
    code, _, err = run_cli(capsys, "extract", "--teacher", teacher, "--student", student,
                           "--seeds", seeds_file, "--out", out, "--rank", "17", "--quiet")
    assert_one_line_error(code, err, "--rank", "17")
    assert nothing_written(out)


def test_unknown_architecture(capsys, tmp_path, tokenizer, seeds_file, model_pairs):
    import torch
    from transformers import AutoModelForCausalLM, OPTConfig

    torch.manual_seed(0)
    opt = AutoModelForCausalLM.from_config(OPTConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, ffn_dim=32,
        num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=512,
        pad_token_id=1, bos_token_id=2, eos_token_id=3))
    folder = save_tiny(opt, tokenizer, tmp_path / "opt")
    out = tmp_path / "adapter"
    code, _, err = run_cli(capsys, "extract", "--teacher", folder, "--student", model_pairs["llama"][1],
                           "--seeds", seeds_file, "--out", out, "--quiet")
    assert_one_line_error(code, err, "unsupported architecture", "'opt'", "llama")
    assert nothing_written(out)


def test_existing_output_folder(capsys, model_pairs, seeds_file, tmp_path):
    teacher, student = model_pairs["llama"]
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, _, err = run_cli(capsys, "extract", "--teacher", teacher, "--student", student,
                           "--seeds", seeds_file, "--out", out, "--quiet")
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert (out / "mine.txt").read_text() == "keep"


def test_missing_model_folder(capsys, seeds_file, tmp_path, model_pairs):
    out = tmp_path / "adapter"
    code, _, err = run_cli(capsys, "extract", "--teacher", tmp_path / "nope", "--student",
                           model_pairs["llama"][1], "--seeds", seeds_file, "--out", out, "--quiet")
    assert_one_line_error(code, err, "nope")
    assert nothing_written(out)


def test_sensitivity_for_another_teacher_refused_unless_forced(capsys, model_pairs, seeds_file, tmp_path):
    teacher, student = model_pairs["llama"]
    other_teacher = model_pairs["qwen2"][0]
    sens = tmp_path / "sens.safetensors"
    assert run_cli(capsys, "sensitivity", "--teacher", other_teacher, "--seeds", seeds_file,
                   "--out", sens, "--quiet")[0] == 0
    out = tmp_path / "adapter"
    code, _, err = run_cli(capsys, "extract", "--teacher", teacher, "--student", student,
                           "--sensitivity", sens, "--out", out, "--quiet")
    assert_one_line_error(code, err, "--force", str(sens))
    assert nothing_written(out)


def test_unknown_strategy_names(capsys, model_pairs, seeds_file, tmp_path):
    teacher, student = model_pairs["llama"]
    for flag, value in [("--layers", "best"), ("--reduce", "blocks"), ("--svd", "qr"),
                        ("--modules", "attn,ffn")]:
        code, _, err = run_cli(capsys, "extract", "--teacher", teacher, "--student", student,
                               "--seeds", seeds_file, "--out", tmp_path / "a", flag, value)
        assert_one_line_error(code, err, flag, value.split(",")[-1])


def test_model_paths_and_tokenizers_are_named_plainly(capsys, model_pairs, seeds_file, tmp_path):
    """A missing local folder is "no such folder" (not a failed hub download), a folder without
    tokenizer files says so (not a garbled tokenizer error)."""
    import shutil

    teacher, student = model_pairs["llama"]
    for missing, needle in ((tmp_path / "nope", "no such folder (expected a model folder"),
                            ("./models/nope", "no such folder (expected a model folder"),
                            ("models/nope", "no such folder, and no")):
        code, _, err = run_cli(capsys, "extract", "--teacher", missing, "--student", student,
                               "--seeds", seeds_file, "--out", tmp_path / "a", "--quiet")
        assert_one_line_error(code, err, needle)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(student / name, bare / name)
    code, _, err = run_cli(capsys, "evaluate", "--model", bare, "--task", "gsm", "--data",
                           seeds_file, "--out", tmp_path / "e", "--quiet")
    assert_one_line_error(code, err, "bare: no tokenizer in this folder")
    assert nothing_written(tmp_path / "a") and nothing_written(tmp_path / "e")


def test_same_model_as_teacher_and_student_is_pointed_out(capsys, model_pairs, seeds_file,
                                                          tmp_path):
    student = model_pairs["llama"][1]
    code, _, err = run_cli(capsys, "extract", "--teacher", student, "--student", student,
                           "--seeds", seeds_file, "--out", tmp_path / "a", "--rank", "4",
                           "--quiet")
    assert code == 0
    assert "note: " in err and "are the same model" in err
