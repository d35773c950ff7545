"""A step setting is declared once (a dataclass field via `setting`); its flag, its recipe key
and its recorded value are derived from that field."""

from __future__ import annotations

import argparse
import dataclasses

from paratransfer.cli.entry import build_parser
from paratransfer.experiment.recipe import STEP_KEYS
from paratransfer.io.settings import add_setting_flags, flag_fields, from_args, recipe_keys, setting
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
