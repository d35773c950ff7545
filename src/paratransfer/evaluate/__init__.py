"""Evaluation (docs/method.md §7): a task, as `tasks/` declares it, run on a model.

Each task is one module of `paratransfer.tasks` (its data source format, prompt and score
together), registered once in `tasks/registry.py`; `TASKS` here is that registry, and the types
a task is made of (`Task`, `Item`, ...) are `tasks.task`'s, re-exported. `run.run_evaluate`
does the rest (model, prompt format, batching, files), the same way for every task.
"""

from __future__ import annotations

# The task modules keep their old names here (`from paratransfer.evaluate import gsm`).
# (The submodule `open` shadows the builtin in this file only; nothing here opens files.)
from paratransfer.tasks import gsm, mmlu, open, super_ni  # noqa: F401
from paratransfer.tasks.registry import TASKS, get_task
from paratransfer.tasks.task import (
    BadExample,
    Item,
    ShotPool,
    Task,
    category_of,
    last_user,
    mean,
    with_turns,
)

__all__ = ["TASKS", "BadExample", "Item", "ShotPool", "Task", "category_of", "get_task",
           "last_user", "mean", "with_turns"]
