"""The user-facing steps, each reading inputs, doing the work and writing outputs atomically.

The CLI only parses flags into these calls; other code (experiments, benchmarks) calls them too.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from paratransfer import __version__
from paratransfer.arch import arch_for
from paratransfer.errors import UserError
from paratransfer.gguf_models import gguf_provenance
from paratransfer.models import fingerprint, load_model, load_tokenizer, model_label
from paratransfer.outputs import atomic_dir, atomic_file, check_output_path, write_json


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

    @classmethod
    def from_recipe(cls, s: dict) -> SensitivitySettings:
        """From a recipe's settings, named as the flags."""
        return cls(s["prompt_format"], s["max_length"], s["max_samples"])


def _seed_samples(teacher_id: str, seeds: str | Path, settings: SensitivitySettings) -> list[dict]:
    """The seed set tokenized with the teacher's tokenizer."""
    from paratransfer import data

    tokenizer = load_tokenizer(teacher_id)
    return data.load_tokenized(seeds, tokenizer, settings.prompt_format, settings.max_length,
                               limit=settings.max_samples)


def _predicts(sample: dict) -> bool:
    """Whether a sample has a token to predict (as `accumulate_sensitivity` decides)."""
    return any(label != -100 for label in list(sample["labels"])[1:])


def _sensitivity_metadata(teacher_id: str, teacher, seeds: str | Path,
                          settings: SensitivitySettings, used: int, dtype: torch.dtype,
                          records: int) -> dict:
    from paratransfer import data
    from paratransfer.console import notice

    if used == 0:
        raise UserError(f"{seeds}: no sample has an answer token left after truncation to "
                        f"{settings.max_length} tokens")
    if used < records:
        notice(f"{seeds}: {records - used} of {records} seed samples skipped, no answer token "
               f"left after truncation to --max-length {settings.max_length}")
    return {
        "teacher": model_label(teacher_id),
        **gguf_provenance("teacher", teacher_id),
        "teacher_fingerprint": fingerprint(teacher),
        "seeds": str(Path(seeds).resolve()),
        "seeds_sha256": data.file_digest(seeds),
        "samples": used,
        "skipped_no_answer": records - used,
        "prompt_format": settings.prompt_format,
        "max_length": settings.max_length,
        "dtype": str(dtype).removeprefix("torch."),
        "paratransfer_version": __version__,
    }


def sensitivity_of(teacher_id: str, teacher: torch.nn.Module, seeds: str | Path,
                   settings: SensitivitySettings, progress: bool = True, dist=None):
    """Tokenize the seed set with the teacher's tokenizer and accumulate Σ|θ·∇L|.

    Under torch.distributed (`dist` from `distributed.start_distributed`) each process takes every
    world-th sample and the sums meet on rank 0 (the other ranks' tensors are partial).
    """
    from paratransfer.sensitivity import accumulate_sensitivity, reduce_sensitivity

    arch_for(teacher)  # unsupported architectures fail before any work
    samples = _seed_samples(teacher_id, seeds, settings)
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    mine = samples[rank::world]
    sens, used = accumulate_sensitivity(teacher, mine, progress=progress and rank == 0,
                                        total=len(mine))
    used = reduce_sensitivity(sens, dist, used)
    metadata = _sensitivity_metadata(teacher_id, teacher, seeds, settings, used,
                                     next(teacher.parameters()).dtype, len(samples))
    return sens, metadata


def run_sensitivity(teacher_id: str, seeds: str | Path, out: str | Path,
                    settings: SensitivitySettings, dtype: torch.dtype, device: torch.device,
                    overwrite: bool = False, progress: bool = True, *,
                    device_map: str | None = None, stream: bool = False,
                    offload_dir: str | Path | None = None) -> dict:
    """`paratransfer sensitivity`: write the teacher's sensitivity file; returns its metadata.

    The teacher is in memory on `device`, or spread over the devices by accelerate
    (`device_map`), or streamed one layer at a time from its safetensors files (`stream`; kept
    activations that don't fit in memory go to `offload_dir`, default beside `out`). Under
    torchrun the processes split the samples and rank 0 writes the file.
    """
    from paratransfer.distributed import start_distributed
    from paratransfer.sensitivity import save_sensitivity

    out = check_output_path(out, overwrite, [teacher_id, seeds])
    if stream and device_map is not None:
        raise UserError("--stream and --device-map: give one of them (streaming loads one layer "
                        "at a time; a device map keeps the whole teacher spread over devices)")
    dist, device = start_distributed(device)
    try:
        if device_map is not None and dist.world > 1:
            raise UserError("--device-map spreads one teacher over all devices: run it in a single "
                            "process, not under torchrun")
        if stream:
            metadata = _run_streamed(teacher_id, seeds, out, settings, dtype, device, dist,
                                     overwrite, progress, offload_dir)
        else:
            teacher = load_model(teacher_id, dtype=dtype, device=device, device_map=device_map)
            sens, metadata = sensitivity_of(teacher_id, teacher, seeds, settings, progress, dist)
            if dist.main:
                with atomic_file(out, overwrite) as tmp:
                    save_sensitivity(tmp, sens, metadata)
        dist.barrier()
        return metadata
    finally:
        dist.close()


