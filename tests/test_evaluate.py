"""`paratransfer evaluate` end to end: the metrics move with the model (a tiny model trained here
scores 1.0, a random one chance), `--adapter` equals the merged model, the files and the CLI,
and the judged win rate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from paratransfer.cli.entry import main
from paratransfer.demo.tiny import save_tiny, tiny_model
from paratransfer.evaluate import get_task
from paratransfer.evaluate import open as open_task
from paratransfer.evaluate.generation import pad
from paratransfer.evaluate.run import EvalSettings, load_items, run_evaluate
from paratransfer.io.errors import UserError
from paratransfer.tasks.examples import tokenize_example
from tolerances import assert_floats_close, decisive_margin


def chat(user: str, assistant: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}], **extra}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


#: A tiny synthetic version of each task. MMLU letters are balanced (one of each), so a model
#: that always picks the same letter scores exactly chance; two answer in each style.
TASK_RECORDS = {
    "gsm": [chat(f"What is {a} plus {b}?", f"Answer: {a} + {b} = {a + b}. So the answer is {a + b}.")
            for a, b in [(2, 3), (7, 5), (12, 9), (4, 30)]],
    "mmlu": [chat(f"Which is the {w}?\nA. ball\nB. kite\nC. doll\nD. drum\nAnswer:",
                  letter if i % 2 == 0 else f"The answer is: {letter}", category=cat)
             for i, (w, letter, cat) in enumerate([("ball", "A", "toys"), ("kite", "B", "toys"),
                                                   ("doll", "C", "games"), ("drum", "D", "games")])],
    "super_ni": [chat(f"Capitalize: {w}", w.upper()) for w in ("apple", "river", "stone")],
}


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tasks")
    return {task: write_jsonl(root / f"{task}.jsonl", records) for task, records in TASK_RECORDS.items()}


def train_until_perfect(model, tokenizer, files: dict[str, Path], max_steps: int = 500) -> bool:
    """Full-batch AdamW on every task's records, in the prompts evaluation uses, until each answer
    token is the argmax under teacher forcing (so greedy decoding reproduces every answer)."""
    examples = []
    for task, path in files.items():
        examples += [item.example for item in load_items(get_task(task), path)]
    tokens = [tokenize_example(ex, tokenizer) for ex in examples]
    ids, mask = pad([t["input_ids"] for t in tokens], tokenizer.pad_token_id, "right")
    labels, _ = pad([t["labels"] for t in tokens], -100, "right")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    torch.manual_seed(0)
    model.train()
    target = labels[:, 1:]
    answered = target != -100
    for _ in range(max_steps):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        if out.loss.item() < 0.05 and (out.logits[:, :-1].argmax(-1)[answered] == target[answered]).all():
            model.eval()
            return True
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return False


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer, task_files) -> dict[str, Path]:
    """`trained` (answers the synthetic tasks perfectly) and `random` (same shape, untrained)."""
    root = tmp_path_factory.mktemp("eval-models")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains faster on one thread
    try:
        trained = tiny_model("llama", vocab=len(tokenizer), hidden=64, layers=2, heads=4, seed=0)
        learned = train_until_perfect(trained, tokenizer, task_files)
    finally:
        torch.set_num_threads(threads)
    assert learned, "the tiny model did not learn the synthetic tasks"
    untrained = tiny_model("llama", vocab=len(tokenizer), hidden=64, layers=2, heads=4, seed=1)
    return {"trained": save_tiny(trained, tokenizer, root / "trained"),
            "random": save_tiny(untrained, tokenizer, root / "random")}


def evaluate(model: Path, task: str, data: Path, out: Path, **kwargs) -> dict:
    settings = EvalSettings(task=task, max_new_tokens=kwargs.pop("max_new_tokens", 48),
                            batch_size=kwargs.pop("batch_size", 4), shots=kwargs.pop("shots", 0))
    return run_evaluate(str(model), data, out, settings, progress=False, **kwargs)


def predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- the metrics move


@pytest.mark.parametrize("task, metric, chance", [
    ("gsm", "exact_match", 0.0), ("mmlu", "accuracy", 0.5), ("super_ni", "exact_match", 0.0)])
def test_trained_model_scores_one_and_random_model_chance(models, task_files, tmp_path, task,
                                                         metric, chance):
    trained = evaluate(models["trained"], task, task_files[task], tmp_path / "trained")
    untrained = evaluate(models["random"], task, task_files[task], tmp_path / "random")
    assert (trained["metric"], trained["value"]) == (metric, 1.0)
    assert untrained["value"] <= chance  # mmlu: 4 balanced letters, chance is 0.25
    rows = predictions(tmp_path / "trained")
    assert [r["id"] for r in rows] == [f"{task}-{i}" for i in range(1, len(rows) + 1)]
    assert all(r["correct" if task != "super_ni" else "exact_match"] for r in rows)
    if task == "gsm":  # greedy output is the taught answer, stopped at EOS
        assert [r["output"] for r in rows] == [r["messages"][1]["content"] for r in TASK_RECORDS["gsm"]]
    if task == "mmlu":
        assert trained["per_category"] == {"games": {"n": 2, "accuracy": 1.0},
                                           "toys": {"n": 2, "accuracy": 1.0}}
        assert rows[1]["prompt"].endswith("<|assistant|>\nThe answer is:")
        assert set(rows[1]["choice_logprobs"]) == {"A", "B", "C", "D"}
    if task == "super_ni":
        assert trained["metrics"]["rougeL"] == 1.0


def test_metrics_and_predictions_files(models, task_files, tmp_path):
    out = tmp_path / "res"
    m = evaluate(models["trained"], "gsm", task_files["gsm"], out, shots=2, batch_size=2)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == m
    for key in ("task", "metric", "value", "n", "metrics", "model", "adapter", "settings", "timing"):
        assert key in m
    assert m["timing"]["seconds"] > 0
    assert m["n"] == 4 and m["adapter"] is None and m["model"] == str(models["trained"])
    assert m["settings"]["shots"] == 2 and m["settings"]["max_new_tokens"] == 48
    row = predictions(out)[0]
    assert set(row) >= {"id", "prompt", "output", "parsed", "gold", "correct"}
    assert row["prompt"].count("Question: ") == 3 and row["gold"] == "5"
    with pytest.raises(UserError, match="already exists"):
        evaluate(models["trained"], "gsm", task_files["gsm"], out)


# --------------------------------------------------------------------------- --adapter


@pytest.fixture(scope="module")
def student_and_adapter(tmp_path_factory, tokenizer):
    """A tiny student, a random non-zero LoRA on every role (embedding and head included) as
    `train` would save it, and the merged model as `merge` would write it."""
    from peft import LoraConfig, PeftModel, get_peft_model

    root = tmp_path_factory.mktemp("adapter")
    student = save_tiny(tiny_model("llama", vocab=len(tokenizer), hidden=32, layers=2, heads=4,
                                   seed=7), tokenizer, root / "student")
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj", "embed_tokens", "lm_head"])
    peft_model = get_peft_model(tiny_model("llama", vocab=len(tokenizer), hidden=32, layers=2,
                                           heads=4, seed=7), config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(root / "run", save_embedding_layers=True)
    base = tiny_model("llama", vocab=len(tokenizer), hidden=32, layers=2, heads=4, seed=7)
    merged = PeftModel.from_pretrained(base, root / "run").merge_and_unload()
    return student, root / "run", save_tiny(merged, tokenizer, root / "merged")


@pytest.mark.parametrize("task", ["gsm", "mmlu"])
def test_adapter_on_the_fly_equals_merged_model(student_and_adapter, task_files, tmp_path, task):
    student, run, merged = student_and_adapter
    with_adapter = evaluate(student, task, task_files[task], tmp_path / "a", adapter=run,
                            max_new_tokens=16)
    from_merged = evaluate(merged, task, task_files[task], tmp_path / "m", max_new_tokens=16)
    evaluate(student, task, task_files[task], tmp_path / "s", max_new_tokens=16)
    assert with_adapter["adapter"] == str(run)
    assert with_adapter["metrics"] == from_merged["metrics"]
    a, m, s = predictions(tmp_path / "a"), predictions(tmp_path / "m"), predictions(tmp_path / "s")
    if task == "gsm":
        assert [r["output"] for r in a] == [r["output"] for r in m]
        assert [r["output"] for r in a] != [r["output"] for r in s]  # the adapter is applied
    else:
        for x, y, z in zip(a, m, s, strict=True):
            assert x["choice_logprobs"] == pytest.approx(y["choice_logprobs"], abs=1e-5)
            assert x["choice_logprobs"] != pytest.approx(z["choice_logprobs"], abs=1e-3)


def test_adapter_that_does_not_fit_is_a_one_line_error(student_and_adapter, models, task_files, tmp_path):
    _, run, _ = student_and_adapter
    with pytest.raises(UserError, match=r"has shape \[32, 4\].* needs \[64, 4\]") as e:
        evaluate(models["trained"], "gsm", task_files["gsm"], tmp_path / "x", adapter=run)
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no adapter_config.json"):
        evaluate(models["trained"], "gsm", task_files["gsm"], tmp_path / "x",
                 adapter=tmp_path / "empty")


# --------------------------------------------------------------------------- the judge


def test_judge_both_orders(models, tokenizer, tmp_path):
    judge = tiny_model("llama", vocab=len(tokenizer), hidden=32, layers=2, heads=4, seed=11)
    items = load_items(get_task("open"), write_jsonl(tmp_path / "o.jsonl", [
        chat("Tell me about rivers.", "Rivers flow to the sea."),
        chat("Say hi.", "Hi!"), chat("Name a fruit.", "Apple.")]))
    ours, theirs = ["Water runs downhill.", "Hello", "pear"], ["The sea is salty.", "Bye", "A car."]
    forward = open_task.compare(judge, tokenizer, items, ours, theirs, batch_size=4)
    backward = open_task.compare(judge, tokenizer, items, theirs, ours, batch_size=2)
    itself = open_task.compare(judge, tokenizer, items, ours, ours)
    decided = 0
    for f, b, s in zip(forward, backward, itself, strict=True):
        # The same judge prompts in batches of another size: equal to fp32 rounding, not bits.
        for order, other in (("ours_first", "reference_first"), ("reference_first", "ours_first")):
            assert_floats_close(f["judge"][order].values(), b["judge"][other].values())
        verdicts = [f["judge"]["ours_first"], f["judge"]["reference_first"],
                    s["judge"]["ours_first"], s["judge"]["reference_first"]]
        if all(decisive_margin(list(v.values())) for v in verdicts):
            decided += 1
            # Swapping the two runs swaps the votes; a run against itself ties.
            assert f["win"] + b["win"] == 1.0 and s["win"] == 0.5
    assert decided >= 2  # the decisions above were really checked


def test_evaluate_open_with_judge_and_reference(models, tmp_path):
    data = write_jsonl(tmp_path / "o.jsonl", [chat("Say hi.", "Hi!"), chat("Name a fruit.", "Apple.")])
    reference = tmp_path / "ref"
    reference.mkdir()
    write_jsonl(reference / "predictions.jsonl",
                [{"id": "o-2", "output": "A pear."}, {"id": "o-1", "output": "Hello there."}])
    m = evaluate(models["random"], "open", data, tmp_path / "out", judge=str(models["trained"]),
                 reference=reference, max_new_tokens=8)
    assert m["metric"] == "win_rate" and set(m["metrics"]) == {"win_rate", "rougeL"}
    rows = predictions(tmp_path / "out")
    assert all(r["win"] in (0.0, 0.5, 1.0) and set(r["judge"]) == {"ours_first", "reference_first"}
               for r in rows)
    write_jsonl(reference / "predictions.jsonl", [{"id": "o-2", "output": "A pear."}])
    with pytest.raises(UserError, match=r"predictions.jsonl: no prediction for id 'o-1' \(of .*o.jsonl:1\)"):
        evaluate(models["random"], "open", data, tmp_path / "out2", judge=str(models["trained"]),
                 reference=reference)
    with pytest.raises(UserError, match="--judge and --reference go together"):
        evaluate(models["random"], "open", data, tmp_path / "out3", judge=str(models["trained"]))
    with pytest.raises(UserError, match="task gsm: no pairwise judging"):
        evaluate(models["random"], "gsm", data, tmp_path / "out4", judge="j", reference=reference)


# --------------------------------------------------------------------------- the command line


def test_cli_evaluate(capsys, models, task_files, tmp_path):
    out = tmp_path / "cli"
    argv = ["evaluate", "--model", str(models["trained"]), "--task", "mmlu",
            "--data", str(task_files["mmlu"]), "--out", str(out), "--quiet", "--batch-size", "3"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out}: mmlu accuracy 1.0000 on 4 examples" in stdout
    assert json.loads((out / "metrics.json").read_text())["settings"]["batch_size"] == 3
    assert main(argv) == 2  # refuses to overwrite
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


@pytest.mark.parametrize("args, needle", [
    (["--task", "gsm9k"], "unknown task 'gsm9k'"),
    (["--task", "mmlu", "--data", "{gsm}"], "gsm.jsonl:1: the answer \"Answer: 2 + 3 = 5. So the"),
    (["--task", "gsm", "--data", "{empty}"], "empty.jsonl: no records"),
    (["--task", "gsm", "--shots", "-1"], "--shots: must be an integer of at least 0"),
    (["--task", "super_ni", "--shots", "2"], "task super_ni: takes no worked examples"),
    (["--task", "gsm", "--prompt-format", "alpaca"], "--prompt-format: unknown 'alpaca'"),
])
def test_cli_bad_input_is_one_line_before_any_model_loads(capsys, task_files, tmp_path, args, needle):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = [a.format(gsm=task_files["gsm"], empty=empty) for a in args]
    if "--data" not in args:
        args += ["--data", str(task_files["gsm"])]
    out = tmp_path / "never"
    code = main(["evaluate", "--model", str(tmp_path / "no-such-model"), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert not out.exists()



# --------------------------------------------------------------------------- what is evaluated


def test_adapter_on_a_tied_student_is_what_merge_writes(model_pairs, adapters, task_files,
                                                        tmp_path):
    """GPT-2 ties its head to the embedding: the adapter's embedding LoRA must not change the
    head. Evaluating with --adapter computes exactly what the merged folder computes."""
    from paratransfer.adapter.merge import run_merge
    from paratransfer.evaluate.run import load_evaluated_model
    from paratransfer.teacher.models import load_model

    student, adapter = model_pairs["gpt2"][1], adapters["gpt2"]
    run_merge(str(student), adapter, tmp_path / "merged")
    ids = torch.tensor([[5 + (3 * i) % 80 for i in range(24)]])
    with torch.no_grad():
        on_the_fly = load_evaluated_model(str(student), adapter, torch.float32, "cpu")(ids).logits
        merged = load_model(str(tmp_path / "merged"))(ids).logits
        plain = load_model(str(student))(ids).logits
    assert (on_the_fly - merged).abs().max().item() <= 1e-6
    assert (on_the_fly - plain).abs().max().item() > 1e-3  # the adapter is applied
    a = evaluate(student, "mmlu", task_files["mmlu"], tmp_path / "a", adapter=adapter)
    m = evaluate(tmp_path / "merged", "mmlu", task_files["mmlu"], tmp_path / "m")
    assert a["metrics"] == m["metrics"]
    for x, y in zip(predictions(tmp_path / "a"), predictions(tmp_path / "m"), strict=True):
        assert x["choice_logprobs"] == pytest.approx(y["choice_logprobs"], abs=1e-5)


def test_prompts_longer_than_the_context(model_pairs, tmp_path, monkeypatch):
    """The rule: fewer worked examples first (the last ones dropped), then a refusal naming the
    record, before the model is loaded; a 10 MB record no longer runs out of memory."""
    import paratransfer.evaluate.run as run

    student = model_pairs["llama"][1]  # context: 2048 tokens (one per character)
    long = write_jsonl(tmp_path / "long.jsonl", [
        chat("What is 2 plus 3?", "So the answer is 5."),
        chat("What is " + "1 plus " * 200 + "1?", "So the answer is 201."),
        chat("What is " + "1 plus " * 100 + "1?", "So the answer is 101.")])
    m = evaluate(student, "gsm", long, tmp_path / "shots", shots=8, max_new_tokens=2)
    rows = predictions(tmp_path / "shots")
    assert rows[0]["shots"] == 8 and 0 < rows[2]["shots"] < 8 and rows[1]["shots"] < rows[2]["shots"]
    assert m["shots_trimmed"] == 2
    for row in rows:
        assert len(row["prompt"]) + 2 + 2 <= 2048  # characters are tokens here (+ BOS)
    loaded: list[str] = []
    monkeypatch.setattr(run, "load_evaluated_model", lambda *a: loaded.append("model"))
    huge = write_jsonl(tmp_path / "huge.jsonl", [chat("What is 2 plus 3?", "So the answer is 5."),
                                                  chat("x" * 3000 + "?", "So the answer is 1.")])
    with pytest.raises(UserError, match=r"huge.jsonl:2: the prompt is \d+ tokens; with 2 for the "
                                        r"answer it exceeds the model's context of 2048 tokens"):
        evaluate(student, "gsm", huge, tmp_path / "huge", max_new_tokens=2)
    assert loaded == [] and not (tmp_path / "huge").exists()


def test_overlong_records_refused_skipped_or_truncated(capsys, model_pairs, tmp_path):
    """One record too long for the context need not cost the others (issue 23, item 18):
    refuse (the default) names the record and --overlong; skip leaves it out, counted and listed
    by FILE:LINE in metrics.json; truncate cuts its instruction from the left until it fits."""
    student = model_pairs["llama"][1]  # context: 2048 tokens (one per character)
    tail = " Now: what is 2 plus 3?"
    data = write_jsonl(tmp_path / "mixed.jsonl", [
        chat("What is 2 plus 3?", "So the answer is 5."),
        chat("filler " * 400 + tail, "So the answer is 5."),  # ~2,820 characters
        chat("What is 1 plus 1?", "So the answer is 2.")])
    base = ["evaluate", "--model", student, "--task", "gsm", "--data", data,
            "--max-new-tokens", "4", "--quiet", "--out"]
    code = main([str(a) for a in [*base, tmp_path / "refused"]])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{data}:2: the prompt is" in err and "--overlong skip|truncate" in err
    assert not (tmp_path / "refused").exists()

    assert main([str(a) for a in [*base, tmp_path / "skip", "--overlong", "skip"]]) == 0
    m = json.loads((tmp_path / "skip" / "metrics.json").read_text())
    assert m["n"] == 2 and m["settings"]["overlong"] == "skip"
    assert m["overlong"]["skipped"] == 1 and m["overlong"]["skipped_records"] == [f"{data}:2"]
    assert [r["source"] for r in predictions(tmp_path / "skip")] == [f"{data}:1", f"{data}:3"]

    assert main([str(a) for a in [*base, tmp_path / "cut", "--overlong", "truncate"]]) == 0
    m = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    rows = predictions(tmp_path / "cut")
    assert m["n"] == 3 and m["overlong"]["truncated"] == 1
    cut = m["overlong"]["truncated_records"][0]
    assert cut["record"] == f"{data}:2" and cut["characters_cut"] > 0
    assert [r["truncated"] for r in rows] == [0, cut["characters_cut"], 0]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(student))
    prompt = rows[1]["prompt"]
    assert tail.strip() in prompt and len(tok(prompt)["input_ids"]) + 4 <= 2048
    item = load_items(get_task("gsm"), data)[1]  # the instruction as the task asks it
    content, c = item.example.messages[-2]["content"], cut["characters_cut"]

    def tulu(text: str) -> str:
        return f"<|user|>\n{text.strip()}\n\n<|assistant|>\n"

    assert prompt == tulu(content[c:])
    assert len(tok(tulu(content[c - 1:]))["input_ids"]) + 4 > 2048  # the least cut that fits
    assert rows[0]["prompt"] == predictions(tmp_path / "skip")[0]["prompt"]


def test_a_recipe_takes_overlong(model_pairs, seeds_file, tmp_path):
    """`overlong: skip` in a recipe lets the input check pass a record the context cannot hold;
    without it the check names the record and the option."""
    import yaml

    from paratransfer.experiment.preflight import check_run_inputs
    from paratransfer.experiment.recipe import load_recipe

    teacher, student = model_pairs["llama"]
    data = write_jsonl(tmp_path / "eval.jsonl", [chat("What is 2 plus 3?", "So 5."),
                                                 chat("x" * 3000 + "?", "So 1.")])
    raw = {"teacher": str(teacher), "student": str(student), "seeds": [1],
           "task": {"type": "gsm", "seeds": str(seeds_file), "train": str(seeds_file),
                    "eval": str(data)},
           "max_new_tokens": 4, "device": "cpu", "dtype": "float32"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match=r"eval\.jsonl:2: the prompt is .*--overlong skip\|truncate"):
        check_run_inputs(load_recipe(path))
    path.write_text(yaml.safe_dump({**raw, "overlong": "skip"}))
    check_run_inputs(load_recipe(path))
    path.write_text(yaml.safe_dump({**raw, "overlong": "cut"}))
    with pytest.raises(UserError, match=r"--overlong: unknown 'cut'"):
        load_recipe(path)


def test_a_model_that_is_not_causal_is_refused(tokenizer, task_files, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=16,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, pad_token_id=1))
    folder = save_tiny(bert, tokenizer, tmp_path / "bert")
    with pytest.raises(UserError, match="bert: not a causal LM"):
        evaluate(folder, "gsm", task_files["gsm"], tmp_path / "out", max_new_tokens=2)
    assert not (tmp_path / "out").exists()
