"""Recipes: one YAML file naming teacher, student, task, arms, seeds and any step setting.

Settings use the CLI flags' names (underscores or dashes). The few flags whose names two steps
share with different meanings are told apart: `batch_size` is training's, evaluation's is
`eval_batch_size`; `seed` is not a key — the `seeds` list drives training and the random
strategies alike. Every check runs before any work starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from paratransfer.evaluate import TASKS
from paratransfer.evaluate.settings import EvalSettings
from paratransfer.extract.settings import ExtractSettings
from paratransfer.io.checks import seed_number
from paratransfer.io.errors import UserError
from paratransfer.io.settings import recipe_keys
from paratransfer.laten.settings import LatenSettings
from paratransfer.sensitivity.settings import SensitivitySettings
from paratransfer.train.settings import TrainSettings

#: Every setting a recipe (or an arm) may change, by step, with its default.
STEP_KEYS: dict[str, dict[str, Any]] = {
    "sensitivity": recipe_keys(SensitivitySettings),
    "extract": recipe_keys(ExtractSettings),
    "train": recipe_keys(TrainSettings),  # the fields `setting(..., recipe=True)` declares
    # shots_data is an input file of the evaluation, not one of its settings
    "evaluate": {**recipe_keys(EvalSettings), "shots_data": None},
    # `laten` is the arm's mode (LATEN_MODES), the others LaTen's own settings
    "laten": {"laten": "none", **recipe_keys(LatenSettings)},
    "run": {"dtype": "auto", "device": "auto"},
}
#: What `laten` does to an arm: nothing, LaTen's injection evaluated as it is (no training), or
#: the injected student fine-tuned with the arm's LoRA (`init: standard`).
LATEN_MODES = ("none", "only", "lora")
SETTING_DEFAULTS: dict[str, Any] = {k: v for keys in STEP_KEYS.values() for k, v in keys.items()}
TOP_KEYS = {"teacher", "student", "task", "arms", "seeds", "references", "name", "stability"}
TASK_KEYS = {"type": None, "seeds": None, "train": None, "eval": None}
#: Optional task files: held-out examples whose loss training records (with `eval_every`).
OPTIONAL_TASK_KEYS = {"heldout": None}
#: The task types a recipe names: the evaluation tasks, as registered once in
#: `tasks/registry.py` (when this module was imported; `parse_recipe` reads the registry itself).
TASK_TYPES = tuple(TASKS)
DEFAULT_ARMS: dict[str, dict[str, Any]] = {"transfer": {}, "lora": {"init": "standard"}}


@dataclass(frozen=True)
class Task:
    type: str
    seeds: Path
    train: Path
    eval: Path
    heldout: Path | None = None


@dataclass
class Recipe:
    """A validated recipe: paths resolved against the recipe's folder, settings complete."""

    source: Path
    teacher: str
    student: str
    task: Task
    seeds: list[int]
    settings: dict[str, Any]
    arms: dict[str, dict[str, Any]]
    references: list[str] = field(default_factory=lambda: ["student", "teacher"])
    name: str = "experiment"
    stability: dict[str, Any] | None = None  # `stability: {sizes, draws, seed}`, as written

    def arm_settings(self, arm: str) -> dict[str, Any]:
        """The recipe's settings with the arm's one change applied."""
        return {**self.settings, **self.arms[arm]}

    def uses_random(self, arm: str) -> bool:
        s = self.arm_settings(arm)
        return s["layers"] == "random" or s["reduce"] == "random"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "teacher": self.teacher, "student": self.student,
                "task": {k: str(v) for k, v in vars(self.task).items() if v is not None},
                "seeds": self.seeds, "arms": self.arms, "references": self.references,
                **self.settings,
                **({"stability": self.stability} if self.stability is not None else {})}


def _norm(key: Any, where: str) -> str:
    if not isinstance(key, str):
        raise UserError(f"{where}: key {key!r} is not a name")
    return key.replace("-", "_")


def _model_ref(value: Any, where: str, base: Path) -> str:
    """A model folder relative to the recipe's folder (or absolute, or under ~), else a hub id.

    A value that is a folder only relative to the working folder is refused: recipe paths are
    relative to the recipe file, wherever `run` is started from.
    """
    from paratransfer.teacher.models import looks_like_path

    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: expected a model folder or hub id")
    given = Path(value).expanduser()
    local = given if given.is_absolute() else base / given
    if local.exists():
        return str(local)
    if looks_like_path(value):
        raise UserError(f"{where}: {local} does not exist (paths are relative to the recipe file)")
    if given.exists():
        raise UserError(f"{where}: {value} is a folder relative to the working folder, not to the "
                        f"recipe's folder {base} (paths in a recipe are relative to the recipe "
                        "file: write it so, or give an absolute path)")
    return value


