"""Open-ended instructions (LIMA-style records): generation, ROUGE-L, and a judged win rate.

ROUGE-L against the record's reference answer is always reported (it needs no judge). With
`--judge JUDGE_DIR --reference OTHER_RESULTS_DIR`, a local judge model compares each output
with the other run's output for the same id, as AlpacaFarm's pairwise evaluation does. The
judge is asked twice, once with each output first, and reads its verdict as the likelier of
the next tokens "A" and "B" (no generation, nothing to parse). Each order casts one vote, so a
judge that always prefers the first position scores every pair a tie (0.5), and comparing a run
with itself gives exactly 0.5.

Data source (`paratransfer data lima|open`, at the end): LIMA dialogues and any instruction
data (a user and an answer column) become the records scored here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from paratransfer.tasks import super_ni
from paratransfer.tasks.examples import Example, render
from paratransfer.tasks.task import BadRow, Field, Item, Task, TaskFormat, chat, text

JUDGE_PROMPT = (
    "You are comparing two responses to the same instruction. Decide which response follows "
    "the instruction better: more helpful, more accurate, clearer. Ignore which one comes "
    "first and how long they are.\n\n"
    "Instruction:\n{instruction}\n\n"
    "Response A:\n{first}\n\n"
    "Response B:\n{second}\n\n"
    "Which response is better? Answer with a single letter, A or B."
)
VERDICTS = ("A", "B")


def score(output: str, item: Item) -> dict:
    """ROUGE-L of the stripped output against the reference answer."""
    parsed = output.strip()
    return {"parsed": parsed, "rougeL": super_ni.rouge_l(parsed, item.gold)}


def judge_prompt(instruction: str, first: str, second: str, tokenizer, prompt_format: str) -> str:
    """The judge's prompt text in its own prompt format, ending where its verdict goes."""
    if prompt_format == "auto":
        prompt_format = "chat-template" if getattr(tokenizer, "chat_template", None) else "tulu"
    user = JUDGE_PROMPT.format(instruction=instruction.strip(), first=first.strip(),
                               second=second.strip())
    example = Example(id="judge", source="judge prompt", messages=(
        {"role": "user", "content": user}, {"role": "assistant", "content": ""}))
    return render(example, tokenizer, prompt_format)[0]


def votes(ours_first: Sequence[float], reference_first: Sequence[float]) -> float:
    """Our share of the two votes (1, 0.5 or 0) from the log-probabilities of "A", "B" per order.

    A tie within one order (equal log-probabilities) is half a vote.
    """
    def vote(ours: float, theirs: float) -> float:
        return 1.0 if ours > theirs else 0.5 if ours == theirs else 0.0

    return (vote(ours_first[0], ours_first[1]) + vote(reference_first[1], reference_first[0])) / 2


def compare(judge_model, judge_tokenizer, items: Sequence[Item], outputs: Sequence[str],
            reference_outputs: Sequence[str], *, prompt_format: str = "auto",
            batch_size: int = 16, progress: bool = False) -> list[dict[str, Any]]:
    """Per item: the judge's log-probabilities of "A"/"B" in both orders and our `win` share."""
    from paratransfer.evaluate.generation import choice_logprobs

    prompts = []
    for item, ours, theirs in zip(items, outputs, reference_outputs, strict=True):
        prompts.append(judge_prompt(item.question, ours, theirs, judge_tokenizer, prompt_format))
        prompts.append(judge_prompt(item.question, theirs, ours, judge_tokenizer, prompt_format))
    logprobs = choice_logprobs(judge_model, judge_tokenizer, prompts, [VERDICTS] * len(prompts),
                               batch_size=batch_size, progress=progress, desc="judge")
    rows = []
    for i in range(len(items)):
        ours_first, reference_first = logprobs[2 * i], logprobs[2 * i + 1]
        rows.append({
            "win": votes(ours_first, reference_first),
            "judge": {"ours_first": dict(zip(VERDICTS, ours_first, strict=True)),
                      "reference_first": dict(zip(VERDICTS, reference_first, strict=True))},
        })
    return rows


OPEN = Task(
    name="open",
    description="open-ended instructions: generation, ROUGE-L, judged pairwise win rate",
    metrics={"rougeL": "rougeL"},
    to_item=super_ni.to_item,
    score=score,
    max_new_tokens=1024,
    compare=compare,
)


# --------------------------------------------------------------------------- data source


def _lima(row: dict) -> list[dict[str, str]]:
    """Turns alternate user, assistant, ...; a final user turn without an answer is dropped."""
    turns = row["conversations"]
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise BadRow("conversations is not a list of strings (expected user, assistant, ...)")
    turns = turns[: len(turns) - len(turns) % 2]
    if not turns:
        raise BadRow("conversations has no answered turn (expected user, assistant, ...)")
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


LIMA_FORMAT = TaskFormat(
    name="lima",
    description="LIMA dialogues: user and assistant turns, multi-turn kept",
    fields=(Field("conversations", "conversations", "the turns: user, assistant, user, ..."),),
    messages=_lima,
    evaluate_task="open",
    train_split="train",
    eval_split="rest",  # LIMA's test split has no reference answers
    hub_id="hf://datasets/GAIR/lima/train.jsonl",
)


def _open(row: dict) -> list[dict[str, str]]:
    """user (+ a blank line and the input, when there is one) -> assistant."""
    user = text(row, "user")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise BadRow(f"input is {type(extra).__name__} (expected text or absent)")
    if extra and extra.strip():
        user = f"{user}\n\n{extra}"
    return chat(user, text(row, "assistant"))


OPEN_FORMAT = TaskFormat(
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

#: What this module declares (`tasks/registry.py` registers it).
TASK = OPEN
FORMATS = (LIMA_FORMAT, OPEN_FORMAT)
