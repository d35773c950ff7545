"""Every task, registered once: a task module (`gsm`, `mmlu`, `super_ni`, `open`) declares its
evaluation `TASK` (or None) and the data source `FORMATS` it reads; `register` puts them in
`TASKS` (what `paratransfer evaluate --task` and a recipe's `task.type` take) and `FORMATS`
(what `paratransfer data TASK` takes). Adding a task is one module and one line below.
"""

from __future__ import annotations

from paratransfer.io.errors import UserError
from paratransfer.tasks import gsm, mmlu, open, super_ni
from paratransfer.tasks.task import Task, TaskFormat

#: Every evaluation task, by the name `--task` takes.
TASKS: dict[str, Task] = {}
#: Every task `paratransfer data` builds, by name.
FORMATS: dict[str, TaskFormat] = {}


def register(module) -> None:
    """Register what a task module declares: its `TASK` (may be None) and its `FORMATS`."""
    if module.TASK is not None:
        TASKS[module.TASK.name] = module.TASK
    for fmt in module.FORMATS:
        FORMATS[fmt.name] = fmt


for _module in (gsm, mmlu, super_ni, open):
    register(_module)


def get_task(name: str) -> Task:
    """The registered task, or a one-line error listing the known ones."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown task {name!r} (expected one of: {', '.join(TASKS)})") from None
