"""Evaluation tasks (docs/method.md §7): the name a user types -> a small declarative `Task`.

As in lm-evaluation-harness, a task only *describes*: how a record becomes an `Item` (the
conversation to prompt with and the gold answer), how an output is parsed and scored, which
per-example scores are averaged into which metrics, and how few-shot examples go in front of
the question. `run.run_evaluate` does everything else (model, prompt format, batching, files),
the same way for every task. Adding a task is one module defining a `Task` and one line in
`TASKS` below.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from paratransfer.io.errors import UserError
from paratransfer.tasks.examples import Example


class BadExample(Exception):
    """A record lacks what its task needs; the caller prefixes the record's FILE:LINE."""


@dataclass(frozen=True)
class Item:
    """One example as its task sees it."""

    example: Example          # the conversation to prompt with; its last turn is the reference
    gold: str                 # what a correct parsed output equals (a number, a letter, a text)
    question: str             # the bare question (no instructions, no shots): for shots, judges
    category: str | None = None
    answer_prefix: str = ""   # text the answer starts with before the scored choice (MMLU)
    choices: tuple[str, ...] = ()  # continuations scored by likelihood (tasks that don't generate)

    @property
    def id(self) -> str:
        return self.example.id

    @property
    def source(self) -> str:
        return self.example.source


@dataclass(frozen=True)
class ShotPool:
    """Worked examples to put in front of questions, and where they came from (for messages)."""

    items: tuple[Item, ...]
    name: str


@dataclass(frozen=True)
class Task:
    """What an evaluation task is: prompt, target, metric. No model code."""

    name: str
    description: str
    #: metric name -> per-example score key it averages; the first is the headline metric.
    metrics: dict[str, str]
    #: record -> Item; raises BadExample when the record lacks what the task needs.
    to_item: Callable[[Example], Item]
    #: (model output, item) -> {"parsed": ..., <score keys>: ...}.
    score: Callable[[str, Item], dict[str, Any]]
    #: False: the output is the likeliest of `item.choices` (next-token scoring, no generation).
    generates: bool = True
    max_new_tokens: int = 512
    #: (item, pool, k) -> the item with k worked examples in its prompt; None: no few-shot.
    add_shots: Callable[[Item, ShotPool, int], Item] | None = None
    #: The pool used when no --shots-data is given; None: --shots needs --shots-data.
    fixed_shots: Callable[[], ShotPool] | None = None
    #: Pairwise comparison by a judge model (--judge/--reference); None: not offered.
    compare: Callable[..., list[dict[str, Any]]] | None = None


# --------------------------------------------------------------------------- helpers for tasks


def last_user(example: Example) -> str:
    """The user turn the answer responds to (the turn before the last)."""
    if len(example.messages) < 2 or example.messages[-2]["role"] != "user":
        raise BadExample("expected a user turn right before the final assistant turn")
    return example.messages[-2]["content"]


def with_turns(example: Example, user: str, answer: str | None = None) -> Example:
    """The example with its last user turn (and optionally its answer) replaced."""
    last_user(example)
    answer = example.answer if answer is None else answer
    messages = (*example.messages[:-2], {"role": "user", "content": user},
                {"role": "assistant", "content": answer})
    return replace(example, messages=messages)


def category_of(example: Example) -> str | None:
    """The record's `category` (MMLU subject), when it has a non-empty string one."""
    value = example.extra.get("category")
    return value if isinstance(value, str) and value.strip() else None


def mean(values: Sequence[float]) -> float:
    """Plain mean (bools count as 0/1); 0.0 for nothing."""
    return float(sum(values)) / len(values) if values else 0.0


# --------------------------------------------------------------------------- the registry

# The task modules import the names above from this package, so they come after them. (The
# submodule `open` shadows the builtin in this file only; nothing here opens files.)
from paratransfer.evaluate import gsm, mmlu, open, super_ni  # noqa: E402

#: Every task, by the name `--task` takes.
TASKS: dict[str, Task] = {t.name: t for t in (gsm.GSM, mmlu.MMLU, super_ni.SUPER_NI, open.OPEN)}


def get_task(name: str) -> Task:
    """The registered task, or a one-line error listing the known ones."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown task {name!r} (expected one of: {', '.join(TASKS)})") from None