def _run_streamed(teacher_id: str, seeds: str | Path, out: str | Path,
                  settings: SensitivitySettings, dtype: torch.dtype, device: torch.device, dist,
                  overwrite: bool, progress: bool, offload_dir: str | Path | None) -> dict:
    """`run_sensitivity --stream`: each finished tensor goes straight into the file."""
    from paratransfer.lazy_weights import SafetensorsWeights
    from paratransfer.sensitivity import SensitivityWriter
    from paratransfer.stream import (
        ActivationStore,
        offload_folder,
        sensitivity_shapes,
        stream_sensitivity,
    )

    weights = SafetensorsWeights(teacher_id)
    arch_for(weights.config)
    every = _seed_samples(teacher_id, seeds, settings)
    samples = [s for s in every if _predicts(s)]
    metadata = _sensitivity_metadata(teacher_id, weights, seeds, settings, len(samples), dtype,
                                     len(every))
    with contextlib.ExitStack() as stack:
        sink = None
        if dist.main:
            tmp = stack.enter_context(atomic_file(out, overwrite))
            writer = stack.enter_context(SensitivityWriter(tmp, sensitivity_shapes(weights),
                                                           metadata))
            sink = writer.write
        store = stack.enter_context(ActivationStore(offload_folder(out, offload_dir),
                                                    device=device))
        stream_sensitivity(weights, samples[dist.rank::dist.world], sink or (lambda n, t: None),
                           dtype=dtype, device=device, store=store, dist=dist,
                           progress=progress and dist.main)
    return metadata


def check_sensitivity_matches(sens_path: str | Path, metadata: dict, teacher,
                              seeds: str | Path | None) -> None:
    """Refuse a sensitivity file computed for another teacher or another seed set.

    `teacher` is the model or its weights source (`SafetensorsWeights`): same fingerprint.
    """
    from paratransfer import data

    want = fingerprint(teacher)
    if metadata.get("teacher_fingerprint") != want:
        raise UserError(f"{sens_path}: computed for teacher {metadata.get('teacher')!r} "
                        f"(fingerprint {metadata.get('teacher_fingerprint')}), not this teacher "
                        f"(fingerprint {want}); pass --force to use it anyway")
    if seeds is not None and metadata.get("seeds_sha256") != data.file_digest(seeds):
        raise UserError(f"{sens_path}: computed from seed file {metadata.get('seeds')!r}, "
                        f"not {seeds} (contents differ); pass --force to use it anyway")


def extraction_teacher(teacher_id: str, sensitivity_path: str | Path | None,
                       dtype: torch.dtype, device: torch.device | str):
    """The teacher as extraction reads it: lazily from its safetensors files when sensitivity
    comes from a file and the teacher is a local folder (one matrix in memory at a time), else
    the model loaded whole (sensitivity from seeds needs it in memory anyway)."""
    from paratransfer.lazy_weights import SafetensorsWeights, has_safetensors

    if sensitivity_path is not None and has_safetensors(teacher_id):
        return SafetensorsWeights(teacher_id, dtype=dtype)
    return load_model(teacher_id, dtype=dtype, device=device)


def _tokenizers_for(teacher_id: str, student_id: str, settings) -> tuple[object, object, str | None]:
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
    from paratransfer.adapter import write_adapter
    from paratransfer.extract import extract, vocabulary_for
    from paratransfer.plots import plot_layer_scores
    from paratransfer.sensitivity import SensitivityFile

    out = check_output_path(out, overwrite, [teacher_id, student_id, seeds, sensitivity_path])
    if sensitivity_path is None and seeds is None:
        raise UserError("extract: give --seeds (to compute sensitivity) or --sensitivity FILE")
    started = time.time()
    teacher = extraction_teacher(teacher_id, sensitivity_path, dtype, device)
    teacher_config = teacher.config
    student = load_model(student_id, dtype="auto", device="cpu")
    arch_for(student)
    if fingerprint(teacher) == fingerprint(student):
        from paratransfer.console import notice

        notice(f"teacher {teacher_id} and student {student_id} are the same model: the "
               f"adapter holds rank-{settings.rank} factors of the student's own weights, "
               "nothing from another model")
    # Vocabulary coverage is checked before sensitivity, which may take long.
    teacher_tokenizer, student_tokenizer, vocab_note = _tokenizers_for(teacher_id, student_id,
                                                                       settings)
    vocab = vocabulary_for(teacher_config, student, settings, teacher_tokenizer, student_tokenizer)
    if sensitivity_path is not None:
        sens = SensitivityFile(sensitivity_path)
        sens_meta = dict(sens.metadata)
        if not force:
            check_sensitivity_matches(sensitivity_path, sens_meta, teacher, seeds)
    else:
        sens, sens_meta = sensitivity_of(teacher_id, teacher, seeds,
                                         sens_settings or SensitivitySettings(), progress)
    result = extract(teacher, student, sens, settings, vocab=vocab, device=device)
    del teacher
    svd_seconds = {e["name"]: e["svd"].pop("seconds") for e in result.entries
                   if "seconds" in e.get("svd", {})}
    report = {
        "paratransfer_version": __version__,
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
        "timing": {"seconds": round(time.time() - started, 3), "svd_seconds": svd_seconds},
    }
    with atomic_dir(out, overwrite) as tmp:
        write_adapter(student, result.factors, tmp, settings.rank, settings.alpha,
                      settings.dropout, student_id)
        write_json(tmp / "transfer.json", report)
        plot_layer_scores(result.layer_scores, result.selected_layers, tmp / "layers.png")
    return report
