"""Training: the run's adapter computes what the trained model computes (alone on the original
student and merged), both arms see the same batches, resume is exact, two processes train the
same thing as one, and bad input is a one-line error with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ADAPTER_ALPHA, ADAPTER_RANK
from paratransfer.cli.entry import main
from paratransfer.demo.world import arithmetic_records, write_jsonl
from paratransfer.tasks.examples import IGNORE_INDEX
from paratransfer.teacher.models import load_model
from paratransfer.train import (
    TrainSettings,
    answer_loss_sum,
    batch_digest,
    batch_indices,
    epoch_order,
    learning_rate,
    micro_batches,
    run_train,
)
from tolerances import logits

RANK, ALPHA = ADAPTER_RANK, ADAPTER_ALPHA  # the shared `adapters` fixture's
#: Small and fast: 10 examples, effective batch 4 (3 steps per epoch, the last one of 2).
FAST = dict(lr=1e-2, batch_size=4, micro_batch_size=2, max_length=160, max_steps=4)



@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("train-data") / "train.jsonl",
                       arithmetic_records(10, seed=3))


@pytest.fixture(scope="module")
def prompts(tokenizer) -> torch.Tensor:
    from paratransfer.tasks.examples import load_tokenized

    path = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm" / "sample_gsm.jsonl"
    if path.exists():
        rows = [t["input_ids"][:80] for t in load_tokenized(path, tokenizer, limit=3)]
    else:
        rows = [[4 + (7 * i + j) % 90 for j in range(80)] for i in range(3)]
    width = min(len(r) for r in rows)
    return torch.tensor([r[:width] for r in rows])


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}*"))


# --------------------------------------------------------------------------- pure parts


def test_batch_order_depends_on_seed_and_epoch_only():
    assert epoch_order(10, 1, 0) == epoch_order(10, 1, 0)
    assert sorted(epoch_order(10, 1, 0)) == list(range(10))
    assert epoch_order(10, 1, 0) != epoch_order(10, 1, 1) != epoch_order(10, 2, 1)
    first_epoch = [i for step in range(3) for i in batch_indices(10, 4, 1, step)]
    assert first_epoch == epoch_order(10, 1, 0) and len(batch_indices(10, 4, 1, 2)) == 2
    assert batch_indices(10, 4, 1, 3) == epoch_order(10, 1, 1)[:4]


def test_micro_batches_split_the_batch_across_processes():
    batch = [5, 3, 8, 1, 9]
    shares = [micro_batches(batch, 2, rank, 2) for rank in range(2)]
    assert shares == [[[5, 8], [9]], [[3, 1]]]
    assert sorted(i for s in shares for mb in s for i in mb) == sorted(batch)


def test_learning_rate_warmup_then_linear_decay():
    assert learning_rate(0, 100, 3, 1.0) == 0.0
    assert learning_rate(2, 100, 3, 1.0) == pytest.approx(2 / 3)
    assert learning_rate(3, 100, 3, 1.0) == 1.0
    assert learning_rate(51, 100, 3, 1.0) == pytest.approx(49 / 97)
    assert learning_rate(0, 10, 0, 2.0) == 2.0


def test_loss_counts_answer_tokens_only():
    torch.manual_seed(0)
    logits_ = torch.randn(1, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5]])
    want = sum(torch.nn.functional.cross_entropy(logits_[0, t - 1], labels[0, t]) for t in (2, 3, 4))
    assert answer_loss_sum(logits_, labels).item() == pytest.approx(want.item(), rel=1e-6)
    prompt_changed = logits_.clone()
    prompt_changed[0, 0] += 100.0  # predicts a prompt token: must not matter
    assert answer_loss_sum(prompt_changed, labels).item() == pytest.approx(want.item(), rel=1e-6)


def test_settings_are_checked():
    with pytest.raises(Exception, match="--micro-batch-size"):
        TrainSettings(batch_size=4, micro_batch_size=8)
    with pytest.raises(Exception, match="--init"):
        TrainSettings(init="unknown")


# --------------------------------------------------------------------------- runs


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapter_merged_and_in_memory_models_agree(family, model_pairs, adapters, train_file,
                                                   prompts, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from paratransfer.adapter.merge import run_merge

    student_dir = model_pairs[family][1]
    out = tmp_path / "run"
    result = run_train(str(student_dir), train_file, out, TrainSettings(**FAST),
                       adapter_dir=adapters[family], progress=False)
    trained = logits(result.model, prompts)
    original = logits(load_model(str(student_dir)), prompts)
    assert (trained - original).abs().max().item() > 1e-2  # training moved the model

    plain = PeftModel.from_pretrained(load_model(str(student_dir)), str(out))
    assert (logits(plain, prompts) - trained).abs().max().item() < 1e-4
    merged_dir = tmp_path / "merged"
    run_merge(str(student_dir), out, merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    assert (logits(merged, prompts) - trained).abs().max().item() < 1e-4

    info = json.loads((out / "train.json").read_text())
    assert info["complete"] and info["steps_done"] == 4 and info["seed"] == 1
    assert info["adapter_rank"] == 2 * RANK
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2 * RANK
    assert [h["step"] for h in info["history"]] == [1, 2, 3, 4]
    assert all(h["loss"] > 0 for h in info["history"])
    assert info["injection"]["untied_head"] is (family == "gpt2")
    assert (out / "loss.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def arm_runs(model_pairs, adapters, train_file, tmp_path_factory) -> dict:
    """The same command in both arms (dropout 0): transfer through the CLI, standard in-process."""
    student = model_pairs["llama"][1]
    root = tmp_path_factory.mktemp("arms")
    code = main(["train", "--student", str(student), "--data", str(train_file),
                 "--out", str(root / "transfer"), "--init", "transfer",
                 "--adapter", str(adapters["llama"]), "--lr", "1e-2", "--batch-size", "4",
                 "--micro-batch-size", "2", "--max-length", "160", "--max-steps", "4",
                 "--dropout", "0", "--quiet"])
    assert code == 0
    run_train(str(student), train_file, root / "standard",
              TrainSettings(init="standard", dropout=0.0, **FAST), adapter_dir=adapters["llama"],
              progress=False)
    return {arm: json.loads((root / arm / "train.json").read_text()) | {"dir": root / arm}
            for arm in ("transfer", "standard")}


def test_arms_see_the_same_batches_in_the_same_order(arm_runs):
    t, s = arm_runs["transfer"]["history"], arm_runs["standard"]["history"]
    want = [batch_digest(batch_indices(10, 4, 1, step)) for step in range(4)]
    assert [h["batch"] for h in t] == [h["batch"] for h in s] == want
    assert [h["answer_tokens"] for h in t] == [h["answer_tokens"] for h in s]
    # Same settings apart from the init; both start from the student's own function ...
    ts, ss = arm_runs["transfer"]["settings"], arm_runs["standard"]["settings"]
    assert {k: v for k, v in ts.items() if k != "init"} == {k: v for k, v in ss.items() if k != "init"}
    assert t[0]["loss"] == pytest.approx(s[0]["loss"], abs=1e-5)
    # ... and then train differently.
    assert abs(t[-1]["loss"] - s[-1]["loss"]) > 1e-4
    assert arm_runs["standard"]["adapter_rank"] == RANK


def test_resume_gives_the_same_adapter(model_pairs, adapters, train_file, tmp_path):
    student = str(model_pairs["llama"][1])
    settings = TrainSettings(**FAST, checkpoint_every=3)  # dropout 0.05: RNG must line up too
    run_train(student, train_file, tmp_path / "whole", settings, adapter_dir=adapters["llama"],
              progress=False)
    part = tmp_path / "part"
    stopped = run_train(student, train_file, part, settings, adapter_dir=adapters["llama"],
                        progress=False, stop_after=2)
    assert not stopped.complete
    assert not (part / "train.json").exists() and not (part / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step-000002"]
    run_train(student, train_file, part, settings, adapter_dir=adapters["llama"], progress=False,
              resume=True)
    a = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    whole = json.loads((tmp_path / "whole" / "train.json").read_text())
    resumed = json.loads((part / "train.json").read_text())
    assert resumed["timing"]["resumed_from"] == [2]
    assert [h["loss"] for h in resumed["history"]] == pytest.approx(
        [h["loss"] for h in whole["history"]], abs=1e-6)


def test_two_processes_train_what_one_does(model_pairs, adapters, train_file, arm_runs, tmp_path):
    """torchrun, gloo on CPU: micro-batches of 1 on each of 2 processes = one process's step."""
    from peft import PeftModel

    student = model_pairs["llama"][1]
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    env.pop("OMP_WAIT_POLICY", None)  # each child's CLI entry sets it
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "paratransfer", "train",
         "--student", str(student), "--data", str(train_file), "--out", str(out),
         "--adapter", str(adapters["llama"]), "--lr", "1e-2", "--batch-size", "4",
         "--micro-batch-size", "1", "--max-length", "160", "--max-steps", "4", "--dropout", "0",
         "--quiet"],
        capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # rank 0 writes and reports
    info = json.loads((out / "train.json").read_text())
    assert info["world_size"] == 2
    # each child runs the CLI's entry: one thread (OMP_NUM_THREADS), OpenMP threads that sleep
    assert info["runtime"]["threads"] == 1 and info["runtime"]["omp_wait_policy"] == "PASSIVE"
    PeftModel.from_pretrained(load_model(str(student)), str(out))  # loads
    one = load_file(str(arm_runs["transfer"]["dir"] / "adapter_model.safetensors"))
    two = load_file(str(out / "adapter_model.safetensors"))
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4
    assert [h["loss"] for h in info["history"]] == pytest.approx(
        [h["loss"] for h in arm_runs["transfer"]["history"]], abs=1e-5)


