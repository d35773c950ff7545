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

import importlib

# The parts are imported on first use of one of their names (PEP 562), so that
# `paratransfer --help` reads `settings` and `inits` without importing torch, PEFT or transformers.
_NAMES: dict[str, str] = {
    "paratransfer.io.distributed": "Dist start_distributed sum_across_processes",
    "paratransfer.train.batches": "Example answer_loss_sum batch_digest batch_indices collate epoch_order load_examples micro_batches steps_per_epoch",
    "paratransfer.train.checkpoints": "CHECKPOINTS last_checkpoint restore_checkpoint save_checkpoint",
    "paratransfer.train.inits": "INITS Init",
    "paratransfer.train.loop": "learning_rate train train_step",
    "paratransfer.train.outputs": "TRAIN_JSON plot_loss save_outputs summary",
    "paratransfer.train.run": "TrainResult run_train",
    "paratransfer.train.settings": "TrainSettings",
    "paratransfer.train.setup": "adapter_roles build_lora_model check_output init_lora lora_targets resolve_settings resumable setup",
    "paratransfer.train.state": "Run",
}

__all__ = sorted(name for names in _NAMES.values() for name in names.split())


def _load_parts() -> None:
    """Bind every public name, the function `setup` over the submodule of that name too."""
    for module, names in _NAMES.items():
        part = importlib.import_module(module)
        for name in names.split():
            globals()[name] = getattr(part, name)


def __getattr__(name: str):
    if name in __all__:
        _load_parts()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
