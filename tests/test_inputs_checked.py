"""Inputs that used to reach a library and come back as a traceback (issue 23): a lone
surrogate in a JSONL record, seeds past 64 bits, an empty --modules, a record far longer than
anything that is trained on. Each is one line naming the file, line or flag, before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from paratransfer.cli.entry import main
from paratransfer.demo.world import arithmetic_records, write_jsonl
from paratransfer.io.errors import UserError

HUGE_SEED = 1180591620717411303424  # 2**70


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line_error(code: int, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def with_surrogate(path: Path) -> Path:
    """Two good records, then one whose user turn holds a lone surrogate (valid JSON)."""
    records = arithmetic_records(3, seed=11)
    lines = [json.dumps(r) for r in records[:2]]
    bad = json.dumps(records[2]).replace("Question", "Question \\ud800", 1)
    assert "\\ud800" in bad
    path.write_text("\n".join([*lines, bad]) + "\n", encoding="utf-8")
    return path


def test_a_lone_surrogate_is_named_by_file_and_line(capsys, model_pairs, tmp_path):
    teacher, student = model_pairs["llama"]
    data = with_surrogate(tmp_path / "data.jsonl")
    for argv in (["sensitivity", "--teacher", teacher, "--seeds", data, "--out",
                  tmp_path / "s.safetensors", "--quiet"],
                 ["train", "--student", student, "--data", data, "--init", "standard",
                  "--out", tmp_path / "run", "--quiet"],
                 ["evaluate", "--model", student, "--task", "gsm", "--data", data, "--out",
                  tmp_path / "ev", "--quiet"]):
        line = one_line_error(*run_cli(capsys, *argv))
        assert f"{data}:3: a string holds the lone surrogate \\ud800" in line, (argv, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_a_lone_surrogate_fails_a_recipe_before_any_work(model_pairs, seeds_file, tmp_path):
    from paratransfer.experiment.recipe import load_recipe
    from paratransfer.experiment.runner import run_experiment

    teacher, student = model_pairs["llama"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "teacher": str(teacher), "student": str(student), "seeds": [1],
        "task": {"type": "gsm", "seeds": str(seeds_file),
                 "train": str(with_surrogate(tmp_path / "train.jsonl")),
                 "eval": str(write_jsonl(tmp_path / "eval.jsonl", arithmetic_records(2, seed=4)))},
        "rank": 4, "max_steps": 1, "batch_size": 2, "micro_batch_size": 2, "max_length": 128,
        "device": "cpu", "dtype": "float32"}))
    started: list[str] = []
    with pytest.raises(UserError, match=r"train\.jsonl:3: a string holds the lone surrogate"):
        run_experiment(load_recipe(recipe), tmp_path / "run", progress=False,
                       on_step=started.append)
    assert started == [] and not (tmp_path / "run").exists()


def test_seeds_past_64_bits_are_refused_before_any_work(capsys, model_pairs, seeds_file,
                                                        tmp_path):
    teacher, student = model_pairs["llama"]
    cases = [["train", "--student", student, "--data", seeds_file, "--init", "standard",
              "--out", tmp_path / "run", "--seed", HUGE_SEED, "--quiet"],
             ["extract", "--teacher", teacher, "--student", student, "--seeds", seeds_file,
              "--layers", "random", "--out", tmp_path / "ad", "--seed", HUGE_SEED, "--quiet"],
             ["stability", "--teacher", teacher, "--student", student, "--seeds", seeds_file,
              "--out", tmp_path / "st", "--seed", HUGE_SEED, "--quiet"],
             ["train", "--student", student, "--data", seeds_file, "--init", "standard",
              "--out", tmp_path / "run", "--seed", -1, "--quiet"]]
    for argv in cases:
        line = one_line_error(*run_cli(capsys, *argv))
        assert "--seed: must be between 0 and 2**63-1" in line, (argv, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_recipe_seeds_past_64_bits_are_refused_when_read(model_pairs, seeds_file, tmp_path):
    from paratransfer.experiment.recipe import load_recipe

    teacher, student = model_pairs["llama"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "teacher": str(teacher), "student": str(student), "seeds": [1, HUGE_SEED],
        "task": {"type": "gsm", "seeds": str(seeds_file), "train": str(seeds_file),
                 "eval": str(seeds_file)}}))
    with pytest.raises(UserError, match=r"r\.yaml: seeds: must be between 0 and 2\*\*63-1"):
        load_recipe(recipe)


def test_the_largest_seed_is_usable(model_pairs, seeds_file, tmp_path):
    """2**63-1 itself is a valid seed for every generator a step derives from it."""
    from paratransfer.extract.plan import ExtractSettings
    from paratransfer.stability.pool import draw_subsets
    from paratransfer.train import TrainSettings, run_train

    top = 2**63 - 1
    subsets = draw_subsets(6, [2, 3], 2, top)
    assert [len(s) for s in subsets[2] + subsets[3]] == [2, 2, 3, 3]
    assert ExtractSettings(seed=top).seed == top
    student = model_pairs["llama"][1]
    run_train(str(student), seeds_file, tmp_path / "run",
          TrainSettings(init="standard", seed=top, max_steps=1, batch_size=2,
                        micro_batch_size=2, max_length=512, rank=2), device="cpu", progress=False)
    assert json.loads((tmp_path / "run" / "train.json").read_text())["settings"]["seed"] == top


class _Spy:
    """A tokenizer that records how many characters each call was given."""

    def __init__(self, tokenizer):
        self._tok, self.sizes = tokenizer, []

    def __call__(self, text, **kw):
        self.sizes.append(len(text))
        return self._tok(text, **kw)

    def __len__(self):
        return len(self._tok)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_a_huge_record_costs_only_the_length_that_matters(tokenizer):
    """A multi-megabyte one-line record is tokenized only up to a cap derived from
    --max-length (issue 23, item 17), and gives the tokens the whole text gives."""
    from paratransfer.tasks.examples import example_from_record, tokenize_example

    words = " ".join(f"w{i % 97}" for i in range(100_000))  # ~400 kB
    huge = example_from_record({"messages": [{"role": "user", "content": "Question: " + words},
                                             {"role": "assistant", "content": "So 1."}]},
                               source="x.jsonl:1", default_id="x")
    spy = _Spy(tokenizer)
    capped = tokenize_example(huge, spy, max_length=64)
    assert max(spy.sizes) < 40_000  # not the 400 kB, twice
    whole = tokenizer(huge.messages[0]["content"])  # the reference, in full
    assert len(whole["input_ids"]) > 64
    # the same tokens as the uncapped computation: render + tokenize the whole text
    from paratransfer.tasks.examples import render

    prompt, answer = render(huge, tokenizer)
    full_ids = list(tokenizer(prompt + answer)["input_ids"])[:64]
    assert capped["input_ids"] == full_ids and all(x == -100 for x in capped["labels"])
    # an answer inside the cap is found exactly as before
    short = example_from_record({"messages": [{"role": "user", "content": "Question: w1 w2"},
                                              {"role": "assistant", "content": words[:100_000]}]},
                                source="y.jsonl:1", default_id="y")
    spy.sizes.clear()
    tokens = tokenize_example(short, spy, max_length=64)
    prompt, answer = render(short, tokenizer)
    ids = list(tokenizer(prompt + answer)["input_ids"])
    boundary = len(tokenizer(prompt)["input_ids"])
    assert tokens["input_ids"] == ids[:64]
    assert tokens["labels"] == ([-100] * boundary + ids[boundary:])[:64]
    assert max(spy.sizes) < 40_000


def test_an_empty_modules_list_is_refused_alike(capsys, tmp_path):
    """`--modules ''` names no module for train as for extract (issue 23, item 19): both refuse
    it in one line, before anything is read."""
    for argv in (["train", "--student", tmp_path / "s", "--data", tmp_path / "d.jsonl",
                  "--out", tmp_path / "o", "--modules", ""],
                 ["extract", "--teacher", tmp_path / "t", "--student", tmp_path / "s",
                  "--seeds", tmp_path / "d.jsonl", "--out", tmp_path / "o", "--modules", ""]):
        line = one_line_error(*run_cli(capsys, *argv))
        assert "--modules: no module named" in line, (argv, line)
