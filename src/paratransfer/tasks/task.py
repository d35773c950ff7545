"""What a task declares, in one module per task (`tasks/gsm.py`, ...; registered once in
`tasks/registry.py`): how rows of its source dataset become chat records (`TaskFormat`, read by
`paratransfer data`), and how a record is prompted and scored (`Task`, read by `paratransfer
evaluate` and a recipe's `task.type`).

As in lm-evaluation-harness, a task only *describes*: how a record becomes an `Item` (the
conversation to prompt with and the gold answer), how an output is parsed and scored, which
per-example scores are averaged into which metrics, and how few-shot examples go in front of
the question. `evaluate.run.run_evaluate` does everything else (model, prompt format,
batching, files), the same way for every task; `sources.build` samples and writes the records.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from paratransfer.tasks.examples import Example

# --------------------------------------------------------------------------- evaluation


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


# --------------------------------------------------------------------------- data source


class BadRow(Exception):
    """A row lacks what its task needs; the caller prefixes the source, split and row."""


@dataclass(frozen=True)
class Field:
    """One value a task reads from a row."""

    name: str
    column: str | None  # the source column read by default (None: only when mapped)
    help: str
    required: bool = True


@dataclass(frozen=True)
class TaskFormat:
    """What a task's records look like and where its data usually comes from."""

    name: str
    description: str
    fields: tuple[Field, ...]
    #: row (field name -> value, None for an absent optional field) -> chat messages.
    messages: Callable[[dict[str, Any]], list[dict[str, str]]]
    evaluate_task: str              # the `paratransfer evaluate --task` that scores the records
    train_split: str                # default split(s) the seeds and training examples come from
    eval_split: str                 # default eval split; "rest": training-split rows not drawn
    hub_id: str | None = None       # what --from takes for the usual source
    hub_config: str | None = None
    #: column the record ids come from (`TASK_ID`); without one they are `TASK_SPLIT_ROW`.
    id_column: str | None = None
    #: row -> extra record keys (between "dataset" and "id").
    extra: Callable[[dict[str, Any]], dict[str, Any]] = field(default=lambda row: {})
    #: a training answer -> the seed answer (MMLU's seeds answer with the bare letter).
    seed_answer: Callable[[str], str] | None = None

    @property
    def all_fields(self) -> tuple[Field, ...]:
        """The task's fields and `id`, which every task can take from a column."""
        return (*self.fields,
                Field("id", self.id_column, "record id (else TASK_SPLIT_ROW)", required=False))


# --------------------------------------------------------------------------- value checks


def text(row: dict, name: str) -> str:
    """A non-empty string field (a one-element list of strings counts, as in the NI files)."""
    value = row[name]
    if isinstance(value, list) and len(value) >= 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str):
        raise BadRow(f"{name} is {type(value).__name__} (expected text)")
    if not value.strip():
        raise BadRow(f"{name} is empty (expected text)")
    return value


def chat(user: str, assistant: str) -> list[dict[str, str]]:
    """One user turn and its answer, as a record's messages."""
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
