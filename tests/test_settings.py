"""A step setting is declared once (a dataclass field via `setting`); its flag, its recipe key
and its recorded value are derived from that field."""

from __future__ import annotations

import argparse
import dataclasses

from paratransfer.cli.entry import build_parser
from paratransfer.evaluate import TASKS, get_task
from paratransfer.evaluate.settings import EvalSettings
from paratransfer.experiment.recipe import SETTING_DEFAULTS, STEP_KEYS, TASK_TYPES
from paratransfer.extract.settings import ExtractSettings
from paratransfer.io.settings import add_setting_flags, flag_fields, from_args, recipe_keys, setting
from paratransfer.sensitivity.settings import SensitivitySettings
from paratransfer.stability.settings import RECIPE_KEYS, StabilitySettings
from paratransfer.train import TrainSettings

REQUIRED = ["train", "--student", "s", "--data", "d", "--out", "o"]


def test_train_flags_default_to_the_fields():
    assert from_args(TrainSettings, build_parser().parse_args(REQUIRED)) == TrainSettings()


def test_every_train_flag_field_reaches_the_settings():
    args = build_parser().parse_args(REQUIRED + [
        "--epochs", "2", "--lr", "0.001", "--max-steps", "7", "--modules", "attn,head",
        "--distill", "teacher-folder", "--distill-weight", "0.25", "--seed", "9"])
    s = from_args(TrainSettings, args)
    assert (s.epochs, s.lr, s.max_steps, s.distill, s.distill_weight, s.seed) == (
        2, 0.001, 7, "teacher-folder", 0.25, 9)
    assert s.modules == ("q", "k", "v", "o", "head")
    assert {f.name for f in flag_fields(TrainSettings)} <= set(vars(args))


def test_recipe_train_keys_are_the_recipe_fields():
    assert STEP_KEYS["train"] == recipe_keys(TrainSettings)
    assert list(STEP_KEYS["train"]) == [f.name for f in dataclasses.fields(TrainSettings)
                                        if f.metadata["recipe"]]
    assert STEP_KEYS["train"]["distill"] is False  # a recipe says true/false, not a path
    assert STEP_KEYS["train"]["epochs"] == TrainSettings().epochs


def test_a_new_setting_is_one_declaration():
    @dataclasses.dataclass(frozen=True)
    class Step:
        width: int = setting(4, "how wide (default {default})", recipe=True)
        hidden: float = setting(0.5, "not a flag", flag=False)

    p = argparse.ArgumentParser()
    add_setting_flags(p, Step)
    assert from_args(Step, p.parse_args(["--width", "6"])) == Step(width=6)
    assert "how wide (default 4)" in p.format_help()
    assert recipe_keys(Step) == {"width": 4}
    assert dataclasses.asdict(Step()) == {"width": 4, "hidden": 0.5}


# --------------------------------------------------------------------------- the other steps

#: command -> its required arguments.
REQUIRED_OF = {
    "sensitivity": ["--teacher", "t", "--seeds", "s", "--out", "o"],
    "extract": ["--teacher", "t", "--student", "s", "--out", "o"],
    "evaluate": ["--model", "m", "--task", "gsm", "--data", "d", "--out", "o"],
    "stability": ["--teacher", "t", "--student", "s", "--seeds", "x", "--out", "o"],
}


def _args(command: str, *extra: str) -> argparse.Namespace:
    return build_parser().parse_args([command, *REQUIRED_OF[command], *extra])


def test_step_flags_default_to_the_fields():
    for command in ("sensitivity", "extract", "stability"):
        assert from_args(SensitivitySettings, _args(command)) == SensitivitySettings()
    assert from_args(ExtractSettings, _args("extract")) == ExtractSettings()
    assert from_args(EvalSettings, _args("evaluate"), task="gsm") == EvalSettings("gsm")
    assert from_args(StabilitySettings, _args("stability")) == StabilitySettings()


