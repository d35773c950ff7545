"""`paratransfer sensitivity`: seed samples -> Σ|θ·∇L| per teacher weight, written atomically.

The CLI only parses flags into this call; experiments, extraction and benchmarks call it too.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from paratransfer import __version__
from paratransfer.arch import arch_for
from paratransfer.io.errors import UserError
from paratransfer.io.outputs import atomic_file, check_output_path
from paratransfer.io.threads import runtime
from paratransfer.sensitivity.settings import SensitivitySettings
from paratransfer.teacher.gguf import gguf_provenance
from paratransfer.teacher.models import fingerprint, load_model, load_tokenizer, model_label


def _seed_samples(teacher_id: str, seeds: str | Path, settings: SensitivitySettings) -> list[dict]:
    """The seed set tokenized with the teacher's tokenizer."""
    from paratransfer.tasks import examples as data

    tokenizer = load_tokenizer(teacher_id)
    return data.load_tokenized(seeds, tokenizer, settings.prompt_format, settings.max_length,
                               limit=settings.max_samples)


def _predicts(sample: dict) -> bool:
    """Whether a sample has a token to predict (as `accumulate_sensitivity` decides)."""
    return any(label != -100 for label in list(sample["labels"])[1:])


def _sensitivity_metadata(teacher_id: str, teacher, seeds: str | Path,
                          settings: SensitivitySettings, used: int, dtype: torch.dtype,
                          records: int) -> dict:
    from paratransfer.io.console import notice
    from paratransfer.tasks import examples as data

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
        "runtime": runtime(),
    }


def sensitivity_of(teacher_id: str, teacher: torch.nn.Module, seeds: str | Path,
                   settings: SensitivitySettings, progress: bool = True, dist=None):
    """Tokenize the seed set with the teacher's tokenizer and accumulate Σ|θ·∇L|.

    Under torch.distributed (`dist` from `distributed.start_distributed`) each process takes every
    world-th sample and the sums meet on rank 0 (the other ranks' tensors are partial).
    """
    from paratransfer.sensitivity.accumulate import accumulate_sensitivity, reduce_sensitivity

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
    from paratransfer.io.distributed import start_distributed
    from paratransfer.sensitivity.accumulate import save_sensitivity

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
    from paratransfer.sensitivity.accumulate import SensitivityWriter
    from paratransfer.sensitivity.streamed import (
        ActivationStore,
        offload_folder,
        sensitivity_shapes,
        stream_sensitivity,
    )
    from paratransfer.teacher.lazy import SafetensorsWeights

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
    from paratransfer.tasks import examples as data

    want = fingerprint(teacher)
    if metadata.get("teacher_fingerprint") != want:
        raise UserError(f"{sens_path}: computed for teacher {metadata.get('teacher')!r} "
                        f"(fingerprint {metadata.get('teacher_fingerprint')}), not this teacher "
                        f"(fingerprint {want}); pass --force to use it anyway")
    if seeds is not None and metadata.get("seeds_sha256") != data.file_digest(seeds):
        raise UserError(f"{sens_path}: computed from seed file {metadata.get('seeds')!r}, "
                        f"not {seeds} (contents differ); pass --force to use it anyway")
