"""The user-facing steps, each reading inputs, doing the work and writing outputs atomically.

The CLI only parses flags into these calls; other code (experiments, benchmarks) calls them too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from paratransfer import __version__
from paratransfer.arch import arch_for
from paratransfer.errors import UserError
from paratransfer.models import fingerprint, load_model, load_tokenizer, model_label
from paratransfer.outputs import atomic_dir, atomic_file, refuse_existing, write_json


@dataclass(frozen=True)
class SensitivitySettings:
    """How seed samples become sensitivity; recorded in the file's metadata."""

    prompt_format: str = "tulu"
    max_length: int = 2048
    max_samples: int | None = None

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise UserError(f"--max-length: must be at least 2 (got {self.max_length})")
        if self.max_samples is not None and self.max_samples < 1:
            raise UserError(f"--max-samples: must be at least 1 (got {self.max_samples})")


def sensitivity_of(teacher_id: str, teacher: torch.nn.Module, seeds: str | Path,
                   settings: SensitivitySettings, progress: bool = True):
    """Tokenize the seed set with the teacher's tokenizer and accumulate Σ|θ·∇L|."""
    from paratransfer import data
    from paratransfer.sensitivity import accumulate_sensitivity

    arch_for(teacher)  # unsupported architectures fail before any work
    tokenizer = load_tokenizer(teacher_id)
    samples = data.load_tokenized(seeds, tokenizer, settings.prompt_format, settings.max_length,
                                  limit=settings.max_samples)
    sens, used = accumulate_sensitivity(teacher, samples, progress=progress, total=len(samples))
    if used == 0:
        raise UserError(f"{seeds}: no sample has an answer token left after truncation to "
                        f"{settings.max_length} tokens")
    metadata = {
        "teacher": model_label(teacher_id),
        "teacher_fingerprint": fingerprint(teacher),
        "seeds": str(Path(seeds).resolve()),
        "seeds_sha256": data.file_digest(seeds),
        "samples": used,
        "prompt_format": settings.prompt_format,
        "max_length": settings.max_length,
        "dtype": str(next(teacher.parameters()).dtype).removeprefix("torch."),
        "paratransfer_version": __version__,
    }
    return sens, metadata


def run_sensitivity(teacher_id: str, seeds: str | Path, out: str | Path,
                    settings: SensitivitySettings, dtype: torch.dtype, device: torch.device,
                    overwrite: bool = False, progress: bool = True) -> dict:
    """`paratransfer sensitivity`: write the teacher's sensitivity file; returns its metadata."""
    from paratransfer.sensitivity import save_sensitivity

    refuse_existing(out, overwrite)
    teacher = load_model(teacher_id, dtype=dtype, device=device)
    sens, metadata = sensitivity_of(teacher_id, teacher, seeds, settings, progress)
    with atomic_file(out, overwrite) as tmp:
        save_sensitivity(tmp, sens, metadata)
    return metadata


def check_sensitivity_matches(sens_path: str | Path, metadata: dict, teacher: torch.nn.Module,
                              seeds: str | Path | None) -> None:
    """Refuse a sensitivity file computed for another teacher or another seed set."""
    from paratransfer import data

    want = fingerprint(teacher)
    if metadata.get("teacher_fingerprint") != want:
        raise UserError(f"{sens_path}: computed for teacher {metadata.get('teacher')!r} "
                        f"(fingerprint {metadata.get('teacher_fingerprint')}), not this teacher "
                        f"(fingerprint {want}); pass --force to use it anyway")
    if seeds is not None and metadata.get("seeds_sha256") != data.file_digest(seeds):
        raise UserError(f"{sens_path}: computed from seed file {metadata.get('seeds')!r}, "
                        f"not {seeds} (contents differ); pass --force to use it anyway")


def run_extract(teacher_id: str, student_id: str, out: str | Path, settings,
                seeds: str | Path | None = None, sensitivity_path: str | Path | None = None,
                sens_settings: SensitivitySettings | None = None,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                force: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """`paratransfer extract`: write a PEFT adapter + transfer.json + layer plot into `out`."""
    from paratransfer.adapter import write_adapter
    from paratransfer.extract import extract, settings_dict
    from paratransfer.report import plot_layer_scores
    from paratransfer.sensitivity import SensitivityFile

    refuse_existing(out, overwrite)
    if sensitivity_path is None and seeds is None:
        raise UserError("extract: give --seeds (to compute sensitivity) or --sensitivity FILE")
    started = time.time()
    teacher = load_model(teacher_id, dtype=dtype, device=device)
    student = load_model(student_id, dtype="auto", device="cpu")
    arch_for(student)
    if sensitivity_path is not None:
        sens = SensitivityFile(sensitivity_path)
        sens_meta = dict(sens.metadata)
        if not force:
            check_sensitivity_matches(sensitivity_path, sens_meta, teacher, seeds)
    else:
        sens, sens_meta = sensitivity_of(teacher_id, teacher, seeds,
                                         sens_settings or SensitivitySettings(), progress)
    result = extract(teacher, student, sens, settings)
    del teacher
    report = {
        "paratransfer_version": __version__,
        "teacher": model_label(teacher_id),
        "student": model_label(student_id),
        "rank": settings.rank,
        "alpha": settings.alpha,
        "settings": settings_dict(settings),
        "selected_layers": result.selected_layers,
        "layer_scores": result.layer_scores,
        "sensitivity": {"file": str(sensitivity_path) if sensitivity_path else None,
                        **{k: v for k, v in sens_meta.items() if k != "paratransfer_sensitivity"}},
        "modules": result.entries,
        "skipped": result.skipped,
        "seconds": round(time.time() - started, 3),
    }
    with atomic_dir(out, overwrite) as tmp:
        write_adapter(student, result.factors, tmp, settings.rank, settings.alpha,
                      settings.dropout, student_id)
        write_json(tmp / "transfer.json", report)
        plot_layer_scores(result.layer_scores, result.selected_layers, tmp / "layers.png")
    return report
