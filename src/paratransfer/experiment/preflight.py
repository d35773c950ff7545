"""Every input of a run, read and checked before its first step (`paratransfer run`).

A recipe names files the steps read one after another: without this, a bad line in the
training file would fail only after sensitivity, the reference evaluations and extraction, and
a damaged teacher only after the run folder was prepared. Here, in seconds: the models (config,
whole weights files, tokenizer, supported family), every data file parsed as its step parses it,
the seed and training examples tokenized as sensitivity and training tokenize them, and every
evaluation prompt fitted to the evaluated model's context as `evaluate` fits it.
"""

from __future__ import annotations

from typing import Any

from paratransfer.io.errors import UserError


def _model(name: str, where: str):
    """The model's tokenizer, after checking its files, config and family."""
    from transformers import AutoConfig

    from paratransfer.arch import arch_for
    from paratransfer.teacher.gguf import resolve_model
    from paratransfer.teacher.models import check_source, load_tokenizer

    name = resolve_model(name)  # a .gguf file: its converted folder
    check_source(name)
    try:
        config = AutoConfig.from_pretrained(str(name))
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{where}: {name}: cannot read the model config ({first})") from None
    arch_for(config)
    return load_tokenizer(name)


def check_run_inputs(recipe) -> None:
    """Read and check everything `recipe` will read (see the module docstring); UserError at the
    first problem, naming the file and line."""
    from paratransfer.evaluate import get_task
    from paratransfer.evaluate.run import (
        EvalSettings,
        apply_shots,
        context_length,
        fit_to_context,
        load_items,
    )
    from paratransfer.tasks import examples as data
    from paratransfer.train.batches import load_examples

    teacher_tok = _model(recipe.teacher, f"{recipe.source}: teacher")
    student_tok = _model(recipe.student, f"{recipe.source}: student")
    task = get_task(recipe.task.type)
    _check_distillation(recipe, teacher_tok, student_tok)
    data.read_examples(recipe.task.seeds)
    data.read_examples(recipe.task.train)
    arms = [recipe.arm_settings(arm) for arm in recipe.arms]
    done: set[Any] = set()
    for s in arms:
        key = ("seeds", s["prompt_format"], s["max_length"], s["max_samples"])
        if key not in done:
            done.add(key)
            samples = data.load_tokenized(recipe.task.seeds, teacher_tok, s["prompt_format"],
                                          s["max_length"], limit=s["max_samples"])
            if not any(data.has_answer(t) for t in samples):
                raise UserError(f"{recipe.task.seeds}: no seed sample has an answer token left "
                                f"after truncation to {s['max_length']} tokens")
        key = ("train", s["prompt_format"], s["max_length"])
        if key not in done:
            done.add(key)
            for path in (recipe.task.train, recipe.task.heldout):
                if path is not None:
                    load_examples(path, student_tok, s["prompt_format"], s["max_length"])
    evaluated = [(recipe.student, student_tok, s) for s in [recipe.settings, *arms]]
    if "teacher" in recipe.references:
        evaluated.append((recipe.teacher, teacher_tok, recipe.settings))
    for model, tokenizer, s in evaluated:
        settings = EvalSettings.from_recipe(task.name, s)
        shots = s["shots_data"] if s["shots"] else None
        key = ("eval", model, settings, shots)
        if key in done:
            continue
        done.add(key)
        plain = load_items(task, recipe.task.eval, settings.limit)
        items = apply_shots(task, plain, settings.shots, shots)
        fit_to_context(task, plain, items, settings, shots, tokenizer,
                       context_length(model, tokenizer), say=False)


def _check_distillation(recipe, teacher_tok, student_tok) -> None:
    """A distill arm needs one vocabulary for teacher and student: refused here, not when the
    arm's training starts after the other arms have trained."""
    from paratransfer.train.objectives import check_same_vocabulary

    for arm in recipe.arms:
        if recipe.arm_settings(arm)["distill"]:
            try:
                check_same_vocabulary(teacher_tok, student_tok, recipe.teacher)
            except UserError as e:
                raise UserError(f"{recipe.source}: arms.{arm}: {e}") from None
