"""How one row of a source dataset becomes one of the project's chat records, per task.

A `TaskFormat` names the fields it reads, each with the column it is read from by default
(`--columns FIELD=COLUMN` reads it from another), the conversation it writes, and where its data
usually lives on the Hugging Face hub. Records are `{"dataset", "id", "messages"}` (MMLU adds
`category`), the shape `paratransfer.tasks.examples` reads and `paratransfer.evaluate` scores.

Hub ids, configs, splits and columns, checked against each dataset's card on the hub (and, for
Super-NI and LIMA, code that loads them with `datasets`):
- `openai/gsm8k`, config `main`: `question`, `answer` (worked solution with `<<calc>>`
  annotations, ending in `#### N`); splits `train` (7,473), `test` (1,319).
- `cais/mmlu`, config `all`: `question`, `subject`, `choices` (4 strings), `answer` (class
  label 0-3 = A-D); splits `auxiliary_train`, `dev` (285), `validation` (1,531), `test` (14,042).
- `Muennighoff/natural-instructions` (Super-NaturalInstructions): `task_name`, `id`,
  `definition`, `inputs`, `targets`; splits `train`, `validation`, `test`.
- `GAIR/lima`: `conversations` (strings, user first), `source`; splits `train` (1,030) and
  `test` (300 prompts without answers). The repository holds a loading script, which `datasets`
  4 and later refuse, so its data file is read directly: `hf://datasets/GAIR/lima/train.jsonl`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from paratransfer.evaluate.gsm import CALCULATOR as GSM_CALCULATOR
from paratransfer.evaluate.gsm import INSTRUCTION as GSM_INSTRUCTION
from paratransfer.evaluate.mmlu import LETTERS, header_for
from paratransfer.io.errors import UserError


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


def _text(row: dict, name: str) -> str:
    """A non-empty string field (a one-element list of strings counts, as in the NI files)."""
    value = row[name]
    if isinstance(value, list) and len(value) >= 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str):
        raise BadRow(f"{name} is {type(value).__name__} (expected text)")
    if not value.strip():
        raise BadRow(f"{name} is empty (expected text)")
    return value


def _chat(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


# --------------------------------------------------------------------------- GSM



def gsm_answer(answer: str) -> str:
    """A GSM8K solution as the paper's training data writes it.

    Rule derived by comparing the reference's 1,032 GSM records with GSM8K's train split
    (all match): drop the `<<...>>` annotations, strip the steps, turn line breaks into spaces,
    end them with "." if they don't, then add "So the answer is N." with N as written after
    `####` (commas kept), and put "Answer: " in front. An answer without `####` is kept as one
    line after "Answer: " and must contain a number (the final number is the gold one).
    """
    if "####" in answer:
        steps, final = answer.rsplit("####", 1)
        final = final.strip()
        if not final:
            raise BadRow('answer has nothing after "####" (expected the final number)')
        steps = GSM_CALCULATOR.sub("", steps).strip().replace("\n", " ")
        if steps and not steps.endswith("."):
            steps += "."
        text = f"{steps} So the answer is {final}." if steps else f"So the answer is {final}."
    else:
        text = answer.strip().replace("\n", " ")
        if not re.search(r"\d", text):
            raise BadRow('answer has no number (expected a solution ending in "#### N" or a number)')
    return text if text.startswith("Answer:") else f"Answer: {text}"


def _gsm(row: dict) -> list[dict[str, str]]:
    return _chat(f"{GSM_INSTRUCTION}Question: {_text(row, 'question')}",
                 gsm_answer(_text(row, "answer")))


GSM = TaskFormat(
    name="gsm",
    description="GSM8K math word problems: worked answers ending 'So the answer is N.'",
    fields=(Field("question", "question", "the word problem"),
            Field("answer", "answer", 'the worked solution ending in "#### N"')),
    messages=_gsm,
    evaluate_task="gsm",
    train_split="train",
    eval_split="test",
    hub_id="openai/gsm8k",
    hub_config="main",
)

# --------------------------------------------------------------------------- MMLU


def _letter(value: Any) -> str:
    """The gold letter from a class label 0-3 or a letter A-D."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(LETTERS):
        return LETTERS[value]
    if isinstance(value, str) and value.strip() in LETTERS:
        return value.strip()
    raise BadRow(f"answer is {value!r} (expected 0-3 or a letter A-D)")


def _mmlu(row: dict) -> list[dict[str, str]]:
    """Open-Instruct's MMLU prompt: subject header, question, "A. ..." to "D. ...", "Answer:"."""
    choices = row["choices"]
    if (not isinstance(choices, list) or len(choices) != len(LETTERS)
            or not all(isinstance(c, str) for c in choices)):
        raise BadRow(f"choices is {type(choices).__name__} of {len(choices) if isinstance(choices, list) else '?'}"
                     f" (expected a list of {len(LETTERS)} strings)")
    letter = _letter(row["answer"])
    options = "".join(f"\n{lt}. {c}" for lt, c in zip(LETTERS, choices, strict=True))
    user = f"{header_for(_text(row, 'subject'))}{_text(row, 'question')}{options}\nAnswer:"
    return _chat(user, f"The answer is: {letter}")


def _mmlu_seed_answer(answer: str) -> str:
    """The seed sets answer with the bare letter (the method's note on MMLU seeds)."""
    return answer.removeprefix("The answer is:").strip()


