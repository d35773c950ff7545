"""Distillation (`train --distill TEACHER`): the loss, its limits, and the arm in a recipe."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from paratransfer.demo.tiny import marker_tokenizer, save_tiny, tiny_model
from paratransfer.demo.world import arithmetic_records, write_jsonl
from paratransfer.experiment.recipe import load_recipe
from paratransfer.experiment.runner import run_experiment
from paratransfer.io.errors import UserError
from paratransfer.train import TrainSettings, run_train
from paratransfer.train.objectives import kl_sum

FAST = dict(init="standard", lr=1e-2, batch_size=4, micro_batch_size=2, max_length=160,
            max_steps=4, dropout=0.0, rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("distill") / "train.jsonl",
                       arithmetic_records(8, seed=3))


def adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_weight_zero_is_step_for_step_the_lora_arm(model_pairs, train_file, tmp_path):
    teacher, student = (str(p) for p in model_pairs["llama"])
    plain = run_train(student, train_file, tmp_path / "lora", TrainSettings(**FAST), progress=False)
    zero = run_train(student, train_file, tmp_path / "d0",
                     TrainSettings(**FAST, distill=teacher, distill_weight=0.0), progress=False)
    assert [h["loss"] for h in zero.summary["history"]] == [h["loss"] for h in plain.summary["history"]]
    a, b = adapter(tmp_path / "lora"), adapter(tmp_path / "d0")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # ... and the term it weighs is real: with λ = 0.5 the run differs.
    half = run_train(student, train_file, tmp_path / "d5",
                     TrainSettings(**FAST, distill=teacher), progress=False)
    assert all(h["kl"] > 0 for h in half.summary["history"])
    assert half.summary["history"][-1]["loss"] != plain.summary["history"][-1]["loss"]
    assert half.summary["distill"]["teacher_parameters"] > 0
    assert half.summary["timing"]["distill_cost"]["teacher_seconds_per_step"] > 0


def test_the_student_as_its_own_teacher_has_no_kl_at_the_first_step(model_pairs, train_file,
                                                                     tmp_path):
    student = str(model_pairs["llama"][1])
    run = run_train(student, train_file, tmp_path / "self",
                    TrainSettings(**{**FAST, "max_steps": 2}, distill=student), progress=False)
    first = run.summary["history"][0]
    assert abs(first["kl"]) < 1e-6  # standard init: B = 0, the LoRA student is the student
    assert first["loss"] == pytest.approx(0.5 * first["ce"], rel=1e-6)


def test_kl_term_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    tau = 2.0
    want = 0.0
    for b in range(2):
        for i in range(4):  # position i predicts token i + 1
            if labels[b, i + 1] == -100:
                continue
            p = torch.softmax(teacher[b, i, :6].double() / tau, -1)  # vocab 6 of 7 logits
            q = torch.softmax(student[b, i, :6].double() / tau, -1)
            want += float((p * (p.log() - q.log())).sum())
    got = float(kl_sum(student, teacher, labels, tau, vocab=6))
    assert got == pytest.approx(want, rel=1e-5)


def test_a_teacher_with_another_vocabulary_is_refused(model_pairs, train_file, tmp_path):
    other = marker_tokenizer()
    teacher = save_tiny(tiny_model("llama", vocab=len(other), hidden=16, layers=1, heads=2),
                        other, tmp_path / "other-teacher")
    with pytest.raises(UserError, match="another vocabulary") as e:
        run_train(str(model_pairs["llama"][1]), train_file, tmp_path / "x",
                  TrainSettings(**FAST, distill=str(teacher)), progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


def test_a_student_whose_logits_miss_added_tokens_is_refused_before_training(tmp_path):
    """The shared tokenizer has two added tokens; the teacher's embedding was resized for them,
    the student's not. Equal vocabularies, but the student has two logits fewer than the KL
    compares: refused by name before any step, not a shape error at step 1 (issue 23, item 12)."""
    tok = marker_tokenizer()
    assert tok.add_tokens(["<extra-one>", "<extra-two>"]) == 2
    torch.manual_seed(0)
    teacher = save_tiny(tiny_model("llama", vocab=len(tok), hidden=16, layers=1, heads=2), tok,
                        tmp_path / "teacher")
    student = save_tiny(tiny_model("llama", vocab=len(tok) - 2, hidden=16, layers=1, heads=2),
                        tok, tmp_path / "student")
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_records(4, seed=3))
    with pytest.raises(UserError, match=r"the student's output layer has \d+ rows for the "
                                        r"tokenizer's \d+ tokens") as e:
        run_train(str(student), data, tmp_path / "x",
                  TrainSettings(**FAST, distill=str(teacher)), progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


def test_resume_mid_run_gives_the_same_adapter(model_pairs, train_file, tmp_path):
    teacher, student = (str(p) for p in model_pairs["llama"])
    settings = TrainSettings(**FAST, distill=teacher, checkpoint_every=2)
    whole = run_train(student, train_file, tmp_path / "whole", settings, progress=False)
    run_train(student, train_file, tmp_path / "part", settings, progress=False, stop_after=2)
    resumed = run_train(student, train_file, tmp_path / "part", settings, progress=False,
                        resume=True)
    assert [h["kl"] for h in resumed.summary["history"]] == pytest.approx(
        [h["kl"] for h in whole.summary["history"]], abs=1e-6)
    a, b = adapter(tmp_path / "whole"), adapter(tmp_path / "part")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    with pytest.raises(UserError, match="distill"):
        run_train(student, train_file, tmp_path / "part", replace(settings, distill_weight=0.3),
                  progress=False, resume=True)


def test_recipe_with_a_distill_arm_gives_paired_intervals_against_lora(model_pairs, seeds_file,
                                                                       tmp_path):
    teacher, student = model_pairs["llama"]
    recipe = {
        "teacher": str(teacher), "student": str(student),
        "task": {"type": "gsm", "seeds": str(seeds_file),
                 "train": str(write_jsonl(tmp_path / "train.jsonl", arithmetic_records(8, seed=5))),
                 "eval": str(write_jsonl(tmp_path / "test.jsonl", arithmetic_records(3, seed=6)))},
        "seeds": [1, 2], "arms": {"transfer": {}, "lora": {"init": "standard"},
                                  "distill": {"init": "standard", "distill": True}},
        "rank": 4, "alpha": 8, "max_length": 160, "max_steps": 2, "batch_size": 4,
        "micro_batch_size": 4, "limit": 3, "max_new_tokens": 4, "eval_batch_size": 4,
        "lr": 1e-2, "dtype": "float32", "device": "cpu",
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_experiment(load_recipe(path), tmp_path / "run", progress=False,
                            log=lambda line: None)
    rows = {r["arm"]: r for r in result["arms"]}
    assert rows["distill"]["vs_lora"]["n"] == rows["transfer"]["vs_lora"]["n"] == 2
    assert {"distill − lora", "transfer − distill"} <= {c["contrast"] for c in result["contrasts"]}
    info = json.loads((tmp_path / "run" / "arms" / "distill" / "seed-1" / "train" /
                       "train.json").read_text())
    assert info["settings"]["distill"] == str(teacher) and info["init"] == "standard"
    # distillation is an arm, never the recipe's (and so the baseline's) setting
    path.write_text(yaml.safe_dump({**recipe, "distill": True}))
    with pytest.raises(UserError, match="give distillation as an arm"):
        load_recipe(path)