def test_every_step_flag_reaches_its_settings():
    args = _args("extract", "--rank", "8", "--alpha", "4", "--layers", "first", "--reduce",
                 "rows-cols", "--modules", "attn", "--svd", "exact", "--seed", "3", "--dropout",
                 "0.1", "--min-vocab-coverage", "0.25", "--allow-pad", "--max-length", "64",
                 "--max-samples", "2", "--prompt-format", "chat-template")
    assert from_args(ExtractSettings, args) == ExtractSettings(
        rank=8, alpha=4.0, layers="first", reduce="rows-cols", modules=("q", "k", "v", "o"),
        svd="exact", seed=3, dropout=0.1, min_vocab_coverage=0.25, allow_pad=True)
    assert from_args(SensitivitySettings, args) == SensitivitySettings("chat-template", 64, 2)
    args = _args("evaluate", "--shots", "2", "--limit", "5", "--batch-size", "3",
                 "--max-new-tokens", "7", "--prompt-format", "chat-template",
                 "--judge-prompt-format", "tulu")
    assert from_args(EvalSettings, args, task="gsm") == EvalSettings(
        "gsm", shots=2, limit=5, batch_size=3, max_new_tokens=7, prompt_format="chat-template",
        judge_prompt_format="tulu")
    args = _args("stability", "--sizes", "4,2", "--draws", "3", "--seed", "5", "--rank", "2")
    assert from_args(StabilitySettings, args) == StabilitySettings((2, 4), 3, 5)
    for cls, command in ((ExtractSettings, "extract"), (SensitivitySettings, "sensitivity"),
                         (StabilitySettings, "stability")):
        assert {f.name for f in flag_fields(cls)} <= set(vars(_args(command))) | (
            {"alpha", "dropout", "layers"} if command == "stability" else set())


def test_recipe_step_keys_are_the_recipe_fields():
    assert STEP_KEYS["sensitivity"] == recipe_keys(SensitivitySettings)
    assert STEP_KEYS["extract"] == recipe_keys(ExtractSettings)
    assert "seed" not in STEP_KEYS["extract"]  # the recipe's `seeds` list drives it
    assert STEP_KEYS["evaluate"] == {**recipe_keys(EvalSettings), "shots_data": None}
    assert "eval_batch_size" in STEP_KEYS["evaluate"] and "batch_size" not in STEP_KEYS["evaluate"]
    assert RECIPE_KEYS == ("sizes", "draws", "seed")
    # a recipe that sets nothing gets every step's defaults
    assert SensitivitySettings.from_recipe(SETTING_DEFAULTS) == SensitivitySettings()
    assert ExtractSettings.from_recipe(SETTING_DEFAULTS, seed=0) == ExtractSettings()
    assert EvalSettings.from_recipe("mmlu", SETTING_DEFAULTS) == EvalSettings("mmlu")
    assert StabilitySettings.from_recipe({}) == StabilitySettings()
    assert EvalSettings.from_recipe("gsm", {**SETTING_DEFAULTS, "eval_batch_size": 5}).batch_size == 5


def test_a_boolean_setting_is_a_switch():
    @dataclasses.dataclass(frozen=True)
    class Step:
        pad: bool = setting(False, "pad it")

    p = argparse.ArgumentParser()
    add_setting_flags(p, Step)
    assert from_args(Step, p.parse_args([])) == Step()
    assert from_args(Step, p.parse_args(["--pad"])) == Step(pad=True)


def test_tasks_are_registered_once():
    from paratransfer.sources import FORMATS

    assert TASK_TYPES == tuple(TASKS)
    assert {f.evaluate_task for f in FORMATS.values()} <= set(TASKS)
    commands = build_parser()._subparsers._group_actions[0].choices
    assert "|".join(FORMATS) in commands["data"].format_help()


def test_a_laten_field_is_its_flag_its_recipe_key_and_its_laten_json_entry():
    from paratransfer.io.settings import flag_name, recipe_name
    from paratransfer.laten.settings import LatenSettings

    required = ["laten", "--teacher", "t", "--student", "s", "--seeds", "x", "--out", "o"]
    commands = build_parser()._subparsers._group_actions[0].choices
    text = commands["laten"].format_help()
    assert from_args(LatenSettings, build_parser().parse_args(required)) == LatenSettings()
    record = LatenSettings().record()
    for f in dataclasses.fields(LatenSettings):
        assert (flag_name(f) in text) == f.metadata["flag"], f.name
        assert (recipe_name(f) in STEP_KEYS["laten"]) == f.metadata["recipe"], f.name
        assert f.name in record
    # `roles` is `--modules`, as extraction's and training's module flags are
    assert flag_name(next(f for f in dataclasses.fields(LatenSettings) if f.name == "roles")) \
        == "--modules"
    args = build_parser().parse_args(required + ["--modules", "up, down", "--rate", "0.2",
                                                 "--reg-weight", "5"])
    s = from_args(LatenSettings, args)
    assert (s.roles, s.rate, s.reg_weight) == (("up", "down"), 0.2, 5.0)
    assert s.record()["roles"] == ["up", "down"] and s.record()["rate"] == 0.2
    assert STEP_KEYS["laten"] == {"laten": "none", **recipe_keys(LatenSettings)}
    assert STEP_KEYS["laten"]["laten_lr"] == LatenSettings().lr
    assert LatenSettings.from_recipe({**SETTING_DEFAULTS, "laten_steps": 3}, seed=5) == \
        LatenSettings(steps=3, seed=5, max_length=SETTING_DEFAULTS["max_length"])


