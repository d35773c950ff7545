"""`paratransfer run RECIPE`: sensitivity once, then extract -> train -> evaluate per arm and
seed, reference rows, and the results table — every step in its own sub-folder, so `--resume`
skips what is done and an interruption loses at most the step in progress.

Layout of RUN_DIR:
    recipe.json                      the validated recipe, as run
    inputs.json                      its data files' SHA-256 and models' fingerprints
    sensitivity.safetensors          the teacher's sensitivity (shared by every arm)
    reference/{student,teacher}/     evaluation of the untrained student and of the teacher
    arms/ARM/adapter[-seedS]/        extraction (seed-specific only for random strategies)
    arms/ARM/seed-S/train/           training run (plain LoRA on the student)
    arms/ARM/seed-S/eval/            evaluation of student + that LoRA
    arms/ARM/laten-seed-S/           LaTen's injection as an adapter (arms with `laten`)
    arms/ARM/laten-student-seed-S/   the injected student, merged (what `laten: lora` trains)
    results.{json,md,png}, sensitivity.png
    stability/                       the stability report, when the recipe asks for one
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paratransfer.evaluate.run import EvalSettings
from paratransfer.experiment.recipe import STEP_KEYS, Recipe
from paratransfer.extract.plan import ExtractSettings
from paratransfer.io.errors import UserError
from paratransfer.io.outputs import write_json
from paratransfer.train.inits import INITS
from paratransfer.train.settings import TrainSettings

#: Called with "[run ] LABEL" or "[done] LABEL" before each step (a hook for tests and tools).
StepHook = Callable[[str], None]


@dataclass
class Step:
    """One step of a run: what it is, the file that exists once it is complete, the work."""

    label: str
    done: Path
    work: Callable[[], str]  # does the step; returns what came out, in a few words
    chain: tuple[str, int] | None = None  # (arm, seed) of a training chain; None: shared steps


def prepare_out(out: Path, recipe: Recipe, resume: bool, overwrite: bool) -> Path:
    """Refuse to mix runs: an existing RUN_DIR needs --resume (same recipe) or --overwrite.

    Returns the folder to work in: RUN_DIR itself, or for a run replacing an existing RUN_DIR
    (`--overwrite`) a folder beside it (`outputs.replacing_dir`) that takes its place only once
    the run is complete; `--resume` continues such a replacement.
    """
    import shutil

    from paratransfer.io.outputs import replacing_dir

    staged = replacing_dir(out)
    if resume and (staged / "recipe.json").is_file():
        work = staged
    elif out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(staged, ignore_errors=True)  # an earlier replacement starts again
            work = staged
        elif not resume:
            raise UserError(f"{out}: already exists (pass --resume to continue it, or "
                            "--overwrite to start again)")
        else:
            work = out
    elif resume:
        raise UserError(f"--resume: nothing to resume in {out}")
    else:
        shutil.rmtree(staged, ignore_errors=True)  # abandoned: its RUN_DIR is gone
        work = out
    from paratransfer.experiment.inputs import (
        INPUTS_FILE,
        check_same_inputs,
        differences,
        input_digests,
    )

    record = work / "recipe.json"
    digests = input_digests(recipe)
    if resume and record.is_file():
        from paratransfer.io.console import notice
        from paratransfer.io.readers import read_json

        saved = read_json(record, "a run's recipe")
        now = json.loads(json.dumps(recipe.to_dict()))
        changed = differences(saved, now)
        newer = keys_since(saved, now, changed)
        if newer:  # a run folder of an earlier version: those settings did not exist yet
            notice(f"{out}: recipe.json predates the setting(s) {', '.join(newer)}; the "
                   "finished steps ran before they existed, the rest runs at their defaults")
            changed = [k for k in changed if k not in newer]
        added = added_arms(saved, now) if changed == ["arms"] else None
        if changed and added is None:
            raise UserError(f"{out}: was run with another recipe ({', '.join(changed)} differ "
                            "from recipe.json); use a new --out or --overwrite (a recipe that "
                            "only adds arms may resume)")
        if added:
            notice(f"{out}: the recipe adds the arms {', '.join(added)}; the finished steps "
                   "of the others are kept and the results are computed again")
        if not check_same_inputs(work, out, digests):
            notice(f"{out}: no {INPUTS_FILE} (a run folder of an earlier version): the data "
                   "and models the finished steps read cannot be compared; recorded now")
    elif resume:
        raise UserError(f"{out}: not a paratransfer run folder (no recipe.json)")
    work.mkdir(parents=True, exist_ok=True)
    write_json(record, recipe.to_dict())
    write_json(work / INPUTS_FILE, digests)
    return work


def keys_since(saved: dict, now: dict, changed: list[str]) -> list[str]:
    """The settings `saved` (an earlier version's recipe.json) lacks and `now` has at their
    defaults: added to the tool since that run started, not changed by the user."""
    from paratransfer.experiment.recipe import SETTING_DEFAULTS

    return [k for k in changed if k not in saved and k in SETTING_DEFAULTS
            and now.get(k) == json.loads(json.dumps(SETTING_DEFAULTS[k]))]


def added_arms(saved: dict, now: dict) -> list[str] | None:
    """The arms `now` adds to `saved` when it keeps every saved arm with the same settings
    (a study grown by an arm reuses what ran), else None."""
    before, after = saved.get("arms") or {}, now.get("arms") or {}
    if any(after.get(name) != settings for name, settings in before.items()):
        return None
    return [name for name in after if name not in before]


class Runner:
    """Plans a recipe's steps, then runs them in order, skipping those already complete.

    Prints one line per step when it ends (`[ k/N] label: what came out (seconds)`); the steps'
    own progress bars show only on a terminal and vanish when done.
    """

    def __init__(self, recipe: Recipe, out: Path, progress: bool = True,
                 on_step: StepHook | None = None, log: Callable[[str], None] | None = None):
        from paratransfer.io.devices import pick_device, pick_dtype

        self.recipe, self.out, self.progress = recipe, out, progress
        self.on_step = on_step or (lambda msg: None)
        self.log = log or (lambda line: print(line, flush=True))
        self.device = pick_device(recipe.settings["device"])
        self.dtype = pick_dtype(recipe.settings["dtype"], self.device)
        self.ran: list[tuple[str, float]] = []  # steps run now, with their seconds
        self.reused: list[str] = []  # steps complete from an earlier run

    # -- the steps -----------------------------------------------------------------------
    def sensitivity_step(self, path: Path) -> Step:
        from paratransfer.sensitivity.step import SensitivitySettings, run_sensitivity

        def work() -> str:
            meta = run_sensitivity(self.recipe.teacher, self.recipe.task.seeds, path,
                                   SensitivitySettings.from_recipe(self.recipe.settings),
                                   self.dtype, self.device, overwrite=True,
                                   progress=self.progress)
            return f"{meta['samples']} seed samples"

        return Step("sensitivity of the teacher", path, work)

    def evaluate_step(self, label: str, model: str, out: Path, s: dict[str, Any],
                      adapter: Path | None = None) -> Step:
        from paratransfer.evaluate.run import run_evaluate

        def work() -> str:
            m = run_evaluate(model, self.recipe.task.eval, out,
                             EvalSettings.from_recipe(self.recipe.task.type, s), adapter=adapter,
                             shots_data=s["shots_data"] if s["shots"] else None, dtype=self.dtype,
                             device=self.device, overwrite=True, progress=self.progress)
            return f"{m['metric']} {m['value']:.4f} on {m['n']} examples"

        return Step(label, out / "metrics.json", work)

    def extract_step(self, arm: str, seed: int, folder: Path, sens: Path) -> Step:
        from paratransfer.extract.step import run_extract

        s = self.recipe.arm_settings(arm)

        def work() -> str:
            report = run_extract(self.recipe.teacher, self.recipe.student, folder,
                                 ExtractSettings.from_recipe(s, seed), sensitivity_path=sens,
                                 dtype=self.dtype, device=self.device, overwrite=True,
                                 progress=self.progress)
            return (f"teacher layers {report['selected_layers']}, "
                    f"{len(report['modules'])} matrices")

        label = f"extract {arm}" + (f" (seed {seed})" if self.recipe.uses_random(arm) else "")
        return Step(label, folder / "transfer.json", work)

    def laten_step(self, arm: str, seed: int, folder: Path) -> Step:
        """LaTen: locate in teacher and student, train the translator, inject (an adapter)."""
        from paratransfer.laten import LatenSettings, run_laten

        s = self.recipe.arm_settings(arm)

        def work() -> str:
            report = run_laten(self.recipe.teacher, self.recipe.student, self.recipe.task.seeds,
                               folder, LatenSettings.from_recipe(s, seed),
                               data=self.recipe.task.train, dtype=self.dtype, device=self.device,
                               overwrite=True, progress=self.progress)
            last = report["curve"][-1]
            return (f"{len(report['curve'])} translator steps, LM loss {last['lm_loss']:.4f} "
                    f"(student alone {last['student_lm_loss']:.4f})")

        return Step(f"laten seed {seed}", folder / "laten.json", work)

    def merge_step(self, seed: int, adapter: Path, folder: Path) -> Step:
        from paratransfer.adapter.merge import run_merge

        def work() -> str:
            run_merge(self.recipe.student, adapter, folder, overwrite=True)
            return "the injected student as a model folder"

        return Step(f"merge laten seed {seed}", folder / "merge.json", work)

    def laten_for(self, arm: str, seed: int, latens: dict[str, Path]) -> tuple[Path, bool]:
        """The LaTen output an arm reads, and whether it is made anew: arms with the same LaTen
        settings (e.g. `laten` and `laten-lora`) share one per seed."""
        from paratransfer.laten import LatenSettings

        record = LatenSettings.from_recipe(self.recipe.arm_settings(arm), seed).record()
        key = json.dumps(record, sort_keys=True)
        if key in latens:
            return latens[key], False
        latens[key] = self.out / "arms" / arm / f"laten-seed-{seed}"
        return latens[key], True

    def train_step(self, arm: str, seed: int, folder: Path, adapter: Path | None,
                   student: str | None = None) -> Step:
        from paratransfer.train import resumable, run_train

        s = self.recipe.arm_settings(arm)

        def work() -> str:
            resume = resumable(folder)
            result = run_train(student or self.recipe.student, self.recipe.task.train, folder,
                               TrainSettings.from_recipe(s, seed, self.recipe.teacher),
                               adapter_dir=adapter,
                               dtype=self.dtype, device=self.device, resume=resume,
                               overwrite=not resume, progress=self.progress,
                               eval_data=self.recipe.task.heldout)
            info = result.summary
            return f"{info['steps_done']} steps, final loss {info['final_loss']:.4f}"

        return Step(f"train {arm} seed {seed}", folder / "train.json", work)

    def stability_step(self, folder: Path) -> Step:
        """The stability report of the transfer settings' choices over subsets of the seeds."""
        from paratransfer.sensitivity.step import SensitivitySettings
        from paratransfer.stability.pool import StabilitySettings, run_stability

        s = self.recipe.settings
        settings = StabilitySettings.from_recipe(self.recipe.stability)

        def work() -> str:
            report = run_stability(self.recipe.teacher, self.recipe.student,
                                   self.recipe.task.seeds, folder, settings,
                                   ExtractSettings.from_recipe(s, settings.seed),
                                   SensitivitySettings.from_recipe(s), dtype=self.dtype,
                                   device=self.device, overwrite=True, progress=self.progress)
            jaccard = ", ".join(f"{x['size']}: {x['layers']['mean']:.2f}" for x in report["sizes"])
            return f"{report['pool']['samples']} pool samples; layers Jaccard by size {jaccard}"

        return Step("stability over seed subsets", folder / "stability.json", work)

    def adapter_for(self, arm: str, seed: int, extractions: dict[str, Path]) -> tuple[Path, bool]:
        """The adapter folder an arm's training reads, and whether it is extracted anew: arms
        whose extraction settings are the same share one (e.g. `spectrum` reads `transfer`'s),
        random strategies get one per seed."""
        random = self.recipe.uses_random(arm)
        settings = ExtractSettings.from_recipe(self.recipe.arm_settings(arm),
                                               seed if random else self.recipe.seeds[0])
        key = json.dumps(settings.as_dict(), sort_keys=True)
        if key in extractions and not random:
            return extractions[key], False
        # An arm that changes no extraction setting reads the transfer arm's extraction.
        owner = arm if set(self.recipe.arms[arm]) & set(STEP_KEYS["extract"]) else "transfer"
        folder = self.out / "arms" / owner / (f"adapter-seed{seed}" if random else "adapter")
        extractions[key] = folder
        return folder, True

    # -- the plan and its execution ------------------------------------------------------
    def plan(self) -> tuple[list[Step], dict[str, Any]]:
        """Every step in order, and where the results table finds their outputs."""
        recipe, out = self.recipe, self.out
        sens = out / "sensitivity.safetensors"
        steps = [self.sensitivity_step(sens)]
        refs: dict[str, Path] = {}
        for who in recipe.references:
            folder = out / "reference" / who
            model = recipe.student if who == "student" else recipe.teacher
            steps.append(self.evaluate_step(f"evaluate the {who} (reference)", model, folder,
                                            recipe.settings))
            refs[who] = folder / "metrics.json"
        metrics: dict[str, dict[int, Path]] = {arm: {} for arm in recipe.arms}
        adapters: dict[str, Path] = {}
        extractions: dict[str, Path] = {}
        runs: dict[str, dict[int, Path]] = {}
        chains: list[Step] = []
        latens: dict[str, Path] = {}
        for seed in recipe.seeds:
            for arm in recipe.arms:
                run_dir = out / "arms" / arm / f"seed-{seed}"
                laten = recipe.arm_settings(arm)["laten"]
                student = recipe.student
                if laten != "none":  # shared steps: LaTen (and its merged student) per seed
                    laten_dir, new = self.laten_for(arm, seed, latens)
                    merged = laten_dir.with_name(laten_dir.name.replace("laten-", "laten-student-"))
                    if new:
                        steps.append(self.laten_step(arm, seed, laten_dir))
                    if laten == "only":  # LaTen's own claim: the injection, no fine-tuning
                        evaluate = self.evaluate_step(f"evaluate {arm} seed {seed}", student,
                                                      run_dir / "eval", recipe.arm_settings(arm),
                                                      adapter=laten_dir)
                        evaluate.chain = (arm, seed)
                        chains.append(evaluate)
                        metrics[arm][seed] = run_dir / "eval" / "metrics.json"
                        continue
                    if not any(s.done == merged / "merge.json" for s in steps):
                        steps.append(self.merge_step(seed, laten_dir, merged))
                    student = str(merged)
                adapter = None
                if INITS[recipe.arm_settings(arm)["init"]].needs_adapter:
                    adapter, new = self.adapter_for(arm, seed, extractions)
                    if new:  # extractions are shared steps, done before any training
                        steps.append(self.extract_step(arm, seed, adapter, sens))
                    adapters.setdefault(arm, adapter)
                train = self.train_step(arm, seed, run_dir / "train", adapter, student)
                evaluate = self.evaluate_step(f"evaluate {arm} seed {seed}", student,
                                              run_dir / "eval", recipe.arm_settings(arm),
                                              adapter=run_dir / "train")
                train.chain = evaluate.chain = (arm, seed)
                chains += [train, evaluate]
                metrics[arm][seed] = run_dir / "eval" / "metrics.json"
                runs.setdefault(arm, {})[seed] = run_dir / "train"
        if recipe.stability is not None:
            steps.append(self.stability_step(out / "stability"))
        steps += chains
        return steps, {"metrics": metrics, "refs": refs, "adapters": adapters, "sens": sens,
                       "runs": runs}

    def execute(self, index: int, total: int, step: Step) -> None:
        """Run one step unless complete; one line when it ends."""
        where = f"[{index:>{len(str(total))}}/{total}] {step.label}"
        if step.done.exists():
            self.on_step(f"[done] {step.label}")
            self.reused.append(step.label)
            self.log(f"{where}: complete from an earlier run")
            return
        self.on_step(f"[run ] {step.label}")
        started = time.perf_counter()
        try:
            said = step.work()
        except UserError as e:  # which step, arm and seed: under --jobs, lines interleave
            raise UserError(f"{step.label}: {e}") from None
        seconds = time.perf_counter() - started
        self.ran.append((step.label, seconds))
        self.log(f"{where}: {said} ({seconds:.1f} s)")

    def run(self, jobs: int = 1) -> dict[str, Any]:
        """The shared steps in order, then the (arm, seed) training chains: in order, or
        `jobs` at a time in separate processes (each chain computes the same either way)."""
        from paratransfer.experiment.results import write_results

        steps, found = self.plan()
        numbered = list(enumerate(steps, start=1))
        for i, step in numbered:
            if step.chain is None:
                self.execute(i, len(steps), step)
        chains: dict[tuple[str, int], list[int]] = {}
        for i, step in numbered:
            if step.chain is not None:
                chains.setdefault(step.chain, []).append(i)
        if jobs <= 1 or len(chains) <= 1:
            for indices in chains.values():
                for i in indices:
                    self.execute(i, len(steps), steps[i - 1])
        else:
            self.run_parallel(chains, jobs)
        return write_results(self.out, self.recipe, found["metrics"], found["refs"],
                             found["adapters"], found["sens"], found["runs"])

    def run_parallel(self, chains: dict[tuple[str, int], list[int]], jobs: int) -> None:
        """Each chain in a fresh process, `jobs` at a time (`workers.run_chains`: they end
        with this process however it ends); their lines come to this run's log."""
        from paratransfer.experiment.workers import run_chains

        ran, reused = run_chains(self.recipe, self.out, chains, jobs, self.log)
        self.ran += ran
        self.reused += reused


def run_experiment(recipe: Recipe, out: str | Path, resume: bool = False,
                   overwrite: bool = False, progress: bool = True,
                   on_step: StepHook | None = None,
                   log: Callable[[str], None] | None = None, jobs: int = 1) -> dict[str, Any]:
    """`paratransfer run`: every step of the recipe (training chains `jobs` at a time in
    separate processes); returns results.json's content plus
    `steps` (how many ran now, how many were complete already, seconds) for the summary."""
    from paratransfer.io.outputs import absolute, check_not_an_input, check_writable, output_lock

    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other (give one)")
    from paratransfer.io.checks import whole_number

    jobs = whole_number("--jobs", jobs, 1)  # more than the chains: all of them at once
    from paratransfer.experiment.preflight import check_run_inputs

    out = absolute(out)
    check_not_an_input(out, recipe_inputs(recipe))
    check_writable(out)
    check_run_inputs(recipe)
    with output_lock(out):
        work = prepare_out(out, recipe, resume, overwrite)
        runner = Runner(recipe, work, progress, on_step, log)
        result = runner.run(jobs)
        finish_out(work, out)
    return {**result, "steps": {"ran": len(runner.ran), "reused": len(runner.reused),
                                "seconds": round(sum(s for _, s in runner.ran), 1)}}


def recipe_inputs(recipe: Recipe) -> list[Any]:
    """Every file or folder a run reads (models given as hub ids are not paths)."""
    return [recipe.source, recipe.teacher, recipe.student, *vars(recipe.task).values(),
            recipe.settings.get("shots_data"),
            *(change.get("shots_data") for change in recipe.arms.values())]


def finish_out(work: Path, out: Path) -> None:
    """The complete run takes its place: temporaries of killed steps go, and a replacement
    (worked on beside RUN_DIR) is renamed into place, its records naming RUN_DIR."""
    from paratransfer.io.outputs import clean_stale, relocate_records, replace_with

    clean_stale(work, recursive=True)
    if work != out:
        relocate_records(work, work, out)
        replace_with(work, out)


def summary_line(result: dict[str, Any], out: Path | str) -> str:
    """The last line of `run` and `demo`: what was done, and where the outputs are."""
    steps = result["steps"]
    reused = f", {steps['reused']} complete from an earlier run" if steps["reused"] else ""
    return (f"{steps['ran']} steps run in {steps['seconds']:.0f} s{reused}; outputs in {out}: "
            "results.md, results.json, results.png, sensitivity.png")
