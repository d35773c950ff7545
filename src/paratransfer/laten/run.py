"""`paratransfer laten`: teacher + student + seeds -> the LaTen-injected student as a PEFT adapter.

setup (tokenize, pick the locating examples) → locate in the teacher, loaded once and freed →
locate in the student → train the translator → inject once (one seed example) → write.
"""

from __future__ import annotations

import gc
import random
import time
from pathlib import Path

import torch

from paratransfer.arch import arch_for
from paratransfer.io.errors import UserError
from paratransfer.laten.attribution import attribute_many
from paratransfer.laten.inject import lora_factors, weight_deltas
from paratransfer.laten.locate import Located, locate, neuron_counts, neuron_vectors
from paratransfer.laten.loop import Step, train_translator
from paratransfer.laten.outputs import write_outputs
from paratransfer.laten.settings import LatenSettings
from paratransfer.laten.translator import Translator


def locating_order(n: int, steps: int, seed: int) -> tuple[list[int], int]:
    """Seed-example indices for the training steps (a seeded order, cycled) and for injection."""
    from paratransfer.train.batches import epoch_order

    order = epoch_order(n, seed, 0)
    return [order[s % n] for s in range(steps)], order[steps % n]


def draw_batch(pool_size: int, size: int, seed: int, step: int, exclude: int | None) -> list[int]:
    """`size` distinct pool indices for one step (seeded by seed and step), never `exclude`."""
    from paratransfer.train.batches import mix_seed

    candidates = [i for i in range(pool_size) if i != exclude]
    rng = random.Random(mix_seed(seed, step))
    return rng.sample(candidates, min(size, len(candidates)))


def _tokenized(examples, tokenizer, settings: LatenSettings) -> list[dict]:
    from paratransfer import data

    return [data.tokenize_example(ex, tokenizer, settings.prompt_format, settings.max_length)
            for ex in examples]


def _locate_model(model, spec, samples: list[dict], keep: int, counts: dict[str, int],
                  eos_id) -> list[tuple[Located, dict[str, torch.Tensor]]]:
    """(located, vectors) of one model for each sample."""
    out = []
    for attribution in attribute_many(model, spec, samples, eos_id):
        located = locate(attribution, keep, counts)
        out.append((located, neuron_vectors(model, spec, located)))
    return out


