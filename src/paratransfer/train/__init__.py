"""LoRA fine-tuning of the student: setup -> train -> save (docs/method.md §6).

Every arm runs every line here; they differ only in `setup.init_lora`: the standard arm keeps
PEFT's default init (A random, B zero), the transfer arm loads the extracted factors and
subtracts them from the base weights (`adapter/inject.py`).

The parts, in the order a run meets them:
    settings.py     TrainSettings: every choice, the paper's defaults
    inits.py        the named initializations of the LoRA factors (the arms)
    batches.py      which examples each step sees (same order for every arm), tensors, the loss
    setup.py        inputs checked, LoRA model built and initialized, optimizer
    state.py        Run: the state the loop, checkpoints and outputs share
    checkpoints.py  save, verify and restore the state every few steps
    loop.py         one optimizer step; the run from where it stands
    outputs.py      the plain LoRA adapter for the unmodified student, train.json, loss.png
    run.py          `run_train`: the above, top to bottom

RUN_DIR holds, once done: a plain LoRA adapter for the unmodified student (rank 2r for a
transfer run, r for a standard run), `train.json`, `loss.png`, `initial/` (the adapter as it
was after the init) and `checkpoints/step-NNNNNN/` (the last few).
"""

from paratransfer.io.distributed import Dist, start_distributed, sum_across_processes
from paratransfer.train.batches import (
    Example,
    answer_loss_sum,
    batch_digest,
    batch_indices,
    collate,
    epoch_order,
    load_examples,
    micro_batches,
    steps_per_epoch,
)
from paratransfer.train.checkpoints import (
    CHECKPOINTS,
    last_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from paratransfer.train.inits import INITS, Init
from paratransfer.train.loop import learning_rate, train, train_step
from paratransfer.train.outputs import TRAIN_JSON, plot_loss, save_outputs, summary
from paratransfer.train.run import TrainResult, run_train
from paratransfer.train.settings import TrainSettings
from paratransfer.train.setup import (
    adapter_roles,
    build_lora_model,
    check_output,
    init_lora,
    lora_targets,
    resolve_settings,
    resumable,
    setup,
)
from paratransfer.train.state import Run

__all__ = [
    "CHECKPOINTS", "INITS", "TRAIN_JSON", "Dist", "Example", "Init", "Run", "TrainResult",
    "TrainSettings", "adapter_roles", "answer_loss_sum", "batch_digest", "batch_indices",
    "build_lora_model", "check_output", "collate", "epoch_order", "init_lora", "last_checkpoint",
    "learning_rate", "load_examples", "lora_targets", "micro_batches", "plot_loss",
    "resolve_settings", "restore_checkpoint", "resumable", "run_train", "save_checkpoint",
    "save_outputs", "setup", "start_distributed", "steps_per_epoch", "sum_across_processes",
    "summary", "train", "train_step",
]
