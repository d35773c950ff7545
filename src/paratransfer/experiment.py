"""`paratransfer run RECIPE`: sensitivity once, then extract -> train -> evaluate per arm and
seed, reference rows, and the results table — every step in its own sub-folder, so `--resume`
skips what is done and an interruption loses at most the step in progress.

Layout of RUN_DIR:
    recipe.json                      the validated recipe, as run
    sensitivity.safetensors          the teacher's sensitivity (shared by every arm)
    reference/{student,teacher}/     evaluation of the untrained student and of the teacher
    arms/ARM/adapter[-seedS]/        extraction (seed-specific only for random strategies)
    arms/ARM/seed-S/train/           training run (plain LoRA on the student)
    arms/ARM/seed-S/eval/            evaluation of student + that LoRA
    results.{json,md,png}, sensitivity.png
    stability/                       the stability report, when the recipe asks for one
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from paratransfer.errors import UserError
from paratransfer.evaluate.run import EvalSettings
from paratransfer.extract import ExtractSettings
from paratransfer.outputs import write_json
from paratransfer.recipe import Recipe
from paratransfer.train.settings import TrainSettings

#: Called with a short description before each step starts (progress for people, hooks for tests).
StepHook = Callable[[str], None]


def prepare_out(out: Path, recipe: Recipe, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs: an existing RUN_DIR needs --resume (same recipe) or --overwrite."""
    import shutil

    record = out / "recipe.json"
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not resume:
            raise UserError(f"{out}: already exists (pass --resume to continue it, or "
                            "--overwrite to start again)")
        elif not record.is_file():
            raise UserError(f"{out}: not a paratransfer run folder (no recipe.json)")
        else:
            old = json.loads(record.read_text())
            if old != json.loads(json.dumps(recipe.to_dict())):
                raise UserError(f"{out}: was run with another recipe (recipe.json differs); "
                                "use a new --out or --overwrite")
    elif resume and not out.exists():
        raise UserError(f"--resume: nothing to resume in {out}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(record, recipe.to_dict())


class Runner:
    """Runs a recipe's steps in order, skipping those whose output is already complete."""

    def __init__(self, recipe: Recipe, out: Path, progress: bool = True,
                 on_step: StepHook | None = None):
        from paratransfer.devices import pick_device, pick_dtype

        self.recipe, self.out, self.progress = recipe, out, progress
        self.on_step = on_step or (lambda msg: print(msg, flush=True))
        self.device = pick_device(recipe.settings["device"])
        self.dtype = pick_dtype(recipe.settings["dtype"], self.device)
        self.done: list[str] = []

    def step(self, label: str, complete: Path, work: Callable[[], Any]) -> None:
        """Run `work` unless `complete` (its final output file) exists."""
        if complete.exists():
            self.on_step(f"[done] {label}")
            return
        self.on_step(f"[run ] {label}")
        started = time.time()
        work()
        self.done.append(f"{label} ({time.time() - started:.1f}s)")

    # -- steps ---------------------------------------------------------------------------
    def sensitivity(self) -> Path:
        from paratransfer.pipeline import SensitivitySettings, run_sensitivity

        s, path = self.recipe.settings, self.out / "sensitivity.safetensors"
        settings = SensitivitySettings.from_recipe(s)
        self.step("sensitivity of the teacher", path, lambda: run_sensitivity(
            self.recipe.teacher, self.recipe.task.seeds, path, settings, self.dtype,
            self.device, overwrite=True, progress=self.progress))
        return path

    def evaluate(self, label: str, model: str, out: Path, s: dict[str, Any],
                 adapter: Path | None = None) -> Path:
        from paratransfer.evaluate.run import run_evaluate

        self.step(label, out / "metrics.json", lambda: run_evaluate(
            model, self.recipe.task.eval, out, EvalSettings.from_recipe(self.recipe.task.type, s), adapter=adapter,
            shots_data=s["shots_data"] if s["shots"] else None, dtype=self.dtype, device=self.device, overwrite=True,
            progress=self.progress))
        return out / "metrics.json"

    def extract(self, arm: str, seed: int, sens: Path) -> Path | None:
        from paratransfer.pipeline import run_extract

        s = self.recipe.arm_settings(arm)
        if s["init"] != "transfer":
            return None
        name = f"adapter-seed{seed}" if self.recipe.uses_random(arm) else "adapter"
        folder = self.out / "arms" / arm / name
        self.step(f"extract {arm}" + (f" (seed {seed})" if "seed" in name else ""),
                  folder / "transfer.json", lambda: run_extract(
                      self.recipe.teacher, self.recipe.student, folder,
                      ExtractSettings.from_recipe(s, seed), sensitivity_path=sens,
                      dtype=self.dtype, device=self.device, overwrite=True,
                      progress=self.progress))
        return folder

    def train(self, arm: str, seed: int, adapter: Path | None) -> Path:
        from paratransfer.train import last_checkpoint, run_train

        s = self.recipe.arm_settings(arm)
        folder = self.out / "arms" / arm / f"seed-{seed}" / "train"

        def work() -> None:
            resume = last_checkpoint(folder) is not None
            run_train(self.recipe.student, self.recipe.task.train, folder,
                      TrainSettings.from_recipe(s, seed), adapter_dir=adapter, dtype=self.dtype,
                      device=self.device, resume=resume, overwrite=not resume,
                      progress=self.progress)

        self.step(f"train {arm} seed {seed}", folder / "train.json", work)
        return folder

    def stability(self) -> Path:
        """The stability report of the transfer arm's choices over subsets of the task's seeds."""
        from paratransfer.pipeline import SensitivitySettings
        from paratransfer.stability import StabilitySettings, run_stability

        s, folder = self.recipe.settings, self.out / "stability"
        settings = StabilitySettings.from_recipe(self.recipe.stability)
        self.step("stability over seed subsets", folder / "stability.json", lambda: run_stability(
            self.recipe.teacher, self.recipe.student, self.recipe.task.seeds, folder, settings,
            ExtractSettings.from_recipe(s, settings.seed), SensitivitySettings.from_recipe(s),
            dtype=self.dtype, device=self.device, overwrite=True, progress=self.progress))
        return folder

    def run(self) -> dict[str, Any]:
        recipe = self.recipe
        sens = self.sensitivity()
        refs: dict[str, Path] = {}
        for who in recipe.references:
            model = recipe.student if who == "student" else recipe.teacher
            refs[who] = self.evaluate(f"evaluate the {who} (reference)", model,
                                      self.out / "reference" / who, recipe.settings)
        metrics: dict[str, dict[int, Path]] = {arm: {} for arm in recipe.arms}
        adapters: dict[str, Path] = {}
        for seed in recipe.seeds:
            for arm in recipe.arms:
                adapter = self.extract(arm, seed, sens)
                if adapter is not None:
                    adapters.setdefault(arm, adapter)
                run_dir = self.train(arm, seed, adapter)
                metrics[arm][seed] = self.evaluate(
                    f"evaluate {arm} seed {seed}", recipe.student,
                    self.out / "arms" / arm / f"seed-{seed}" / "eval",
                    recipe.arm_settings(arm), adapter=run_dir)
        from paratransfer.results import write_results

        result = write_results(self.out, recipe, metrics, refs, adapters, sens)
        if recipe.stability is not None:
            self.stability()
        return result


def run_experiment(recipe: Recipe, out: str | Path, resume: bool = False,
                   overwrite: bool = False, progress: bool = True,
                   on_step: StepHook | None = None) -> dict[str, Any]:
    """`paratransfer run`: every step of the recipe; returns results.json's content."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other (give one)")
    out = Path(out)
    prepare_out(out, recipe, resume, overwrite)
    return Runner(recipe, out, progress, on_step).run()
