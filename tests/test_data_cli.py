"""`paratransfer data` end to end: a tiny GSM8K-shaped dataset saved locally becomes files that
`extract`, `train` and `evaluate` take, run on the tiny test models. Offline throughout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from paratransfer.cli.entry import main


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def gsm8k_dir(tmp_path_factory) -> Path:
    """GSM8K's shape (question, answer with <<calc>> and "#### N"), short enough for tiny models."""
    def rows(n, start):
        return [{"question": f"{a} + {a + 1}?",
                 "answer": f"{a} + {a + 1} = <<{a}+{a + 1}={2 * a + 1}>>{2 * a + 1}\n#### {2 * a + 1}"}
                for a in range(start, start + n)]

    folder = tmp_path_factory.mktemp("hub") / "gsm8k"
    DatasetDict({"train": Dataset.from_list(rows(10, 1)), "test": Dataset.from_list(rows(3, 50))}
                ).save_to_disk(str(folder))
    return folder


def test_data_then_extract_train_evaluate(capsys, gsm8k_dir, model_pairs, tmp_path):
    data = tmp_path / "data"
    code, out, err = run(capsys, "data", "gsm", "--from", gsm8k_dir, "--out", data,
                         "--seeds-count", "3", "--train-count", "6", "--quiet")
    assert code == 0, err
    assert out.strip() == (f"wrote {data}: 3 seeds, 6 train, 3 eval records (gsm from {gsm8k_dir}; "
                           "evaluate with --task gsm)")
    teacher, student = model_pairs["llama"]
    adapter = tmp_path / "adapter"
    code, _, err = run(capsys, "extract", "--teacher", teacher, "--student", student,
                       "--seeds", data / "seeds.jsonl", "--out", adapter, "--rank", "4", "--quiet")
    assert code == 0, err
    assert len(json.loads((adapter / "transfer.json").read_text())["selected_layers"]) == 2
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--student", student, "--data", data / "train.jsonl",
                         "--init", "transfer", "--adapter", adapter, "--out", run_dir,
                         "--batch-size", "2", "--micro-batch-size", "2", "--max-steps", "2",
                         "--max-length", "128", "--quiet")
    assert code == 0, err
    assert json.loads((run_dir / "train.json").read_text())["steps_done"] == 2
    results = tmp_path / "results"
    code, out, err = run(capsys, "evaluate", "--model", student, "--adapter", run_dir,
                         "--task", "gsm", "--data", data / "eval.jsonl", "--out", results,
                         "--max-new-tokens", "4", "--batch-size", "3", "--quiet")
    assert code == 0, err
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["n"] == 3
    golds = [json.loads(line)["gold"] for line in (results / "predictions.jsonl").open()]
    assert golds == ["101", "103", "105"]


def test_data_refusals_are_one_line(capsys, gsm8k_dir, tmp_path):
    out = tmp_path / "data"
    assert run(capsys, "data", "gsm", "--from", gsm8k_dir, "--out", out, "--seeds-count", "2",
               "--train-count", "4")[0] == 0
    code, _, err = run(capsys, "data", "gsm", "--from", gsm8k_dir, "--out", out)
    assert code == 2 and err.strip() == f"error: {out}: already exists (pass --overwrite to replace it)"
    for argv, needle in (
        (["--eval-count", "some"], "error: --eval-count: 'some' is not a number (expected N or all)"),
        (["--train-count", "11"], f"error: --train-count 11: split 'train' of {gsm8k_dir} has only 10 rows"),
        (["--columns", "answer=solution"], "has no column 'solution' for field answer"),
    ):
        code, _, err = run(capsys, "data", "gsm", "--from", gsm8k_dir, "--out", tmp_path / "x",
                           "--seeds-count", "2", *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "x").exists()
    # the hub form, offline: one line naming the dataset, nothing fetched
    code, _, err = run(capsys, "data", "gsm", "--from", "openai/gsm8k", "--out", tmp_path / "x")
    assert code == 2 and err.startswith("error: openai/gsm8k: could not load it: ")


def test_help_shows_the_hub_form(capsys):
    with pytest.raises(SystemExit):
        main(["data", "--help"])
    text = capsys.readouterr().out
    assert "paratransfer data gsm --from openai/gsm8k --out data/gsm" in text
    assert "--from cais/mmlu --config all" in text
