"""`paratransfer train`, top to bottom: check the output, set up, train, save."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from paratransfer.io.distributed import start_distributed
from paratransfer.io.outputs import (
    absolute,
    check_not_an_input,
    check_writable,
    clean_stale,
    disk_full_as_error,
    output_lock,
    replace_with,
    replacing_dir,
)
from paratransfer.train.loop import train
from paratransfer.train.outputs import prepare_output, save_outputs, summary
from paratransfer.train.settings import TrainSettings
from paratransfer.train.setup import check_output, setup


@dataclass
class TrainResult:
    """What `run_train` returns: the summary written to train.json and the trained model.

    `model` is the in-memory PEFT model (base weights residual for a transfer run), in eval
    mode; `complete` is False when `stop_after` ended the run early (it can be resumed).
    """

    out: Path
    summary: dict
    model: torch.nn.Module
    complete: bool
    main: bool = True  # rank 0 (the process that writes)


def run_train(student_id: str, data_path: str | Path, out: str | Path,
              settings: TrainSettings | None = None, adapter_dir: str | Path | None = None,
              dtype: torch.dtype | None = None, device: torch.device | str | None = None,
              resume: bool = False, overwrite: bool = False, progress: bool = True,
              stop_after: int | None = None, eval_data: str | Path | None = None) -> TrainResult:
    """`paratransfer train`: LoRA fine-tuning of the student in the transfer or standard arm.

    `stop_after` ends the run (with a checkpoint) once that many steps are done, as an
    interruption would; `resume=True` continues it. With `eval_data`, the held-out loss is
    recorded every `settings.eval_every` steps. Nothing is written before every input has been
    checked, and an existing output (`overwrite`) is replaced only once the new run is
    complete.
    """
    from paratransfer.io.devices import pick_device, pick_dtype

    settings = settings or TrainSettings()
    out = absolute(out)
    device = pick_device("auto" if device is None else str(device))
    dist, device = start_distributed(device)
    try:
        dtype = dtype or pick_dtype("auto", device)
        check_not_an_input(out, [student_id, data_path, adapter_dir, eval_data,
                                 settings.distill])
        check_writable(out)
        with (output_lock(out) if dist.main else contextlib.nullcontext(),
              disk_full_as_error(out, hint="; every checkpoint written is whole: continue with "
                                           "--resume once there is room")):
            work, resume_from = check_output(out, resume, overwrite)
            dist.barrier()  # every process has decided before rank 0 changes anything
            run = setup(student_id, data_path, work, settings, adapter_dir, dtype, device, dist,
                        resume_from, eval_data)
            if dist.main:
                if resume_from is None:
                    if work == out:  # an abandoned replacement of an output deleted since
                        shutil.rmtree(replacing_dir(out), ignore_errors=True)
                    prepare_output(run)
                else:
                    clean_stale(work, recursive=True)
            dist.barrier()
            complete = train(run, progress, stop_after)
            info = summary(run, complete)
            if complete and dist.main:
                save_outputs(run, info)
                if work != out:
                    replace_with(work, out)
            dist.barrier()
            return TrainResult(out, info, run.model, complete, dist.main)
    finally:
        dist.close()