def _skeleton(model_id: str) -> torch.nn.Module:
    """The model built on the meta device from its config: every shape, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from paratransfer.teacher.gguf import resolve_model
    from paratransfer.teacher.models import check_source

    model_id = resolve_model(str(model_id))  # a .gguf file: its converted folder
    check_source(model_id)
    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{model_id}: cannot read its config ({str(e).splitlines()[0]})") from e
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _tokens_at(examples, indices: list[int], tokenizer, settings: LatenSettings,
               source: str | Path) -> dict[int, dict]:
    """The examples at `indices`, tokenized; every one must keep an answer token."""
    from paratransfer.tasks.examples import has_answer

    tokens = dict(zip(indices, _tokenized([examples[i] for i in indices], tokenizer, settings),
                      strict=True))
    bad = [i for i, t in tokens.items() if not has_answer(t)]
    if bad:
        raise UserError(f"{source}: record {bad[0] + 1} has no answer token left after "
                        f"truncation to --max-length {settings.max_length}")
    return tokens


def _batches(train_at: list[int], s_tokens: dict[int, dict], seed_examples, pool, tokenizer,
             settings: LatenSettings) -> list[list[dict]]:
    """Each step's batch: its locating example first, then batch-1 drawn (seeded) from the
    pool (`--data`), or from the other seed examples when there is none."""
    from paratransfer.tasks.examples import has_answer

    batches = []
    for index, at in enumerate(train_at):
        if pool is None:
            drawn = draw_batch(len(seed_examples), settings.batch - 1, settings.seed, index, at)
            others = [s_tokens.get(i) or _tokenized([seed_examples[i]], tokenizer, settings)[0]
                      for i in drawn]
        else:
            drawn = draw_batch(len(pool), settings.batch - 1, settings.seed, index, None)
            others = [pool[i] for i in drawn]
        batches.append([s_tokens[at], *[o for o in others if has_answer(o)]])
    return batches


def _train(student, spec, teacher_width: int, steps: list[Step], settings: LatenSettings,
           progress: bool) -> tuple[Translator, list[dict]]:
    """A fresh (seeded) translator trained on the steps; returns it and the loss curve."""
    from paratransfer.io.console import progress as progress_bar

    device = student.get_input_embeddings().weight.device
    translator = Translator(settings.roles, teacher_width,
                            student.get_input_embeddings().weight.shape[1], settings.init_std,
                            settings.seed).to(device)
    bar = progress_bar(total=len(steps), desc="laten", unit="step", enabled=progress)
    try:
        curve = train_translator(student, spec, translator, steps, settings,
                                 on_step=lambda record: bar.update(1))
    finally:
        bar.close()
    return translator, curve


def run_laten(teacher_id: str, student_id: str, seeds: str | Path, out: str | Path,
              settings: LatenSettings, data: str | Path | None = None,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              overwrite: bool = False, progress: bool = True) -> dict:
    """Write the adapter, `translator.safetensors` and `laten.json` to `out`; returns the report."""
    from paratransfer.io.outputs import check_output_path
    from paratransfer.tasks.examples import read_examples
    from paratransfer.teacher.models import fingerprint, load_model, load_tokenizer, model_label

    # setup: the examples, which of them locate, and the student's shapes (no weights yet)
    out = check_output_path(out, overwrite, [teacher_id, student_id, seeds, data])
    started = time.time()
    seed_examples = read_examples(seeds)
    student_tok, teacher_tok = load_tokenizer(student_id), load_tokenizer(teacher_id)
    train_at, inject_at = locating_order(len(seed_examples), settings.steps, settings.seed)
    wanted = sorted(set(train_at) | {inject_at})
    skeleton = _skeleton(student_id)
    s_spec = arch_for(skeleton)
    counts = neuron_counts(skeleton, s_spec, settings.roles, settings.rate)
    keep = len(skeleton.get_submodule(s_spec.layers))
    del skeleton

    # locate in the teacher: loaded once, alone in memory, freed once its vectors are taken
    teacher = load_model(teacher_id, dtype=dtype, device=device)
    t_tokens = _tokens_at(seed_examples, wanted, teacher_tok, settings, seeds)
    t_found = dict(zip(wanted, _locate_model(teacher, arch_for(teacher),
                                             [t_tokens[i] for i in wanted], keep, counts,
                                             teacher_tok.eos_token_id), strict=True))
    teacher_info = {"teacher": model_label(teacher_id), "teacher_fingerprint": fingerprint(teacher)}
    del teacher
    gc.collect()

    # locate in the student, then align: train the translator
    student = load_model(student_id, dtype=dtype, device=device)
    s_tokens = _tokens_at(seed_examples, wanted, student_tok, settings, seeds)
    s_found = {i: loc for i, (loc, _) in zip(wanted, _locate_model(
        student, s_spec, [s_tokens[i] for i in wanted], keep, counts,
        student_tok.eos_token_id), strict=True)}
    pool = _tokenized(read_examples(data), student_tok, settings) if data is not None else None
    batches = _batches(train_at, s_tokens, seed_examples, pool, student_tok, settings)
    steps = [Step(t_found[at][1], s_found[at], batch)
             for at, batch in zip(train_at, batches, strict=True)]
    teacher_width = next(iter(t_found[inject_at][1].values())).shape[-1]
    translator, curve = _train(student, s_spec, teacher_width, steps, settings, progress)

    # inject once, on one seed example, and write
    with torch.no_grad():
        translated = translator(t_found[inject_at][1])
    located = s_found[inject_at]
    factors, rank = lora_factors(student, s_spec, located, translated)
    deltas = weight_deltas(student, s_spec, located, translated)
    report = {
        "method": "laten",
        **teacher_info,
        "student": model_label(student_id),
        "student_fingerprint": fingerprint(student),
        "seeds": str(Path(seeds).resolve()),
        "data": str(Path(data).resolve()) if data is not None else None,
        "settings": settings.record(),
        "neuron_counts": counts,
        "translator": {"roles": list(settings.roles),
                       "layers": [teacher_width, teacher_width, translated_width(translated)],
                       "activation": "relu", "bias": False, "init_std": settings.init_std,
                       "parameters": sum(p.numel() for p in translator.parameters())},
        "locating_examples": [i + 1 for i in train_at],
        "injection_example": inject_at + 1,
        "located": {"teacher": t_found[inject_at][0].record(), "student": located.record()},
        "curve": curve,
        "injection": {name: {"norm": float(d.norm()), "max_abs": float(d.abs().max())}
                      for name, d in deltas.items()},
        "adapter": {"rank": rank, "alpha": float(rank), "modules": len(factors)},
    }
    write_outputs(out, overwrite, student, student_id, factors, rank, translator, report,
                  seeds, data, started)
    return report


def translated_width(translated: dict[str, torch.Tensor]) -> int:
    """The student hidden width the translator writes."""
    return next(iter(translated.values())).shape[-1]