MMLU = TaskFormat(
    name="mmlu",
    description="MMLU multiple choice A-D: 'The answer is: X' (seeds: the bare letter)",
    fields=(Field("question", "question", "the question"),
            Field("choices", "choices", "the four options, in A-D order"),
            Field("answer", "answer", "the gold option: 0-3 or A-D"),
            Field("subject", "subject", "the subject, e.g. college_biology (the record's category)")),
    messages=_mmlu,
    evaluate_task="mmlu",
    # MMLU has no training split of its own; the paper's pool comes from dev and validation.
    train_split="dev+validation",
    eval_split="test",
    hub_id="cais/mmlu",
    hub_config="all",
    extra=lambda row: {"category": row["subject"]},
    seed_answer=_mmlu_seed_answer,
)

# --------------------------------------------------------------------------- Super-NaturalInstructions

#: Worked examples put before the input when the row has them (the reference records have 2).
SUPER_NI_EXAMPLES = 2


def _super_ni(row: dict) -> list[dict[str, str]]:
    """Definition, up to two worked examples, then the input, as "Input:\\n...\\nOutput:\\n"."""
    parts = [_text(row, "definition").strip(), "\n\n"]
    examples = row.get("examples") or []
    if not isinstance(examples, list):
        raise BadRow(f"examples is {type(examples).__name__} (expected a list of {{input, output}})")
    for i, ex in enumerate(examples[:SUPER_NI_EXAMPLES]):
        if not isinstance(ex, dict) or not {"input", "output"} <= set(ex):
            raise BadRow(f"examples[{i}] is not an object with input and output")
        try:
            parts.append(f"Input:\n{_text(ex, 'input')}\nOutput:\n{_text(ex, 'output')}\n\n")
        except BadRow as e:
            raise BadRow(f"examples[{i}]: {e}") from None
    parts.append(f"Input:\n{_text(row, 'input')}\nOutput:\n")
    return _chat("".join(parts), _text(row, "output"))


SUPER_NI = TaskFormat(
    name="super_ni",
    description="Super-NaturalInstructions: definition (+ worked examples) and input; output",
    fields=(Field("definition", "definition", "the task definition"),
            Field("input", "inputs", "the instance input"),
            Field("output", "targets", "the reference output (the first, if a list)"),
            Field("examples", None, "worked examples: a list of {input, output}", required=False)),
    messages=_super_ni,
    evaluate_task="super_ni",
    train_split="train",
    eval_split="test",
    hub_id="Muennighoff/natural-instructions",
    id_column="id",
)

# --------------------------------------------------------------------------- LIMA


def _lima(row: dict) -> list[dict[str, str]]:
    """Turns alternate user, assistant, ...; a final user turn without an answer is dropped."""
    turns = row["conversations"]
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise BadRow("conversations is not a list of strings (expected user, assistant, ...)")
    turns = turns[: len(turns) - len(turns) % 2]
    if not turns:
        raise BadRow("conversations has no answered turn (expected user, assistant, ...)")
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


LIMA = TaskFormat(
    name="lima",
    description="LIMA dialogues: user and assistant turns, multi-turn kept",
    fields=(Field("conversations", "conversations", "the turns: user, assistant, user, ..."),),
    messages=_lima,
    evaluate_task="open",
    train_split="train",
    eval_split="rest",  # LIMA's test split has no reference answers
    hub_id="hf://datasets/GAIR/lima/train.jsonl",
)

# --------------------------------------------------------------------------- any instruction data


def _open(row: dict) -> list[dict[str, str]]:
    """user (+ a blank line and the input, when there is one) -> assistant."""
    user = _text(row, "user")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise BadRow(f"input is {type(extra).__name__} (expected text or absent)")
    if extra and extra.strip():
        user = f"{user}\n\n{extra}"
    return _chat(user, _text(row, "assistant"))


OPEN = TaskFormat(
    name="open",
    description="any instruction data: a user column (+ an optional input) and an answer column",
    fields=(Field("user", "instruction", "the user turn"),
            Field("assistant", "output", "the answer"),
            Field("input", "input", "extra input appended to the user turn", required=False)),
    messages=_open,
    evaluate_task="open",
    train_split="train",
    eval_split="test",
)

#: Every task `paratransfer data` builds, by name.
FORMATS: dict[str, TaskFormat] = {f.name: f for f in (GSM, MMLU, SUPER_NI, LIMA, OPEN)}


def get_format(name: str) -> TaskFormat:
    """The registered task format, or a one-line error naming the known ones."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown task {name!r} (expected one of: {', '.join(FORMATS)})") from None


def parse_columns(fmt: TaskFormat, text: str | None) -> dict[str, str | None]:
    """`FIELD=COLUMN,...` over the task's defaults: field name -> source column (None: unused)."""
    columns = {f.name: f.column for f in fmt.all_fields}
    if not text:
        return columns
    for item in text.split(","):
        name, sep, column = (s.strip() for s in item.partition("="))
        if not sep or not name or not column:
            raise UserError(f"--columns: {item.strip()!r} is not FIELD=COLUMN "
                            "(expected e.g. question=prompt,answer=solution)")
        if name not in columns:
            raise UserError(f"--columns: task {fmt.name} has no field {name!r} "
                            f"(expected one of: {', '.join(columns)})")
        columns[name] = column
    return columns