# --------------------------------------------------------------------------- bad input


def test_adapter_that_does_not_fit(capsys, model_pairs, adapters, train_file, tmp_path):
    out = tmp_path / "run"
    wider = model_pairs["llama"][0]  # not the student the adapter was extracted for
    code, _, err = run_cli(capsys, "train", "--student", wider, "--data", train_file, "--out", out,
                           "--adapter", adapters["llama"], "--quiet")
    msg = one_line_error(err)
    assert code == 2 and "model.embed_tokens.lora_embedding_B" in msg and "[48, 4]" in msg
    assert nothing_written(out)


def test_empty_training_file(capsys, model_pairs, adapters, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--student", model_pairs["llama"][1], "--data", empty,
                           "--out", out, "--adapter", adapters["llama"], "--quiet")
    assert code == 2 and "empty.jsonl: no records" in one_line_error(err)
    assert nothing_written(out)


def test_resume_with_nothing_to_resume(capsys, model_pairs, adapters, train_file, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--student", model_pairs["llama"][1], "--data",
                           train_file, "--out", out, "--adapter", adapters["llama"], "--resume",
                           "--quiet")
    assert code == 2 and "nothing to resume" in one_line_error(err)
    assert nothing_written(out)


def test_transfer_without_adapter(capsys, model_pairs, train_file, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--student", model_pairs["llama"][1], "--data",
                           train_file, "--out", out, "--quiet")
    assert code == 2 and "--adapter" in one_line_error(err)
    assert nothing_written(out)


