"""Experiments: a tiny recipe end to end, resume after an interruption, recipe errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from paratransfer.demo.world import arithmetic_records, write_jsonl
from paratransfer.experiment.heldout_contrasts import NO_HELDOUT
from paratransfer.experiment.recipe import load_recipe
from paratransfer.experiment.results import paired_interval, t975
from paratransfer.experiment.runner import run_experiment
from paratransfer.io.errors import UserError
from tolerances import tolerance


@pytest.fixture(scope="module")
def tiny_recipe(model_pairs, seeds_file, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipe")
    teacher, student = model_pairs["llama"]
    recipe = {
        "teacher": str(teacher), "student": str(student),
        "task": {"type": "gsm", "seeds": str(seeds_file),
                 "train": str(write_jsonl(root / "train.jsonl", arithmetic_records(8, seed=5))),
                 "eval": str(write_jsonl(root / "test.jsonl", arithmetic_records(4, seed=6)))},
        "seeds": [1, 2],
        "rank": 4, "alpha": 8, "max_length": 160, "max_steps": 2, "batch_size": 4,
        "micro_batch_size": 4, "checkpoint_every": 1, "limit": 4, "max_new_tokens": 6,
        "eval_batch_size": 4, "lr": 1e-2, "dtype": "float32", "device": "cpu",
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _values(result: dict) -> dict:
    return {row["arm"]: row["seeds"] for row in result["arms"]}


def test_tiny_recipe_end_to_end_and_resume(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe)
    lines: list[str] = []
    full = run_experiment(recipe, tmp_path / "full", progress=False, on_step=lambda m: None,
                          log=lines.append)
    # One line per step when it ends: sensitivity, 2 references, 1 extraction, 2 x 2 x
    # (train, evaluate); nothing else.
    assert len(lines) == 12 and full["steps"] == {**full["steps"], "ran": 12, "reused": 0}
    assert all(re.fullmatch(r"\[\s*\d+/12\] [^\n\r]+: [^\n\r]+ \(\d+\.\d s\)", line)
               for line in lines), lines
    assert {row["arm"] for row in full["arms"]} == {"transfer", "lora"}
    for row in full["arms"]:
        assert set(row["seeds"]) == {"1", "2"}
    saved = json.loads((tmp_path / "full" / "results.json").read_text())
    assert saved["arms"] == json.loads(json.dumps(full["arms"]))
    assert {r["name"] for r in saved["references"]} == {"student", "teacher"}
    transfer = next(r for r in saved["arms"] if r["arm"] == "transfer")
    assert transfer["vs_lora"]["n"] == 2
    # No held-out set in this recipe: every row and contrast says so.
    assert transfer["heldout"] == {"missing": NO_HELDOUT}
    assert all(c["heldout"] == {"missing": NO_HELDOUT} for c in saved["contrasts"])
    md = (tmp_path / "full" / "results.md").read_text()
    assert f"| transfer | {NO_HELDOUT} |" in md
    assert f"(transfer − lora), held-out loss: {NO_HELDOUT}." in md
    assert saved["contrasts"][0]["decide_sentence"].startswith("Seeds that would decide: ")
    for name in ("results.md", "results.png", "sensitivity.png"):
        assert (tmp_path / "full" / name).stat().st_size > 0

    # Interrupt the same run midway (at its 6th step), then resume: same numbers.
    seen: list[str] = []

    def stop_at_sixth(msg: str) -> None:
        seen.append(msg)
        if len(seen) == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(recipe, tmp_path / "cut", progress=False, on_step=stop_at_sixth)
    assert not (tmp_path / "cut" / "results.json").exists()
    log: list[str] = []
    resumed = run_experiment(recipe, tmp_path / "cut", resume=True, progress=False,
                             on_step=log.append)
    assert all(m.startswith("[done]") for m in log[:5]) and log[5].startswith("[run ]")
    assert _values(resumed) == _values(full)
    # The metric of random tiny models is 0 everywhere; the trained adapters and the generated
    # outputs are what really shows that resuming reproduces the run.
    for arm in ("transfer", "lora"):
        for seed in (1, 2):
            a, b = (tmp_path / run / "arms" / arm / f"seed-{seed}" for run in ("full", "cut"))
            ta = load_file(str(a / "train" / "adapter_model.safetensors"))
            tb = load_file(str(b / "train" / "adapter_model.safetensors"))
            assert ta.keys() == tb.keys()
            for key in ta:
                torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=1e-6)
            assert (a / "eval" / "predictions.jsonl").read_text() == \
                (b / "eval" / "predictions.jsonl").read_text()
    with pytest.raises(UserError, match="already exists"):
        run_experiment(recipe, tmp_path / "cut", progress=False)


def _write(tmp_path: Path, base: Path, **changes) -> Path:
    raw = yaml.safe_load(base.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_recipe_unknown_key(tiny_recipe, tmp_path):
    with pytest.raises(UserError, match=r"r.yaml: unknown key 'learning_rate'"):
        load_recipe(_write(tmp_path, tiny_recipe, learning_rate=0.1))


def test_recipe_missing_file(tiny_recipe, tmp_path):
    task = yaml.safe_load(tiny_recipe.read_text())["task"]
    with pytest.raises(UserError, match=r"task.train: .*nope.jsonl is not a file"):
        load_recipe(_write(tmp_path, tiny_recipe, task={**task, "train": "nope.jsonl"}))


def test_recipe_arm_changing_two_things(tiny_recipe, tmp_path):
    arms = {"transfer": {}, "lora": {"init": "standard"}, "x": {"layers": "first", "rank": 2}}
    with pytest.raises(UserError, match=r"arms.x: changes 2 settings \(layers, rank\)"):
        load_recipe(_write(tmp_path, tiny_recipe, arms=arms))


def test_recipe_bad_values_fail_before_work(tiny_recipe, tmp_path):
    arms = {"transfer": {}, "lora": {"init": "standard"}, "x": {"reduce": "blocks"}}
    with pytest.raises(UserError, match=r"arms.x: --reduce: unknown strategy 'blocks'"):
        load_recipe(_write(tmp_path, tiny_recipe, arms=arms))
    with pytest.raises(UserError, match="baseline"):
        load_recipe(_write(tmp_path, tiny_recipe, arms={"transfer": {}}))
    with pytest.raises(UserError, match="seeds"):
        load_recipe(_write(tmp_path, tiny_recipe, seeds=[1, 1]))


def test_paired_interval_oracle():
    d = paired_interval([0.5, 0.7, 0.6], [0.4, 0.5, 0.6])  # diffs 0.1, 0.2, 0.0
    assert d["mean"] == pytest.approx(0.1)
    # sd of (0.1, 0.2, 0.0) is 0.1; t(0.975, 2) = 4.303
    assert d["high"] - d["mean"] == pytest.approx(4.303 * 0.1 / 3 ** 0.5)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_example_recipes_validate(path, tmp_path):
    """Each example starts with the commands that make its inputs and run it, and validates once
    they have written the files it names (here: small stand-ins; local models from
    `make real-models`, which links them into models/)."""
    text = path.read_text()
    lines = text.splitlines()
    commands = [line for line in lines if line.startswith("# ") and not line.startswith("#  ")]
    data_lines = [line for line in commands if line.startswith("# paratransfer data ")]
    assert data_lines, "no `paratransfer data` command in the header"
    run = f"# paratransfer run examples/{path.name} --out runs/{path.stem}"
    assert any(line == run or line.startswith(run + " ") for line in commands)
    for data_line in data_lines:
        out = tmp_path / data_line.split("--out ")[1].split()[0]
        out.mkdir(parents=True, exist_ok=True)
        for name in ("seeds", "train", "eval"):
            write_jsonl(out / f"{name}.jsonl", arithmetic_records(2))
    raw = yaml.safe_load(text)
    for role in ("teacher", "student"):
        if raw[role].startswith("../models/"):
            assert "make real-models" in text  # the command that puts them there
            (tmp_path / raw[role][3:]).parent.mkdir(exist_ok=True)
            (tmp_path / raw[role][3:]).write_bytes(b"")
    (tmp_path / "examples").mkdir()
    copy = tmp_path / "examples" / path.name
    copy.write_text(text)
    recipe = load_recipe(copy)
    assert "lora" in recipe.arms and "transfer" in recipe.arms
    first = tmp_path / data_lines[0].split("--out ")[1].split()[0]
    assert recipe.task.seeds.resolve() == (first / "seeds.jsonl").resolve()
    if recipe.task.heldout is not None:
        assert recipe.task.heldout.is_file()


def test_control_arms_contrasts_and_heldout_curves(tiny_recipe, tmp_path):
    """Arms pissa and spectrum run beside transfer and lora; spectrum reads transfer's adapter;
    the results give each contrast with its interval and sentence, and the held-out curves."""
    task = yaml.safe_load(tiny_recipe.read_text())["task"]
    heldout = write_jsonl(tmp_path / "heldout.jsonl", arithmetic_records(4, seed=8))
    arms = {"transfer": {}, "lora": {"init": "standard"}, "pissa": {"init": "pissa"},
            "spectrum": {"init": "spectrum"}}
    recipe = load_recipe(_write(tmp_path, tiny_recipe, arms=arms, eval_every=1, limit=2,
                                task={**task, "heldout": str(heldout)}))
    lines: list[str] = []
    result = run_experiment(recipe, tmp_path / "run", progress=False, log=lines.append)
    assert sum(" extract " in f" {line} " for line in lines) == 1  # spectrum shares it
    spectrum_run = json.loads((tmp_path / "run" / "arms" / "spectrum" / "seed-1" / "train" /
                               "train.json").read_text())
    assert spectrum_run["adapter"] == str((tmp_path / "run" / "arms" / "transfer" / "adapter").resolve())
    said = {c["contrast"]: c for c in result["contrasts"]}
    assert set(said) == {"transfer − lora", "transfer − spectrum", "transfer − pissa"}
    assert all(c["n"] == 2 and c["sentence"] for c in said.values())
    md = (tmp_path / "run" / "results.md").read_text()
    assert "the teacher's directions (transfer − spectrum): " in md
    curves = result["heldout_curves"]
    assert set(curves) == set(arms) and all(c["step"] == [0, 1, 2] for c in curves.values())
    assert (tmp_path / "run" / "results.png").stat().st_size > 0
    check_heldout_contrasts(tmp_path / "run", json.loads((tmp_path / "run" /
                                                          "results.json").read_text()))


def check_heldout_contrasts(run: Path, result: dict) -> None:
    """The held-out contrasts against an oracle read from each run's train.json: the final
    loss and the mean of the curve after step 0, paired by seed, with a 95% t-interval."""
    def curve(arm: str, seed: int) -> list[tuple[int, float]]:
        info = json.loads((run / "arms" / arm / f"seed-{seed}" / "train" / "train.json").read_text())
        return [(h["step"], h["loss"]) for h in info["heldout_history"]]

    def measure(arm: str, seed: int, which: str) -> float:
        points = curve(arm, seed)
        if which == "final":
            return max(points)[1]
        later = [loss for step, loss in points if step > 0]
        return sum(later) / len(later)

    md = (run / "results.md").read_text()
    assert "## Held-out answer-only loss (lower is better)" in md
    for c in result["contrasts"]:
        arm, other = c["contrast"].split(" − ")
        for which in ("final", "curve_mean"):
            diffs = [measure(arm, s, which) - measure(other, s, which) for s in (1, 2)]
            mean = sum(diffs) / 2
            half = t975(1) * abs(diffs[0] - diffs[1]) / 2 ** 0.5 / 2 ** 0.5  # sd of 2 = |Δ|/√2
            h = c["heldout"][which]
            assert h["n"] == 2 and h["mean"] == pytest.approx(mean, rel=1e-9, abs=1e-12)
            assert h["high"] - h["mean"] == pytest.approx(half, rel=1e-9, abs=1e-12)
            assert "lower loss is better" in h["sentence"] and h["sentence"] in md
            assert h["decide_sentence"] in md
    lora = next(r for r in result["arms"] if r["arm"] == "lora")["heldout"]
    assert lora["final"]["seeds"] == {str(s): measure("lora", s, "final") for s in (1, 2)}
    for row in result["arms"]:
        if row["arm"] != "lora":
            assert row["heldout"]["final"]["vs_lora"]["n"] == 2


def test_contrast_sentences_say_what_the_interval_says():
    from paratransfer.experiment.results import sentence

    above = paired_interval([0.5, 0.6, 0.7], [0.3, 0.35, 0.45])
    below = paired_interval([0.3, 0.35, 0.45], [0.5, 0.6, 0.7])
    around = paired_interval([0.5, 0.3, 0.6], [0.4, 0.5, 0.5])
    assert sentence("x", above).endswith("significant (the interval is above 0).")
    assert sentence("x", below).endswith("significant (the interval is below 0).")
    assert sentence("x", around).endswith("not significant (the interval includes 0).")
    assert "no conclusion" in sentence("x", paired_interval([0.5], [0.4]))


def test_parallel_chains_compute_what_one_process_does(tiny_recipe, tmp_path, monkeypatch):
    """--jobs 2: the (arm, seed) chains run in two spawned processes; same adapters (to fp32
    rounding: the workers may use another thread count) and the same results. The workers
    share the run's threads and inherit its environment (OMP_WAIT_POLICY)."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    recipe = load_recipe(tiny_recipe)
    one = run_experiment(recipe, tmp_path / "one", progress=False, log=lambda line: None)
    two = run_experiment(recipe, tmp_path / "two", progress=False, log=lambda line: None, jobs=2)
    assert two["steps"]["ran"] == one["steps"]["ran"] == 12
    assert _values(two) == _values(one)
    for arm in ("transfer", "lora"):
        for seed in (1, 2):
            a, b = (load_file(str(tmp_path / run / "arms" / arm / f"seed-{seed}" / "train" /
                                  "adapter_model.safetensors")) for run in ("one", "two"))
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(a[key], b[key], **tolerance(torch.float32))
    worker = json.loads((tmp_path / "two" / "arms" / "lora" / "seed-1" / "train" /
                         "train.json").read_text())["runtime"]
    assert worker["source"] == "run --threads / --jobs" and worker["omp_wait_policy"] == "PASSIVE"
    assert worker["threads"] == max(1, torch.get_num_threads() // 2)
    with pytest.raises(UserError, match="--jobs"):
        run_experiment(recipe, tmp_path / "three", progress=False, jobs=0)



# --------------------------------------------------------------------------- nothing lost


@pytest.fixture(scope="module")
def small_recipe(tiny_recipe, tmp_path_factory) -> Path:
    """The tiny recipe with one seed and no reference rows: six steps."""
    raw = yaml.safe_load(tiny_recipe.read_text())
    path = tmp_path_factory.mktemp("small") / "small.yaml"
    path.write_text(yaml.safe_dump({**raw, "seeds": [1], "references": []}))
    return path


def _stop_at(n: int):
    ran: list[str] = []

    def hook(msg: str) -> None:
        if msg.startswith("[run ]"):
            ran.append(msg)
            if len(ran) == n:
                raise KeyboardInterrupt

    return hook


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_overwrite_keeps_the_old_run_until_the_new_one_is_complete(small_recipe, tmp_path):
    recipe, out = load_recipe(small_recipe), tmp_path / "run"
    first = run_experiment(recipe, out, progress=False, log=lambda line: None)
    finished = _snapshot(out)
    with pytest.raises(KeyboardInterrupt):  # killed in its third step (training)
        run_experiment(recipe, out, overwrite=True, progress=False, on_step=_stop_at(3),
                       log=lambda line: None)
    assert _snapshot(out) == finished
    again = run_experiment(recipe, out, resume=True, progress=False, log=lambda line: None)
    assert again["steps"]["reused"] == 2 and _values(again) == _values(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing beside it
    records = [p.read_text() for p in out.rglob("*.json")]
    assert records and not any(".replacing" in text for text in records)
    train = json.loads((out / "arms" / "transfer" / "seed-1" / "train" / "train.json").read_text())
    assert train["adapter"] == str(out / "arms" / "transfer" / "adapter")


def test_bad_data_is_found_before_any_work(tiny_recipe, tmp_path):
    """A bad line in the evaluation file fails before sensitivity, not after training."""
    task = yaml.safe_load(tiny_recipe.read_text())["task"]
    bad = tmp_path / "test.jsonl"
    bad.write_text(Path(task["eval"]).read_text().replace("{", '{"messages": []}\n{', 1))
    recipe = load_recipe(_write(tmp_path, tiny_recipe, task={**task, "eval": str(bad)}))
    started: list[str] = []
    with pytest.raises(UserError, match=r"test.jsonl:1: "):
        run_experiment(recipe, tmp_path / "run", progress=False, on_step=started.append)
    assert started == [] and not (tmp_path / "run").exists()
    long = tmp_path / "long.jsonl"  # longer than the student's context of 2048 tokens
    long.write_text(json.dumps({"messages": [
        {"role": "user", "content": "Question: " + "x" * 2100 + "?"},
        {"role": "assistant", "content": "So the answer is 1."}]}) + "\n")
    recipe = load_recipe(_write(tmp_path, tiny_recipe, task={**task, "train": str(long)}))
    with pytest.raises(UserError, match="long.jsonl: no example has an answer token"):
        run_experiment(recipe, tmp_path / "run", progress=False, on_step=started.append)
    recipe = load_recipe(_write(tmp_path, tiny_recipe, task={**task, "eval": str(long)}))
    with pytest.raises(UserError, match=r"long.jsonl:1: the prompt is \d+ tokens"):
        run_experiment(recipe, tmp_path / "run", progress=False, on_step=started.append)
    assert started == [] and not (tmp_path / "run").exists()


def test_recipe_paths_are_relative_to_the_recipe_file(model_pairs, tiny_recipe, tmp_path,
                                                      monkeypatch):
    import shutil

    raw = yaml.safe_load(tiny_recipe.read_text())
    folder = tmp_path / "recipes"
    shutil.copytree(model_pairs["llama"][0], folder / "pair" / "teacher")
    shutil.copy(raw["task"]["train"], folder / "train.jsonl")
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump({**raw, "teacher": "pair/teacher", "rank": 4,
                                    "task": {**raw["task"], "train": "train.jsonl"}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # wherever `run` starts, the recipe's folder decides
    recipe = load_recipe(path)
    assert recipe.teacher == str(folder / "pair" / "teacher")
    assert recipe.task.train == folder / "train.jsonl"
    # A folder that exists only relative to the working folder is not silently taken.
    shutil.move(str(folder / "pair"), str(elsewhere / "pair"))
    with pytest.raises(UserError, match=r"teacher: pair/teacher is a folder relative to the "
                                        r"working folder, not to the recipe's folder"):
        load_recipe(path)
    path.write_text(yaml.safe_dump({**raw, "teacher": "./pair/teacher"}))
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(path)
    path.write_text(yaml.safe_dump({**raw, "rank": 4.7}))
    with pytest.raises(UserError, match=r"--rank: expected a whole number \(got 4.7\)"):
        load_recipe(path)


# --------------------------------------------------------------------------- round two (issue 23)


def _copy_recipe(base: Path, folder: Path, **changes) -> Path:
    """`base` with its training file copied into `folder` (so a test may change it)."""
    import shutil

    raw = yaml.safe_load(base.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    train = Path(shutil.copy(raw["task"]["train"], folder / "train.jsonl"))
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump({**raw, "task": {**raw["task"], "train": str(train)},
                                    **changes}))
    return path


def test_resume_refuses_when_an_input_changed(small_recipe, tmp_path):
    """`run --resume` after the training file's rows changed would mix two data sets in one
    table: refused, naming the input."""
    path = _copy_recipe(small_recipe, tmp_path / "in")
    recipe, out = load_recipe(path), tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # in its third step (the first training)
        run_experiment(recipe, out, progress=False, on_step=_stop_at(3), log=lambda line: None)
    train = recipe.task.train
    rows = train.read_text().splitlines()
    train.write_text("\n".join([rows[1], rows[0], *rows[2:]]) + "\n")  # same rows, reordered
    with pytest.raises(UserError, match=r"--resume: .*task\.train changed since the run "
                                        r"started") as e:
        run_experiment(load_recipe(path), out, resume=True, progress=False,
                       log=lambda line: None)
    assert "\n" not in str(e.value)


def test_resume_takes_a_recipe_that_only_adds_arms(small_recipe, tmp_path):
    """A finished study grown by one arm runs only that arm's steps; its row joins the table.
    Changing a finished arm's settings is still refused."""
    raw = yaml.safe_load(small_recipe.read_text())
    out = tmp_path / "run"
    first = run_experiment(load_recipe(small_recipe), out, progress=False, log=lambda line: None)
    arms = {row["arm"] for row in first["arms"]}
    grown = tmp_path / "grown" / small_recipe.name  # the recipe's name is its file's
    grown.parent.mkdir()
    grown.write_text(yaml.safe_dump({**raw, "arms": {"transfer": {}, "lora": {"init": "standard"},
                                                     "pissa": {"init": "pissa"}}}))
    lines: list[str] = []
    again = run_experiment(load_recipe(grown), out, resume=True, progress=False,
                           log=lines.append)
    assert {row["arm"] for row in again["arms"]} == arms | {"pissa"}
    assert again["steps"]["reused"] == first["steps"]["ran"]
    ran = [line for line in lines if not line.endswith("complete from an earlier run")]
    assert again["steps"]["ran"] == 2 and len(ran) == 2, lines
    assert all("pissa" in line for line in ran), lines
    assert {k: v for k, v in _values(again).items() if k in arms} == _values(first)
    assert "pissa" in json.loads((out / "recipe.json").read_text())["arms"]
    changed = tmp_path / "changed" / small_recipe.name
    changed.parent.mkdir()
    changed.write_text(yaml.safe_dump({**raw, "arms": {"transfer": {}, "lora": {"init": "standard"},
                                                       "pissa": {"init": "spectrum"}}}))
    with pytest.raises(UserError, match=r"was run with another recipe \(arms differ"):
        run_experiment(load_recipe(changed), out, resume=True, progress=False,
                       log=lambda line: None)


def test_resume_takes_a_run_folder_older_than_a_setting(small_recipe, tmp_path, capsys):
    """A run folder whose recipe.json predates a setting (the tool gained it since) resumes
    when the recipe leaves it at its default, saying so; a value other than the default is a
    changed recipe."""
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # in its third step (the first training)
        run_experiment(load_recipe(small_recipe), out, progress=False, on_step=_stop_at(3),
                       log=lambda line: None)
    record = out / "recipe.json"
    saved = json.loads(record.read_text())
    del saved["overlong"]
    record.write_text(json.dumps(saved))
    capsys.readouterr()
    again = run_experiment(load_recipe(small_recipe), out, resume=True, progress=False,
                           log=lambda line: None)
    assert again["steps"]["reused"] == 2
    assert "predates the setting(s) overlong" in capsys.readouterr().err
    record.write_text(json.dumps(saved))
    raw = yaml.safe_load(small_recipe.read_text())
    other = tmp_path / "other" / small_recipe.name
    other.parent.mkdir()
    other.write_text(yaml.safe_dump({**raw, "overlong": "truncate"}))
    with pytest.raises(UserError, match=r"another recipe \(overlong differ"):
        run_experiment(load_recipe(other), out, resume=True, progress=False,
                       log=lambda line: None)


def test_a_model_fingerprint_follows_its_weights(small_recipe, tmp_path):
    """What `run --resume` compares a model folder by: a changed bit of the weights shows."""
    import shutil

    from paratransfer.experiment.inputs import model_digest

    student = Path(load_recipe(small_recipe).student)
    weights = student / "model.safetensors"
    before = model_digest(str(student))
    copy = tmp_path / "student"
    shutil.copytree(student, copy)
    assert model_digest(str(copy)) == before
    blob = bytearray((copy / weights.name).read_bytes())
    blob[-1] ^= 1  # one bit of the last tensor
    (copy / weights.name).write_bytes(bytes(blob))
    assert model_digest(str(copy)) != before


@pytest.mark.parametrize("name", ["../../../escaped", "p/.", "a/b", ".", "..", ".hidden",
                                  "p.", "", "x" * 65, 7])
def test_arm_names_are_plain_names(tiny_recipe, tmp_path, name):
    arms = {"transfer": {}, "lora": {"init": "standard"}, name: {"init": "pissa"}}
    with pytest.raises(UserError, match="an arm's name must be a plain name"):
        load_recipe(_write(tmp_path, tiny_recipe, arms=arms))


def test_arm_names_differing_only_in_case_are_refused(tiny_recipe, tmp_path):
    arms = {"transfer": {}, "lora": {"init": "standard"}, "p": {"init": "pissa"},
            "P": {"init": "spectrum"}}
    with pytest.raises(UserError, match=r"arms\.[pP]: differs from arm '[pP]' only in case"):
        load_recipe(_write(tmp_path, tiny_recipe, arms=arms))
    arms = {"transfer": {}, "lora": {"init": "standard"}, "first-layers_2.b": {"layers": "first"}}
    assert "first-layers_2.b" in load_recipe(_write(tmp_path, tiny_recipe, arms=arms)).arms


def test_eval_batch_size_is_named_by_its_recipe_key(tiny_recipe, tmp_path):
    with pytest.raises(UserError, match=r"eval_batch_size: must be an integer of at least 1 "
                                        r"\(got 0\)") as e:
        load_recipe(_write(tmp_path, tiny_recipe, eval_batch_size=0))
    assert "--batch-size" not in str(e.value)


def test_distill_arm_across_vocabularies_is_refused_before_any_work(tiny_recipe, tmp_path):
    from paratransfer.demo.tiny import marker_tokenizer, save_tiny, tiny_model

    other = marker_tokenizer()
    teacher = save_tiny(tiny_model("llama", vocab=len(other), hidden=16, layers=1, heads=2),
                        other, tmp_path / "other-teacher")
    arms = {"transfer": {}, "lora": {"init": "standard"},
            "distill": {"init": "standard", "distill": True}}
    recipe = load_recipe(_write(tmp_path, tiny_recipe, teacher=str(teacher), arms=arms,
                                min_vocab_coverage=0.0))
    started: list[str] = []
    with pytest.raises(UserError, match=r"arms\.distill: --distill .*another vocabulary"):
        run_experiment(recipe, tmp_path / "run", progress=False, on_step=started.append)
    assert started == [] and not (tmp_path / "run").exists()


def test_a_failing_chain_under_jobs_names_its_arm_and_seed(small_recipe, tmp_path):
    """A non-finite loss in a worker: the one line says which arm and seed it was."""
    recipe = load_recipe(_write(tmp_path, small_recipe, lr=1e30, max_steps=4))
    with pytest.raises(UserError, match=r"^train (transfer|lora) seed 1: step \d+: the "
                                        r"(loss|LoRA weight).* became non-finite") as e:
        run_experiment(recipe, tmp_path / "run", progress=False, log=lambda line: None, jobs=2)
    assert "\n" not in str(e.value)


def test_jobs_beyond_any_count_runs_every_chain_at_once(small_recipe, tmp_path):
    """--jobs 3000000000 is "all chains at once", not an OverflowError after the shared steps."""
    recipe = load_recipe(small_recipe)
    result = run_experiment(recipe, tmp_path / "run", progress=False, log=lambda line: None,
                            jobs=3_000_000_000)
    assert result["steps"]["ran"] == 6
    with pytest.raises(UserError, match="--jobs: expected a whole number"):
        run_experiment(recipe, tmp_path / "other", progress=False, jobs=2.5)