def _file(value: Any, where: str, base: Path) -> Path:
    if not isinstance(value, str | Path):
        raise UserError(f"{where}: expected a file path")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise UserError(f"{where}: {path} is not a file")
    return path


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read and check a recipe; every error names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such recipe file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of recipe keys at the top level")
    raw = {_norm(k, str(path)): v for k, v in {**raw, **(overrides or {})}.items()}
    return parse_recipe(raw, path)


def parse_recipe(raw: dict[str, Any], path: Path) -> Recipe:
    """Check every key and value of a recipe mapping (see `load_recipe`)."""
    base = path.resolve().parent
    unknown = sorted(set(raw) - TOP_KEYS - set(SETTING_DEFAULTS))
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r} (expected one of: "
                        f"{', '.join(sorted(TOP_KEYS | set(SETTING_DEFAULTS)))})")
    for key in ("teacher", "student", "task"):
        if key not in raw:
            raise UserError(f"{path}: missing key {key!r}")
    task_raw = raw["task"]
    if not isinstance(task_raw, dict):
        raise UserError(f"{path}: task: expected a mapping with type, seeds, train, eval")
    task_raw = {_norm(k, f"{path}: task"): v for k, v in task_raw.items()}
    bad = sorted(set(task_raw) - set(TASK_KEYS) - set(OPTIONAL_TASK_KEYS))
    if bad:
        raise UserError(f"{path}: task.{bad[0]}: unknown key (expected type, seeds, train, eval, "
                        "and optionally heldout)")
    for key in TASK_KEYS:
        if key not in task_raw:
            raise UserError(f"{path}: task.{key}: missing")
    if task_raw["type"] not in TASKS:
        raise UserError(f"{path}: task.type: {task_raw['type']!r} is not a task "
                        f"(expected one of: {', '.join(TASKS)})")
    task = Task(task_raw["type"], *(_file(task_raw[k], f"{path}: task.{k}", base)
                                    for k in ("seeds", "train", "eval")),
                heldout=(_file(task_raw["heldout"], f"{path}: task.heldout", base)
                         if task_raw.get("heldout") is not None else None))
    seeds = raw.get("seeds", [1, 2, 3])
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise UserError(f"{path}: seeds: expected a list of distinct integers (got {seeds!r})")
    for s in seeds:
        seed_number(f"{path}: seeds", s)
    settings = {k: raw.get(k, v) for k, v in SETTING_DEFAULTS.items()}
    if settings["init"] != "transfer":
        raise UserError(f"{path}: init: the recipe's settings are the transfer arm's; give the "
                        "baseline as an arm (`lora: {init: standard}`)")
    if settings["distill"] is True:
        raise UserError(f"{path}: distill: the recipe's settings are every arm's (the lora "
                        "baseline's too); give distillation as an arm (`distill: {init: standard, "
                        "distill: true}`)")
    if settings["laten"] != "none":
        raise UserError(f"{path}: laten: the recipe's settings are every arm's; give LaTen as "
                        "arms (`laten: {laten: only}`, `laten-lora: {init: standard, laten: lora}`)")
    if settings["shots_data"] is not None:
        settings["shots_data"] = str(_file(settings["shots_data"], f"{path}: shots_data", base))
    arms = _parse_arms(raw.get("arms"), path)
    for arm, change in arms.items():
        if change.get("shots_data") is not None:
            change["shots_data"] = str(_file(change["shots_data"], f"{path}: arms.{arm}.shots_data",
                                             base))
    references = raw.get("references", ["student", "teacher"])
    if not isinstance(references, list) or set(references) - {"student", "teacher"}:
        raise UserError(f"{path}: references: expected a list of student and/or teacher")
    name = str(raw.get("name", path.stem))
    recipe = Recipe(path, _model_ref(raw["teacher"], f"{path}: teacher", base),
                    _model_ref(raw["student"], f"{path}: student", base), task, seeds, settings,
                    arms, references, name, raw.get("stability"))
    _check_settings(recipe)
    if settings["eval_every"] is not None and recipe.task.heldout is None:
        raise UserError(f"{path}: eval_every: give the held-out examples as task.heldout")
    _check_stability(recipe)
    return recipe


