"""GSM (math word problems): greedy generation; the last number of the output must equal the gold.

Reads the project's chat records (user "Answer the following question.\\n\\nQuestion: ...",
assistant "Answer: ... So the answer is N.") and original GSM8K records (`question`, `answer`
ending in `#### N`); both become the chat records' prompt, so a model trained on them is asked
the way it was taught. With `--shots K`, K worked examples come first, Open-Instruct style:
"Answer the following questions.\\n\\nQuestion: q1\\nAnswer: ...\\n\\n...Question: q".

Data source (`paratransfer data gsm`, at the end): GSM8K rows (`question`, `answer` ending in
`#### N`) become the chat records above.
"""

from __future__ import annotations

import re
from decimal import Decimal

from paratransfer.tasks.examples import Example
from paratransfer.tasks.task import (
    BadExample,
    BadRow,
    Field,
    Item,
    ShotPool,
    Task,
    TaskFormat,
    chat,
    last_user,
    text,
    with_turns,
)

INSTRUCTION = "Answer the following question.\n\n"
INSTRUCTION_SHOTS = "Answer the following questions.\n\n"

#: A number as written in an answer: optional minus ("-" or "−"; not after a word or a closing
#: bracket, so "10-3" is 10 and 3), optional `$`, thousands groups with commas, optional decimals. A final
#: "." with no digit after it ends a sentence ("So the answer is 7.") and is not part of it.
_NUMBER = re.compile(
    r"(?:(?<![\w)\]])(?P<sign>[-\u2212]))?\$?"
    r"(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)
CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations "<<2*3=6>>"

#: The fixed worked examples of `--shots K` without `--shots-data` (our own, not GSM8K's text).
FIXED_SHOTS: tuple[tuple[str, str], ...] = (
    ("A baker makes 24 muffins and sells 17 of them. How many muffins are left?",
     "Answer: The baker had 24 muffins and sold 17, so 24 - 17 = 7 muffins are left. "
     "So the answer is 7."),
    ("Three notebooks cost $2.50 each. How much do they cost in dollars?",
     "Answer: Each notebook costs $2.50, so three cost 3 * 2.50 = $7.50. So the answer is 7.5."),
    ("A box holds 6 pencils. How many boxes are needed to pack 45 pencils?",
     "Answer: 45 / 6 = 7.5, so 7 boxes hold only 42 pencils and an eighth box is needed. "
     "So the answer is 8."),
    ("A jacket costs $80 and is sold at 25% off. What is the sale price in dollars?",
     "Answer: The discount is 80 * 25 / 100 = $20, so the jacket costs 80 - 20 = $60. "
     "So the answer is 60."),
    ("Sam has 3 times as many stickers as Mia, who has 14. How many stickers do they have "
     "together?",
     "Answer: Sam has 3 * 14 = 42 stickers, so together they have 42 + 14 = 56. "
     "So the answer is 56."),
    ("A train covers 1,200 kilometers in 8 hours. What is its average speed in kilometers per "
     "hour?",
     "Answer: Its speed is 1,200 / 8 = 150 kilometers per hour. So the answer is 150."),
    ("A farmer has 4 fields with 350 plants each and sells 600 plants. How many plants are left?",
     "Answer: He has 4 * 350 = 1,400 plants, and after selling 600 he has 1,400 - 600 = 800 left. "
     "So the answer is 800."),
    ("It was 5 degrees in the morning and the temperature fell by 9 degrees by night. What was "
     "the temperature at night?",
     "Answer: The night temperature was 5 - 9 = -4 degrees. So the answer is -4."),
)


# --------------------------------------------------------------------------- parsing


def canonical(number: Decimal) -> str:
    """One spelling per value ("18.50" -> "18.5", "-0" -> "0", "1,000" -> "1000"), so equality is exact match."""
    if number == number.to_integral_value():
        return str(int(number))
    return format(number.normalize(), "f")


def numbers(text: str) -> list[str]:
    """Every number in `text`, in order, canonical (commas and `$` dropped, sign kept)."""
    return [canonical(Decimal(("-" if m["sign"] else "") + m["digits"].replace(",", "")))
            for m in _NUMBER.finditer(text)]


def last_number(text: str) -> str | None:
    """The answer a GSM output gives: its last number (None when it has none)."""
    found = numbers(text)
    return found[-1] if found else None


def gold_number(answer: str) -> str | None:
    """The gold number of a reference answer: after GSM8K's "####", else its last number."""
    if "####" in answer:
        return last_number(answer.rsplit("####", 1)[1])
    return last_number(answer)


def worked_answer(answer: str, gold: str) -> str:
    """A reference answer in the chat records' style ("Answer: ... So the answer is N.").

    GSM8K's "steps <<calc>>\\n#### N" becomes one line without the calculator annotations,
    so GSM8K records can serve as worked examples next to the project's chat records.
    """
    if "####" in answer:
        steps = " ".join(CALCULATOR.sub("", answer.rsplit("####", 1)[0]).split())
        answer = f"{steps} So the answer is {gold}." if steps else f"So the answer is {gold}."
    answer = answer.strip()
    return answer if answer.startswith("Answer:") else f"Answer: {answer}"


def question_of(user: str) -> str:
    """The bare question of a user turn, without the chat records' instruction and "Question: "."""
    text = user.strip()
    text = text.removeprefix(INSTRUCTION.strip()).strip()
    return text.removeprefix("Question:").strip()


# --------------------------------------------------------------------------- the task


def to_item(example: Example) -> Item:
    """The record as the chat records' zero-shot prompt, with its gold number."""
    gold = gold_number(example.answer)
    if gold is None:
        tail = " ".join(example.answer.split())[-60:]
        raise BadExample(f'no number in the gold answer "...{tail}" '
                         '(expected it to end with "So the answer is N." or "#### N")')
    question = question_of(last_user(example))
    if not question:
        raise BadExample("the question is empty (expected a word problem in the user turn)")
    prompt = f"{INSTRUCTION}Question: {question}"
    return Item(with_turns(example, prompt, worked_answer(example.answer, gold)), gold, question)


def score(output: str, item: Item) -> dict:
    """Exact match of the output's last number with the gold number."""
    parsed = last_number(output)
    return {"parsed": parsed, "correct": parsed is not None and parsed == item.gold}


def add_shots(item: Item, pool: ShotPool, k: int) -> Item:
    """The first k worked examples of the pool (never the question itself) before the question."""
    shots = [s for s in pool.items if s.question != item.question][:k]
    if len(shots) < k:
        raise BadExample(f"--shots {k}: only {len(shots)} worked examples in {pool.name}")
    demos = "".join(f"Question: {s.question}\n{s.example.answer}\n\n" for s in shots)
    prompt = f"{INSTRUCTION_SHOTS}{demos}Question: {item.question}"
    return Item(with_turns(item.example, prompt), item.gold, item.question, item.category)


def fixed_shots() -> ShotPool:
    """`FIXED_SHOTS` as items."""
    items = []
    for i, (question, answer) in enumerate(FIXED_SHOTS):
        example = Example(id=f"gsm-shot-{i}", source=f"gsm.FIXED_SHOTS[{i}]", messages=(
            {"role": "user", "content": f"{INSTRUCTION}Question: {question}"},
            {"role": "assistant", "content": answer}))
        items.append(to_item(example))
    return ShotPool(tuple(items), "the fixed worked examples (paratransfer.tasks.gsm)")


GSM = Task(
    name="gsm",
    description="math word problems: greedy generation, last number, exact match",
    metrics={"exact_match": "correct"},
    to_item=to_item,
    score=score,
    max_new_tokens=512,
    add_shots=add_shots,
    fixed_shots=fixed_shots,
)


# --------------------------------------------------------------------------- data source


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
        steps = CALCULATOR.sub("", steps).strip().replace("\n", " ")
        if steps and not steps.endswith("."):
            steps += "."
        text = f"{steps} So the answer is {final}." if steps else f"So the answer is {final}."
    else:
        text = answer.strip().replace("\n", " ")
        if not re.search(r"\d", text):
            raise BadRow('answer has no number (expected a solution ending in "#### N" or a number)')
    return text if text.startswith("Answer:") else f"Answer: {text}"


def _gsm(row: dict) -> list[dict[str, str]]:
    return chat(f"{INSTRUCTION}Question: {text(row, 'question')}",
                 gsm_answer(text(row, "answer")))


FORMAT = TaskFormat(
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

#: What this module declares (`tasks/registry.py` registers it).
TASK = GSM
FORMATS = (FORMAT,)
