"""Super-NaturalInstructions: greedy generation; exact match and ROUGE-L against the reference.

Both metrics follow the benchmark's own scorer (natural-instructions `compute_metrics.py`):
exact match after lower-casing, dropping punctuation and collapsing spaces; ROUGE-L F-measure of
the `rouge-score` package with Porter stemming. One difference, on purpose: its default
tokenizer keeps only `[a-z0-9]`, which scores every answer in Arabic, Turkish, Chinese ... as
0 even when exact (the benchmark has many translation tasks); ours keeps letters and digits of
every script and is identical to the default on ASCII text.

Data source (`paratransfer data super_ni`, at the end): Super-NaturalInstructions rows
(definition, worked examples, input, output) become the records scored here.
"""

from __future__ import annotations

import functools
import re
import string

from paratransfer.tasks.examples import Example
from paratransfer.tasks.task import (
    BadExample,
    BadRow,
    Field,
    Item,
    Task,
    TaskFormat,
    chat,
    last_user,
    text,
)

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_WORD = re.compile(r"[^\W_]+")  # runs of letters and digits, any script
_ASCII_WORD = re.compile(r"[a-z0-9]+")


def normalize(text: str) -> str:
    """Lower-case, no ASCII punctuation, single spaces: what exact match compares."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def exact_match(prediction: str, reference: str) -> bool:
    """Whether prediction and reference are the same text after `normalize`."""
    return normalize(prediction) == normalize(reference)


class _Tokenizer:
    """rouge-score's default tokenizer (lower-case, alphanumeric runs, Porter stem if > 3
    characters), with letters and digits of every script kept instead of dropped."""

    def __init__(self) -> None:
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        tokens = _WORD.findall(text.lower())
        return [self._stemmer.stem(t) if len(t) > 3 and _ASCII_WORD.fullmatch(t) else t
                for t in tokens]


@functools.cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokenizer())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 1] of a prediction against one reference."""
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


# --------------------------------------------------------------------------- the task


def to_item(example: Example) -> Item:
    """The record's prompt as is; the reference is its final assistant turn."""
    reference = example.answer.strip()
    if not reference:
        raise BadExample("the reference answer is empty (expected it in the final assistant turn)")
    return Item(example, reference, last_user(example).strip())


def score(output: str, item: Item) -> dict:
    """Exact match and ROUGE-L of the stripped output against the reference."""
    parsed = output.strip()
    return {"parsed": parsed, "exact_match": exact_match(parsed, item.gold),
            "rougeL": rouge_l(parsed, item.gold)}


SUPER_NI = Task(
    name="super_ni",
    description="instruction following: greedy generation, exact match and ROUGE-L",
    metrics={"exact_match": "exact_match", "rougeL": "rougeL"},
    to_item=to_item,
    score=score,
    max_new_tokens=128,
)


# --------------------------------------------------------------------------- data source


#: Worked examples put before the input when the row has them (the reference records have 2).
SUPER_NI_EXAMPLES = 2


def _super_ni(row: dict) -> list[dict[str, str]]:
    """Definition, up to two worked examples, then the input, as "Input:\\n...\\nOutput:\\n"."""
    parts = [text(row, "definition").strip(), "\n\n"]
    examples = row.get("examples") or []
    if not isinstance(examples, list):
        raise BadRow(f"examples is {type(examples).__name__} (expected a list of {{input, output}})")
    for i, ex in enumerate(examples[:SUPER_NI_EXAMPLES]):
        if not isinstance(ex, dict) or not {"input", "output"} <= set(ex):
            raise BadRow(f"examples[{i}] is not an object with input and output")
        try:
            parts.append(f"Input:\n{text(ex, 'input')}\nOutput:\n{text(ex, 'output')}\n\n")
        except BadRow as e:
            raise BadRow(f"examples[{i}]: {e}") from None
    parts.append(f"Input:\n{text(row, 'input')}\nOutput:\n")
    return chat("".join(parts), text(row, "output"))


FORMAT = TaskFormat(
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

#: What this module declares (`tasks/registry.py` registers it).
TASK = SUPER_NI
FORMATS = (FORMAT,)