def test_a_registered_strategy_is_in_the_help_and_accepted_without_other_edits(monkeypatch):
    """Strategy names in help texts and error messages come from their registries."""
    from paratransfer.extract import factorize, strategies
    from paratransfer.train import inits

    monkeypatch.setitem(strategies.REDUCERS, "middle-block", strategies.Reduction(
        lambda sens, rows, cols, generator, units: None, help="the centre of the matrix"))
    monkeypatch.setitem(strategies.LAYER_SELECTORS, "alternate", lambda scores, k, generator: [])
    monkeypatch.setitem(factorize.FACTORIZERS, "qr-sketch",
                        factorize.Method(lambda *a: None, "a QR sketch"))
    monkeypatch.setitem(inits.INITS, "zeros", dataclasses.replace(
        inits.INITS["standard"], name="zeros", help="both factors zero"))
    commands = build_parser()._subparsers._group_actions[0].choices
    text = "".join(commands["extract"].format_help().split())  # argparse wraps at dashes too
    assert "|middle-block(" in text and "middle-block:thecentreofthematrix" in text
    assert "|alternate(" in text and "qr-sketch(aQRsketch)" in text
    args = _args("extract", "--reduce", "middle-block", "--layers", "alternate",
                 "--svd", "qr-sketch")
    assert from_args(ExtractSettings, args).reduce == "middle-block"
    for bad, flag in (({"reduce": "nope"}, "--reduce"), ({"svd": "nope"}, "--svd")):
        try:
            ExtractSettings(**bad)
        except Exception as e:  # noqa: BLE001 - the message is what is checked
            assert flag in str(e) and ("middle-block" in str(e) or "qr-sketch" in str(e))
    train = "".join(commands["train"].format_help().split())
    assert "zeros:bothfactorszero" in train and ",zeros}" in train
    args = build_parser().parse_args(REQUIRED + ["--init", "zeros"])
    assert from_args(TrainSettings, args).init == "zeros"


def test_a_task_declared_in_one_module_reaches_data_evaluate_and_recipes(tmp_path):
    """A task module declares its TASK and FORMATS; registering it is the only other step."""
    import types

    from paratransfer.experiment.recipe import load_recipe
    from paratransfer.sources import FORMATS, get_format
    from paratransfer.tasks import registry
    from paratransfer.tasks.task import Field, Item, Task, TaskFormat, chat, text

    def to_item(example):
        return Item(example, example.answer, example.messages[-2]["content"])

    fake = types.SimpleNamespace(
        TASK=Task(name="echo", description="repeat the question", metrics={"accuracy": "correct"},
                  to_item=to_item, score=lambda output, item: {"parsed": output,
                                                               "correct": output == item.gold}),
        FORMATS=(TaskFormat(name="echo", description="echo records", fields=(
            Field("question", "question", "what to repeat"),),
            messages=lambda row: chat(text(row, "question"), text(row, "question")),
            evaluate_task="echo", train_split="train", eval_split="test"),))
    saved = dict(registry.TASKS), dict(registry.FORMATS)
    try:
        registry.register(fake)
        assert get_task("echo") is fake.TASK and get_format("echo") is fake.FORMATS[0]
        assert "echo" in FORMATS and "echo" in TASKS  # the registry's dicts, where read
        commands = build_parser()._subparsers._group_actions[0].choices
        assert "|echo" in commands["data"].format_help()
        assert "echo: echo records" in commands["data"].format_help()
        assert "|echo" in commands["evaluate"].format_help()
        for name in ("seeds", "train", "eval"):
            (tmp_path / f"{name}.jsonl").write_text("{}\n", encoding="utf-8")
        recipe = tmp_path / "r.yaml"
        recipe.write_text("teacher: org/teacher\nstudent: org/student\ntask: {type: echo, "
                          "seeds: seeds.jsonl, train: train.jsonl, eval: eval.jsonl}\n",
                          encoding="utf-8")
        assert load_recipe(recipe).task.type == "echo"
        assert EvalSettings.from_recipe("echo", SETTING_DEFAULTS).task == "echo"
    finally:
        for live, before in zip((registry.TASKS, registry.FORMATS), saved, strict=True):
            live.clear()
            live.update(before)
    assert "echo" not in TASKS and "echo" not in FORMATS
