"""Evaluation without a model: answer parsing, scoring, prompts (as training renders them),
few-shot prompts, and one-line errors naming FILE:LINE for records a task cannot use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import shared_data
from paratransfer.evaluate import TASKS, get_task, gsm, mmlu, super_ni
from paratransfer.evaluate import open as open_task
from paratransfer.evaluate.run import (
    EvalSettings,
    apply_shots,
    load_items,
    prompts_for,
    summarize,
)
from paratransfer.io.errors import UserError
from paratransfer.tasks.examples import example_from_record, read_examples, render


def chat(user: str, assistant: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}], **extra}


def example(record: dict, line: int = 1):
    return example_from_record(record, source=f"t.jsonl:{line}", default_id=f"t-{line}")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# --------------------------------------------------------------------------- GSM numbers


@pytest.mark.parametrize("text, expected", [
    ("So the answer is 18.", "18"),                      # sentence-final dot is not a decimal
    ("She pays $1,250 in total.", "1250"),               # commas and $
    ("1,234,567 people", "1234567"),
    ("The change is -15 degrees.", "-15"),               # negative
    ("It fell to −3.", "-3"),                            # Unicode minus
    ("-$5.25 left", "-5.25"),
    ("3.50 + 2.50 = 6.00", "6"),                         # several numbers: the last; 6.00 == 6
    ("Each costs 0.75", "0.75"),
    ("half is .5", "0.5"),
    ("10-3=7 so 7 apples, then 12", "12"),
    ("from 10-3 we get", "3"),                           # a minus after a digit is subtraction
    ("1,23 is not a thousands group", "23"),
    ("(-4) is the result", "-4"),
    ("no digits here", None),
])
def test_gsm_last_number(text, expected):
    assert gsm.last_number(text) == expected


def test_gsm_numbers_in_order_and_canonical():
    assert gsm.numbers("$2,000.50 then 3, then -1 and 18.00") == ["2000.5", "3", "-1", "18"]


@pytest.mark.parametrize("answer, gold", [
    ("Answer: 75/3=25 cats ... 15-5=10 cats. So the answer is 10.", "10"),
    ("She has 16 - 3 = <<16-3=13>>13 eggs.\n#### 13", "13"),
    ("... #### 1,450,000", "1450000"),
    ("Loses 10.\n#### -10", "-10"),
])
def test_gsm_gold_number(answer, gold):
    assert gsm.gold_number(answer) == gold


@pytest.mark.parametrize("output, correct", [
    ("Answer: 6 * 2 = 12. So the answer is 12.", True),
    ("Answer: the total is $12.00", True),
    ("Answer: 12 apples, then 13 more", False),          # the last number counts
    ("Answer: twelve", False),
])
def test_gsm_score(output, correct):
    item = gsm.to_item(example(chat("Question: x?", "Answer: So the answer is 12.")))
    assert gsm.score(output, item)["correct"] is correct


def test_gsm8k_answer_becomes_worked_answer():
    text = "He has 2*3=<<2*3=6>>6 apples.\nThen 6+1=<<6+1=7>>7.\n#### 7"
    assert gsm.worked_answer(text, "7") == "Answer: He has 2*3=6 apples. Then 6+1=7. So the answer is 7."


def test_gsm_fixed_shots_are_eight_consistent_worked_examples():
    pool = gsm.fixed_shots()
    assert len(pool.items) == 8
    for item in pool.items:  # each stated answer is its last number, in the chat records' style
        assert item.example.answer.startswith("Answer: ")
        assert item.example.answer.endswith(f"So the answer is {item.gold}.")


def test_gsm_prompt_with_shots():
    item = gsm.to_item(example(chat("Answer the following question.\n\nQuestion: What is 2+2?",
                                    "Answer: So the answer is 4.")))
    assert item.example.messages[0]["content"] == "Answer the following question.\n\nQuestion: What is 2+2?"
    eight = gsm.add_shots(item, gsm.fixed_shots(), 8).example.messages[0]["content"]
    assert eight.startswith("Answer the following questions.\n\nQuestion: A baker makes 24")
    assert eight.count("Question: ") == 9 and eight.count("So the answer is") == 8
    assert eight.endswith("\n\nQuestion: What is 2+2?")
    with pytest.raises(Exception, match="only 8 worked examples"):
        gsm.add_shots(item, gsm.fixed_shots(), 9)


# --------------------------------------------------------------------------- MMLU letters


@pytest.mark.parametrize("text, letter, prefix", [
    ("A", "A", ""), (" B\n", "B", ""), ("(C)", "C", ""), ("D.", "D", ""),
    ("The answer is: C", "C", "The answer is:"), ("the answer is B", "B", "the answer is"),
    ("Answer: A", "A", "Answer:"),
    ("E", None, ""), ("AB", None, ""), ("a", None, ""), ("", None, ""), ("The answer is", None, ""),
])
def test_mmlu_letters(text, letter, prefix):
    assert mmlu.parse_letter(text) == letter
    assert mmlu.answer_prefix(text) == prefix


def test_mmlu_choices_continue_the_answer_the_model_was_taught(tokenizer):
    """prompt + the gold choice + EOS is exactly the text training sees, in both answer styles."""
    user = "The following are multiple choice questions (with answers) about toys.\n\nWhich?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    for answer in ("C", "The answer is: C"):
        item = mmlu.to_item(example(chat(user, answer, category="toys")))
        prompt = prompts_for([item], tokenizer, "tulu")[0]
        taught = "".join(render(item.example, tokenizer, "tulu"))
        assert prompt + item.choices[2] + tokenizer.eos_token == taught
        assert item.gold == "C" and item.category == "toys"


def test_mmlu_shots_take_the_same_subject_never_the_question_itself():
    header = "The following are multiple choice questions (with answers) about {}.\n\n"
    pool_records = [chat(header.format("law") + f"Law q{i}?\nA. x\nB. y\nC. z\nD. w\nAnswer:",
                         "The answer is: " + "ABCD"[i % 4], category="law") for i in range(4)]
    pool_records.insert(1, chat(header.format("art") + "Art q?\nAnswer:", "B", category="art"))
    pool = mmlu.ShotPool(tuple(mmlu.to_item(example(r, i)) for i, r in enumerate(pool_records, 1)),
                         "pool.jsonl")
    item = mmlu.to_item(example(pool_records[0]))  # law q0, itself in the pool
    text = mmlu.add_shots(item, pool, 3).example.messages[0]["content"]
    assert text == (header.format("law") + "Law q1?\nA. x\nB. y\nC. z\nD. w\nAnswer: B\n\n"
                    "Law q2?\nA. x\nB. y\nC. z\nD. w\nAnswer: C\n\n"
                    "Law q3?\nA. x\nB. y\nC. z\nD. w\nAnswer: D\n\n"
                    "Law q0?\nA. x\nB. y\nC. z\nD. w\nAnswer:")
    with pytest.raises(Exception, match=r"only 3 examples of subject 'law' in pool.jsonl"):
        mmlu.add_shots(item, pool, 4)


# --------------------------------------------------------------------------- SNI / open


@pytest.mark.parametrize("prediction, reference, expected", [
    ("the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("the cat", "the cat sat on the mat", 0.5),            # P = 1, R = 2/6
    ("the cat sat on the mat", "the cat", 0.5),
    ("dogs bark", "the cat sat", 0.0),
    ("cats running", "cat run", 1.0),                      # Porter stemming, as rouge-score
    ("Hello, World!", "hello world", 1.0),                 # case and punctuation ignored
    ("a b c d", "a c b d", 0.75),                          # LCS 3 of 4
    ("ماريو!", "ماريو", 1.0),                              # non-Latin scripts are not dropped
    ("", "something", 0.0),
])
def test_rouge_l_known_pairs(prediction, reference, expected):
    assert super_ni.rouge_l(prediction, reference) == pytest.approx(expected)


def test_rouge_l_equals_rouge_score_default_on_ascii():
    from rouge_score import rouge_scorer

    default = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = [("The quick brown foxes jumped over 2 lazy dogs!", "quick foxes jumping over dogs_x"),
             ("It's 5 o'clock; generalization works", "generalizing works at 5")]
    for pred, ref in pairs:
        assert super_ni.rouge_l(pred, ref) == pytest.approx(default.score(ref, pred)["rougeL"].fmeasure)


@pytest.mark.parametrize("prediction, reference, match", [
    ("Yes.", "yes", True), ("  The  Answer ", "the answer", True), ("no", "No!", True),
    ("yes", "no", False), ("1", "2", False),
])
def test_super_ni_exact_match(prediction, reference, match):
    assert super_ni.exact_match(prediction, reference) is match


def test_judge_votes_cancel_position_bias():
    # (log p(A), log p(B)) with ours first, then with the reference first
    assert open_task.votes((-1, -2), (-2, -1)) == 1.0     # ours preferred in both orders
    assert open_task.votes((-2, -1), (-1, -2)) == 0.0     # reference preferred in both
    assert open_task.votes((-1, -2), (-1, -2)) == 0.5     # always "A": position bias -> a tie
    assert open_task.votes((-1, -1), (-2, -1)) == 0.75    # a tie in one order is half a vote


# --------------------------------------------------------------------------- summaries


def test_summary_headline_and_per_category():
    rows = [{"category": "a", "correct": True}, {"category": "a", "correct": False},
            {"category": "b", "correct": True}, {"category": "b", "correct": True}]
    s = summarize(TASKS["mmlu"], rows, judged=False)
    assert (s["metric"], s["value"], s["n"]) == ("accuracy", 0.75, 4)
    assert s["per_category"] == {"a": {"n": 2, "accuracy": 0.5}, "b": {"n": 2, "accuracy": 1.0}}
    judged = summarize(TASKS["open"], [{"rougeL": 0.5, "win": 1.0}, {"rougeL": 0.0, "win": 0.5}],
                       judged=True)
    assert (judged["metric"], judged["value"]) == ("win_rate", 0.75)
    assert judged["metrics"] == {"win_rate": 0.75, "rougeL": 0.25}


# --------------------------------------------------------------------------- bad input


def test_unknown_task_is_a_one_line_error():
    with pytest.raises(UserError, match=r"unknown task 'gsm9k' \(expected one of: gsm, mmlu, super_ni, open\)"):
        get_task("gsm9k")
    with pytest.raises(UserError, match="unknown task"):
        EvalSettings(task="nope")


@pytest.mark.parametrize("task, records, needle", [
    ("gsm", [chat("Question: q?", "So the answer is 3."), chat("Question: q?", "no number")],
     ":2: no number in the gold answer"),
    ("mmlu", [chat("Q?\nAnswer:", "B"), chat("Q?\nAnswer:", "B"), chat("Q?\nAnswer:", "maybe E")],
     ':3: the answer "maybe E" is not a letter A-D'),
    ("super_ni", [chat("Do it.", "  ")], ":1: the final assistant turn is empty"),
    ("open", [{"instruction": "x", "output": "y"}, {"prompt": "no known fields"}],
     ":2: unknown record shape"),
    ("gsm", [{"question": "How many?"}], ":1: unknown record shape"),
    ("mmlu", ["{not json"], ":1: invalid JSON"),
])
def test_records_missing_what_the_task_needs_name_file_and_line(tmp_path, task, records, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(UserError) as e:
        load_items(get_task(task), path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(path)) and needle in message


def test_empty_file_names_the_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(UserError, match=f"{path}: no records"):
        load_items(get_task("gsm"), path)


def test_shots_errors(tmp_path):
    mmlu_task, sni = get_task("mmlu"), get_task("super_ni")
    no_category = load_items(mmlu_task, write_jsonl(tmp_path / "m.jsonl", [chat("Q?\nAnswer:", "A")]))
    pool = write_jsonl(tmp_path / "pool.jsonl", [chat("P?\nAnswer:", "B", category="x")])
    with pytest.raises(UserError, match=r"m.jsonl:1: --shots 5 takes examples of the same subject, but the record has no \"category\""):
        apply_shots(mmlu_task, no_category, 5, pool)
    with pytest.raises(UserError, match="--shots needs --shots-data"):
        apply_shots(mmlu_task, no_category, 5, None)
    with pytest.raises(UserError, match="--shots-data .* given, but --shots is 0"):
        apply_shots(mmlu_task, no_category, 0, pool)
    items = load_items(sni, write_jsonl(tmp_path / "s.jsonl", [chat("Do.", "done")]))
    with pytest.raises(UserError, match="task super_ni: takes no worked examples"):
        apply_shots(sni, items, 2, None)


# --------------------------------------------------------------------------- the real data


def test_real_gsm_records_are_asked_as_taught(tokenizer):
    path = shared_data("gsm", "gsm_data_1000.jsonl")
    examples = read_examples(path, limit=20)
    items = load_items(get_task("gsm"), path, limit=20)
    for ex, item in zip(examples, items, strict=True):
        assert render(item.example, tokenizer)[0] == render(ex, tokenizer)[0]  # same prompt
        assert ex.answer.endswith(f"So the answer is {item.gold}.")


def test_real_gsm8k_records_get_the_chat_prompt_and_gold():
    path = shared_data("gsm8k", "test.jsonl")
    items = load_items(get_task("gsm"), path, limit=5)
    first = json.loads(path.read_text().splitlines()[0])
    assert items[0].gold == first["answer"].rsplit("####", 1)[1].strip()
    assert items[0].example.messages[0]["content"] == (
        "Answer the following question.\n\nQuestion: " + first["question"].strip())
    assert all("<<" not in i.example.answer and i.example.answer.endswith(f"So the answer is {i.gold}.")
               for i in items)


def test_real_mmlu_five_shot_prompt():
    data = shared_data("mmlu", "mmlu_data_1000.jsonl")
    pool = shared_data("mmlu", "mmlu_data.jsonl")
    task = get_task("mmlu")
    items = load_items(task, data, limit=3)
    assert all(i.answer_prefix == "The answer is:" and i.choices[0] == " A" for i in items)
    shot = apply_shots(task, items, 5, pool)
    for before, after in zip(items, shot, strict=True):
        text = after.example.messages[-2]["content"]
        subject = before.category.replace("_", " ")
        assert text.startswith(f"The following are multiple choice questions (with answers) about {subject}.")
        assert text.count("\nAnswer: ") == 5 and text.endswith(before.question)
        assert text.count(before.question) == 1  # the question is not its own worked example