def test_existing_run_and_changed_resume(capsys, model_pairs, adapters, train_file, arm_runs):
    done = arm_runs["standard"]["dir"]
    before = (done / "train.json").read_text()
    common = ["train", "--student", model_pairs["llama"][1], "--data", train_file, "--out", done,
              "--adapter", adapters["llama"], "--init", "standard", "--quiet"]
    code, _, err = run_cli(capsys, *common)
    assert code == 2 and "--resume" in one_line_error(err) and "--overwrite" in err
    code, _, err = run_cli(capsys, *common, "--resume", "--lr", "1e-2", "--batch-size", "4",
                           "--micro-batch-size", "2", "--max-length", "160", "--max-steps", "4")
    assert code == 2 and "setting dropout" in one_line_error(err)
    assert (done / "train.json").read_text() == before


# --------------------------------------------------------------------------- held-out curves


def test_heldout_loss_is_recorded_at_the_requested_steps_and_falls(model_pairs, adapters,
                                                                    train_file, tmp_path):
    from dataclasses import replace

    from paratransfer.train import load_examples
    from paratransfer.train.batches import collate

    student = str(model_pairs["llama"][1])
    heldout = write_jsonl(tmp_path / "heldout.jsonl", arithmetic_records(6, seed=9))
    settings = TrainSettings(**{**FAST, "max_steps": 5}, eval_every=2, dropout=0.0)
    scored = run_train(student, train_file, tmp_path / "a", settings,
                       adapter_dir=adapters["llama"], progress=False, eval_data=heldout)
    curve = scored.summary["heldout_history"]
    assert [h["step"] for h in curve] == [0, 2, 4, 5]
    assert curve[-1]["loss"] < curve[0]["loss"] - 0.05  # it moves with training
    assert scored.summary["heldout"]["examples"] == 6

    # Step 0 is the untrained student's own answer-only loss on those examples (oracle).
    from paratransfer.teacher.models import load_tokenizer

    examples, _ = load_examples(heldout, load_tokenizer(student), "tulu", 160)
    batch = collate(examples, list(range(len(examples))), 1)
    with torch.no_grad():
        out = load_model(student)(input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"]).logits
    want = answer_loss_sum(out, batch["labels"]).item() / sum(e.answer_tokens for e in examples)
    assert curve[0]["loss"] == pytest.approx(want, rel=1e-5)

    # Scoring draws nothing from the random stream: training is the same without it.
    plain = run_train(student, train_file, tmp_path / "b", replace(settings, eval_every=None),
                      adapter_dir=adapters["llama"], progress=False)
    assert [h["loss"] for h in plain.summary["history"]] == \
        [h["loss"] for h in scored.summary["history"]]

    # An interrupted run resumes to the same curve.
    part = tmp_path / "part"
    run_train(student, train_file, part, replace(settings, checkpoint_every=3),
              adapter_dir=adapters["llama"], progress=False, eval_data=heldout, stop_after=3)
    resumed = run_train(student, train_file, part, replace(settings, checkpoint_every=3),
                        adapter_dir=adapters["llama"], progress=False, eval_data=heldout,
                        resume=True)
    assert [h["step"] for h in resumed.summary["heldout_history"]] == [0, 2, 4, 5]
    assert [h["loss"] for h in resumed.summary["heldout_history"]] == pytest.approx(
        [h["loss"] for h in curve], abs=1e-6)
    with pytest.raises(Exception, match="--eval-data"):
        run_train(student, train_file, tmp_path / "c", settings, adapter_dir=adapters["llama"],
                  progress=False)


# --------------------------------------------------------------------------- nothing lost


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_overwrite_keeps_the_old_run_until_the_new_one_is_complete(model_pairs, adapters,
                                                                   train_file, tmp_path):
    student, out = str(model_pairs["llama"][1]), tmp_path / "run"
    settings = TrainSettings(**FAST, checkpoint_every=1)
    run_train(student, train_file, out, settings, adapter_dir=adapters["llama"], progress=False)
    finished = _files(out)
    other = TrainSettings(**{**FAST, "lr": 5e-3}, checkpoint_every=1)
    stopped = run_train(student, train_file, out, other, adapter_dir=adapters["llama"],
                        overwrite=True, progress=False, stop_after=2)  # as if killed at step 2
    assert not stopped.complete
    assert _files(out) == finished  # the old run is whole
    resumed = run_train(student, train_file, out, other, adapter_dir=adapters["llama"],
                        resume=True, progress=False)
    assert resumed.complete and resumed.summary["timing"]["resumed_from"] == [2]
    info = json.loads((out / "train.json").read_text())
    assert info["settings"]["lr"] == 5e-3 and info["steps_done"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing beside it


def test_resume_skips_a_damaged_last_checkpoint(capsys, model_pairs, adapters, train_file,
                                                tmp_path):
    student = str(model_pairs["llama"][1])
    settings = TrainSettings(**FAST, checkpoint_every=1)
    whole = run_train(student, train_file, tmp_path / "whole", settings,
                      adapter_dir=adapters["llama"], progress=False)
    part = tmp_path / "part"
    run_train(student, train_file, part, settings, adapter_dir=adapters["llama"],
              progress=False, stop_after=3)
    last = part / "checkpoints" / "step-000003" / "state.safetensors"
    last.write_bytes(last.read_bytes()[:100])  # a truncated copy
    code, _, err = run_cli(capsys, "train", "--student", student, "--data", train_file, "--out",
                           part, "--adapter", adapters["llama"], "--lr", "1e-2", "--batch-size",
                           "4", "--micro-batch-size", "2", "--max-length", "160", "--max-steps",
                           "4", "--checkpoint-every", "1", "--resume", "--quiet")
    assert code == 0, err
    assert "step-000003 is damaged" in err
    info = json.loads((part / "train.json").read_text())
    assert info["timing"]["resumed_from"] == [2]
    assert info["history"] == whole.summary["history"]
    # Every checkpoint damaged: a one-line error, not a traceback.
    for state in (part / "checkpoints").glob("step-*/state.json"):
        state.write_text("{not json")
    code, _, err = run_cli(capsys, "train", "--student", student, "--data", train_file, "--out",
                           part, "--adapter", adapters["llama"], "--resume", "--quiet")
    assert code == 2 and "no intact checkpoint" in one_line_error(err)


def test_non_finite_loss_stops_with_the_last_good_checkpoint(capsys, model_pairs, train_file,
                                                             tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--student", model_pairs["llama"][1], "--data",
                           train_file, "--out", out, "--init", "standard", "--lr", "1e30",
                           "--batch-size", "4", "--micro-batch-size", "2", "--max-length", "160",
                           "--max-steps", "4", "--checkpoint-every", "1", "--quiet")
    # Step 1 has learning rate 0 (warmup), step 2 moves the weights by ~1e30, step 3's loss
    # is NaN: it stops there, before anything of step 3 is saved.
    msg = one_line_error(err)
    assert code == 2 and "step 3:" in msg and "non-finite" in msg and "step-000002" in msg
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001",
                                                                        "step-000002"]
    assert not (out / "train.json").exists()
    state = load_file(str(out / "checkpoints" / "step-000002" / "state.safetensors"))
    assert all(torch.isfinite(t).all() for t in state.values())
    for flag, value in (("--lr", "inf"), ("--alpha", "nan"), ("--dropout", "nan")):
        code, _, err = run_cli(capsys, "train", "--student", model_pairs["llama"][1], "--data",
                               train_file, "--out", tmp_path / "x", "--init", "standard", flag,
                               value, "--quiet")
        assert code == 2 and flag in one_line_error(err) and "finite" in err
    assert not (tmp_path / "x").exists()


def test_adapter_config_numbers_are_checked(capsys, model_pairs, adapters, train_file, tmp_path):
    """A NaN alpha in an adapter (as `extract --alpha nan` used to write) is blamed on the
    adapter's config, not on an --alpha flag that was never given; merge refuses it too."""
    import shutil

    bad = Path(shutil.copytree(adapters["llama"], tmp_path / "bad"))
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": float("nan")}))
    student = model_pairs["llama"][1]
    code, _, err = run_cli(capsys, "train", "--student", student, "--data", train_file, "--out",
                           tmp_path / "run", "--adapter", bad, "--quiet")
    msg = one_line_error(err)
    assert code == 2 and "adapter_config.json: lora_alpha" in msg and "--alpha" not in msg
    code, _, err = run_cli(capsys, "merge", "--student", student, "--adapter", bad, "--out",
                           tmp_path / "merged")
    assert code == 2 and "lora_alpha" in one_line_error(err)
    assert not (tmp_path / "run").exists() and not (tmp_path / "merged").exists()


def test_rank_and_negative_numbers_are_checked_like_extract(capsys, model_pairs, train_file,
                                                            tmp_path):
    student, out = model_pairs["llama"][1], tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--student", student, "--data", train_file, "--out",
                           out, "--init", "standard", "--rank", "1000", "--quiet")
    assert code == 2 and "--rank: 1000 is above the smaller side" in one_line_error(err)
    code, _, err = run_cli(capsys, "train", "--student", student, "--data", train_file, "--out",
                           out, "--init", "standard", "--lr", "-1e-3", "--quiet")
    assert code == 2 and "--lr: must be positive (got -0.001)" in one_line_error(err)
    assert not out.exists()