def _parse_arms(arms: Any, path: Path) -> dict[str, dict[str, Any]]:
    """Arms: name -> the ONE setting it changes against the transfer arm (or, with
    `init: standard`, against the lora arm: `distill: {init: standard, distill: true}`)."""
    if arms is None:
        return {k: dict(v) for k, v in DEFAULT_ARMS.items()}
    if isinstance(arms, list):  # names only: transfer, lora
        if not all(isinstance(a, str) and a in DEFAULT_ARMS for a in arms):
            raise UserError(f"{path}: arms: a list may name only {', '.join(DEFAULT_ARMS)}; "
                            "give ablations as a mapping (name: {setting: value})")
        return {a: dict(DEFAULT_ARMS[a]) for a in arms}
    if not isinstance(arms, dict) or not arms:
        raise UserError(f"{path}: arms: expected a mapping of arm name -> the setting it changes")
    out: dict[str, dict[str, Any]] = {}
    folded: dict[str, str] = {}
    for name, change in arms.items():
        where = f"{path}: arms.{name}"
        _check_arm_name(name, where, folded)
        change = {} if change is None else change
        if not isinstance(change, dict):
            raise UserError(f"{where}: expected a mapping of the one setting this arm changes")
        change = {_norm(k, where): v for k, v in change.items()}
        unknown = sorted(set(change) - set(SETTING_DEFAULTS))
        if unknown:
            raise UserError(f"{where}: unknown setting {unknown[0]!r}")
        against_lora = {k: v for k, v in change.items() if (k, v) != ("init", "standard")}
        if len(change) > 1 and len(against_lora) > 1:
            raise UserError(f"{where}: changes {len(change)} settings ({', '.join(sorted(change))}); "
                            "an arm changes one thing against the transfer arm or the lora arm")
        out[name] = change
    if "lora" not in out:
        raise UserError(f"{path}: arms: the baseline arm `lora` ({{init: standard}}) is missing")
    if out["lora"] != {"init": "standard"}:
        raise UserError(f"{path}: arms.lora: the baseline is {{init: standard}} and nothing else")
    return out


#: An arm's name is a folder under RUN_DIR/arms: a plain name, never a path.
ARM_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,62}[A-Za-z0-9_-])?")


def _check_arm_name(name: Any, where: str, folded: dict[str, str]) -> None:
    """Refuse names that would not be one folder of their own (`../x`, `p/.`, `p` and `P` on
    a case-insensitive disk): an arm's outputs must never land outside RUN_DIR or in another's."""
    if not isinstance(name, str) or not ARM_NAME.fullmatch(name):
        raise UserError(f"{where}: an arm's name must be a plain name (letters, digits, `_`, "
                        "`-`, `.`; starting with a letter or digit, not ending in `.`; at most 64 characters), "
                        f"got {name!r}")
    other = folded.setdefault(name.casefold(), name)
    if other != name:
        raise UserError(f"{where}: differs from arm {other!r} only in case (their folders would "
                        "be one on a case-insensitive disk)")


def _check_settings(recipe: Recipe) -> None:
    """Build every step's settings once for each arm so bad values fail before any work."""
    for arm in recipe.arms:
        s = recipe.arm_settings(arm)
        where = f"{recipe.source}: " + (f"arms.{arm}" if recipe.arms[arm] else "settings")
        try:
            SensitivitySettings.from_recipe(s)
            ExtractSettings.from_recipe(s, seed=recipe.seeds[0])
            TrainSettings.from_recipe(s, seed=recipe.seeds[0], teacher=recipe.teacher)
            EvalSettings.from_recipe(recipe.task.type, s)
            _check_laten(s)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        except (TypeError, ValueError) as e:
            raise UserError(f"{where}: a setting has the wrong type ({e})") from None


def _check_laten(s: dict[str, Any]) -> None:
    """`laten` is one of LATEN_MODES; `lora` fine-tunes from PEFT's standard init."""
    if s["laten"] not in LATEN_MODES:
        raise UserError(f"laten: {s['laten']!r} (expected one of: {', '.join(LATEN_MODES)})")
    if s["laten"] == "lora" and s["init"] != "standard":
        raise UserError("laten: lora fine-tunes the injected student from the standard LoRA "
                        "init (give the arm as {init: standard, laten: lora})")
    if s["laten"] != "none":
        try:
            LatenSettings.from_recipe(s, seed=0)
        except UserError as e:  # the settings name their flags; a recipe names its keys
            raise UserError(str(e).replace("--", "laten_", 1)) from None


def _check_stability(recipe: Recipe) -> None:
    """The stability report's settings, and its sizes against the seed file's record count."""
    if recipe.stability is None:
        return
    from paratransfer.stability.pool import StabilitySettings, check_extract_settings
    from paratransfer.tasks.examples import read_examples

    try:
        settings = StabilitySettings.from_recipe(recipe.stability)
        check_extract_settings(ExtractSettings.from_recipe(recipe.settings, settings.seed))
    except UserError as e:
        raise UserError(f"{recipe.source}: {e}") from None
    pool = len(read_examples(recipe.task.seeds, limit=recipe.settings["max_samples"]))
    if settings.sizes and settings.sizes[-1] > pool:
        raise UserError(f"{recipe.source}: stability.sizes: {settings.sizes[-1]} is larger than "
                        f"the pool ({pool} records in {recipe.task.seeds})")
