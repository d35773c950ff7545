"""LaTen (Locate-Then-Align; Tan et al., ACL 2025, arXiv 2505.14436) as a step of its own.

Locate the task's neurons in teacher and student by attribution, train a small translator
from teacher neuron vectors to student ones for a few steps, inject once, no fine-tuning after
(docs/method.md, "LaTen"). Parts: `settings` (defaults), `attribution` (scores), `locate`
(neurons and their vectors), `translator`, `inject` (deltas, in place, as LoRA), `loop`
(training the translator), `run` (the command), `outputs` (the folder it writes).
"""

from paratransfer.laten.settings import LATEN_ROLES, LatenSettings

__all__ = ["LATEN_ROLES", "LatenSettings", "run_laten"]


def __getattr__(name: str):
    """`run_laten` on first use: it imports torch, which `--help` must not."""
    if name == "run_laten":
        from paratransfer.laten.run import run_laten

        return run_laten
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