def test_dropped_examples_are_said_and_empty_answers_refused(capsys, model_pairs, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [
        {"messages": [{"role": "user", "content": "x" * 150}, {"role": "assistant", "content": "long"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}])
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--student", model_pairs["llama"][1], "--data", data,
                           "--out", out, "--init", "standard", "--max-length", "100",
                           "--max-steps", "1", "--batch-size", "2", "--micro-batch-size", "2",
                           "--quiet")
    assert code == 0, err
    assert "1 of 3 examples dropped" in err and "--max-length 100" in err
    assert json.loads((out / "train.json").read_text())["dropped_no_answer"] == 1
    empty = write_jsonl(tmp_path / "empty.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \n"}]}])
    code, _, err = run_cli(capsys, "train", "--student", model_pairs["llama"][1], "--data", empty,
                           "--out", tmp_path / "run2", "--init", "standard", "--quiet")
    assert code == 2 and "empty.jsonl:2: the final assistant turn is empty" in one_line_error(err)


def test_tied_head_keeps_its_weight_as_the_report_says(model_pairs, adapters, train_file,
                                                       tmp_path):
    """GPT-2's head is tied to its embedding: training adapts the input embedding only, the
    merged model's head is the original one, and `skipped` says exactly that."""
    from paratransfer.adapter.merge import merged_model

    student = str(model_pairs["gpt2"][1])
    out = tmp_path / "run"
    run_train(student, train_file, out, TrainSettings(**FAST), adapter_dir=adapters["gpt2"],
              progress=False)
    standard = run_train(student, train_file, tmp_path / "standard",  # every role asked for
                         TrainSettings(init="standard", **{**FAST, "max_steps": 1}),
                         progress=False)
    for report in (standard.summary, json.loads((adapters["gpt2"] / "transfer.json").read_text())):
        reason = next(s["reason"] for s in report["skipped"] if s["role"] == "head")
        assert "keeps its original weight" in reason and "covers both" not in reason
    original = load_model(student)
    merged, info = merged_model(student, out)
    assert info["untied_head"]
    assert torch.equal(merged.get_output_embeddings().weight, original.get_output_embeddings().weight)
    assert not torch.equal(merged.get_input_embeddings().weight,
                           original.get_input_embeddings().weight)
