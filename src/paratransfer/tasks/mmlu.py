"""MMLU: multiple choice A-D scored by next-token likelihood of the answer letters; accuracy.

No generation: the model reads the prompt, then the text its training answers begin with, and
the likeliest of the letters is its answer. The project's MMLU records answer either with a
bare letter ("C", the seed sets) or with "The answer is: C" (the training sets, as Open-Instruct
writes them); the prompt continues the way the record's own answer does, so a model is scored
on the very token it was taught to produce there. With `--shots K`, the first K records of the
same subject in `--shots-data` come first, Open-Instruct style ("...\\nAnswer: C\\n\\n").

Data source (`paratransfer data mmlu`, at the end): MMLU rows (`question`, `choices`, `answer`,
`subject`) become the records above, in Open-Instruct's prompt.
"""

from __future__ import annotations

import re
from typing import Any

from paratransfer.tasks.examples import Example
from paratransfer.tasks.task import (
    BadExample,
    BadRow,
    Field,
    Item,
    ShotPool,
    Task,
    TaskFormat,
    category_of,
    chat,
    last_user,
    text,
    with_turns,
)

LETTERS = ("A", "B", "C", "D")

#: A gold answer: an optional lead-in ("The answer is:", "Answer:") then one letter A-D,
#: optionally in brackets or followed by "." (the letter itself must be a capital).
_GOLD = re.compile(
    r"\s*(?P<prefix>(?i:the\s+answer\s+is|answer)\s*:?)?\s*\(?(?P<letter>[A-D])\)?\.?\s*"
)
_HEADER = re.compile(r"The following are multiple choice questions \(with answers\) about [^\n]*\n\n")


def parse_letter(text: str) -> str | None:
    """The letter A-D an answer text gives ("C", "(C)", "C.", "The answer is: C"), else None."""
    m = _GOLD.fullmatch(text)
    return m["letter"] if m else None


def answer_prefix(text: str) -> str:
    """The lead-in an answer text puts before its letter ("The answer is:"), or ""."""
    m = _GOLD.fullmatch(text)
    return m["prefix"].strip() if m and m["prefix"] else ""


def split_header(user: str) -> tuple[str, str]:
    """(the "The following are multiple choice questions ... about X." header, the question)."""
    m = _HEADER.match(user)
    return (m.group(0), user[m.end():]) if m else ("", user)


def header_for(category: str) -> str:
    """The header Open-Instruct writes for a subject, for records that have none."""
    return (f"The following are multiple choice questions (with answers) about "
            f"{category.replace('_', ' ')}.\n\n")


# --------------------------------------------------------------------------- the task


def to_item(example: Example) -> Item:
    """The record's prompt as is; gold = its letter; choices continue its answer's lead-in."""
    letter = parse_letter(example.answer)
    if letter is None:
        shown = " ".join(example.answer.split())[:40]
        raise BadExample(f'the answer "{shown}" is not a letter A-D '
                         '(expected "A".."D" or "The answer is: A".."D")')
    prefix = answer_prefix(example.answer)
    _, question = split_header(last_user(example))
    # After a lead-in the letter follows a space, as it does in "The answer is: C".
    choices = tuple((" " if prefix else "") + c for c in LETTERS)
    return Item(example, letter, question, category_of(example), prefix, choices)


def score(output: str, item: Item) -> dict:
    """`output` is the chosen letter; correct when it is the gold one."""
    return {"parsed": output, "correct": output == item.gold}


def add_shots(item: Item, pool: ShotPool, k: int) -> Item:
    """The first k records of the item's subject in the pool (never the question itself)."""
    if item.category is None:
        raise BadExample(f'--shots {k} takes examples of the same subject, but the record has no '
                         '"category" (expected e.g. "category": "college_biology")')
    shots = [s for s in pool.items
             if s.category == item.category and s.question != item.question][:k]
    if len(shots) < k:
        raise BadExample(f"--shots {k}: only {len(shots)} examples of subject "
                         f"{item.category!r} in {pool.name}")
    header, _ = split_header(last_user(item.example))
    demos = "".join(f"{_ends_with_answer(s.question)} {s.gold}\n\n" for s in shots)
    prompt = f"{header or header_for(item.category)}{demos}{item.question}"
    return Item(with_turns(item.example, prompt), item.gold, item.question, item.category,
                item.answer_prefix, item.choices)


def _ends_with_answer(question: str) -> str:
    """The question ending with "Answer:", where a worked example's letter goes."""
    question = question.rstrip()
    return question if question.endswith("Answer:") else f"{question}\nAnswer:"


MMLU = Task(
    name="mmlu",
    description="multiple choice A-D: next-token likelihood of the letters, accuracy",
    metrics={"accuracy": "correct"},
    to_item=to_item,
    score=score,
    generates=False,
    add_shots=add_shots,
)


# --------------------------------------------------------------------------- data source


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
    user = f"{header_for(text(row, 'subject'))}{text(row, 'question')}{options}\nAnswer:"
    return chat(user, f"The answer is: {letter}")


def _mmlu_seed_answer(answer: str) -> str:
    """The seed sets answer with the bare letter (the method's note on MMLU seeds)."""
    return answer.removeprefix("The answer is:").strip()


FORMAT = TaskFormat(
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

#: What this module declares (`tasks/registry.py` registers it).
TASK = MMLU
FORMATS = (FORMAT,)
