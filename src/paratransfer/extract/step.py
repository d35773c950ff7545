"""`paratransfer extract`: teacher + student + sensitivity -> the adapter folder, written atomically.

The CLI only parses flags into this call; experiments and benchmarks call it too.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from paratransfer import __version__
from paratransfer.arch import arch_for
from paratransfer.io.errors import UserError
from paratransfer.io.outputs import atomic_dir, check_output_path, write_json
from paratransfer.io.threads import runtime
from paratransfer.sensitivity.step import (
    SensitivitySettings,
    check_sensitivity_matches,
    sensitivity_of,
)
from paratransfer.teacher.gguf import gguf_provenance
from paratransfer.teacher.models import fingerprint, load_model, load_tokenizer, model_label


def extraction_teacher(teacher_id: str, sensitivity_path: str | Path | None,
                       dtype: torch.dtype, device: torch.device | str):
    """The teacher as extraction reads it: lazily from its safetensors files when sensitivity
    comes from a file and the teacher is a local folder (one matrix in memory at a time), else
    the model loaded whole (sensitivity from seeds needs it in memory anyway)."""
    from paratransfer.teacher.lazy import SafetensorsWeights, has_safetensors

    if sensitivity_path is not None and has_safetensors(teacher_id):
        return SafetensorsWeights(teacher_id, dtype=dtype)
    return load_model(teacher_id, dtype=dtype, device=device)


def tokenizers_for(teacher_id: str, student_id: str, settings) -> tuple[object, object, str | None]:
    """Both tokenizers, to align the vocabularies of embed and head; (None, None, why) when
    those are not extracted or a tokenizer cannot be loaded (then the vocabularies must match)."""
    if not {"embed", "head"} & set(settings.modules):
        return None, None, None
    try:
        return load_tokenizer(teacher_id), load_tokenizer(student_id), None
    except UserError as e:
        return None, None, f"not aligned by tokens ({e}); the vocabularies are assumed the same"


def run_extract(teacher_id: str, student_id: str, out: str | Path, settings,
                seeds: str | Path | None = None, sensitivity_path: str | Path | None = None,
                sens_settings: SensitivitySettings | None = None,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                force: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """`paratransfer extract`: write a PEFT adapter + transfer.json + layer plot into `out`."""
    from paratransfer.adapter.write import write_adapter
    from paratransfer.extract.plan import extract, vocabulary_for
    from paratransfer.extract.plots import plot_layer_scores
    from paratransfer.sensitivity.accumulate import SensitivityFile

    out = check_output_path(out, overwrite, [teacher_id, student_id, seeds, sensitivity_path])
    if sensitivity_path is None and seeds is None:
        raise UserError("extract: give --seeds (to compute sensitivity) or --sensitivity FILE")
    started = time.time()
    teacher = extraction_teacher(teacher_id, sensitivity_path, dtype, device)
    teacher_config = teacher.config
    student = load_model(student_id, dtype="auto", device="cpu")
    arch_for(student)
    if fingerprint(teacher) == fingerprint(student):
        from paratransfer.io.console import notice

        notice(f"teacher {teacher_id} and student {student_id} are the same model: the "
               f"adapter holds rank-{settings.rank} factors of the student's own weights, "
               "nothing from another model")
    # Vocabulary coverage is checked before sensitivity, which may take long.
    teacher_tokenizer, student_tokenizer, vocab_note = tokenizers_for(teacher_id, student_id,
                                                                       settings)
    vocab = vocabulary_for(teacher_config, student, settings, teacher_tokenizer, student_tokenizer)
    stages = {"load_seconds": time.time() - started}  # models, tokenizers, vocabulary alignment
    if sensitivity_path is not None:
        sens = SensitivityFile(sensitivity_path)
        sens_meta = dict(sens.metadata)
        if not force:
            check_sensitivity_matches(sensitivity_path, sens_meta, teacher, seeds)
    else:
        sens, sens_meta = sensitivity_of(teacher_id, teacher, seeds,
                                         sens_settings or SensitivitySettings(), progress)
    stages["sensitivity_seconds"] = time.time() - started - sum(stages.values())
    result = extract(teacher, student, sens, settings, vocab=vocab, device=device)
    stages["extract_seconds"] = time.time() - started - sum(stages.values())  # SVDs included
    del teacher
    svd_seconds = {e["name"]: e["svd"].pop("seconds") for e in result.entries
                   if "seconds" in e.get("svd", {})}
    report = {
        "paratransfer_version": __version__,
        "runtime": runtime(),
        "teacher": model_label(teacher_id),
        "student": model_label(student_id),
        **gguf_provenance("teacher", teacher_id),
        **gguf_provenance("student", student_id),
        "rank": settings.rank,
        "alpha": settings.alpha,
        "settings": settings.as_dict(),
        "selected_layers": result.selected_layers,
        "layer_rule": result.layer_rule,
        "layer_scores": result.layer_scores,
        "sensitivity": {"file": str(sensitivity_path) if sensitivity_path else None,
                        **{k: v for k, v in sens_meta.items() if k != "paratransfer_sensitivity"}},
        "teacher_family": arch_for(teacher_config).family,
        "student_family": arch_for(student).family,
        "vocabulary": ({**result.vocab, **({"note": vocab_note} if vocab_note else {})}
                       if result.vocab is not None else None),
        "modules": result.entries,
        "skipped": result.skipped,
        "padded": result.padded,
        # apart: the only part that differs between identical runs
        "timing": {"seconds": round(time.time() - started, 3), "svd_seconds": svd_seconds,
                   **{k: round(v, 3) for k, v in stages.items()}},
    }
    with atomic_dir(out, overwrite) as tmp:
        writing = time.time()
        write_adapter(student, result.factors, tmp, settings.rank, settings.alpha,
                      settings.dropout, student_id)
        plot_layer_scores(result.layer_scores, result.selected_layers, tmp / "layers.png")
        report["timing"]["write_seconds"] = round(time.time() - writing, 3)  # adapter + plot
        write_json(tmp / "transfer.json", report)
    return report
