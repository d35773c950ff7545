"""Tests for paratransfer.tasks.examples: record shapes, prompt text, answer-only labels, errors."""

from __future__ import annotations

import hashlib
import json
import re
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paratransfer.demo.tiny import char_tokenizer
from paratransfer.io.errors import UserError
from paratransfer.tasks.examples import (
    CONVERTERS,
    PROMPT_FORMATS,
    Example,
    file_digest,
    has_answer,
    load_tokenized,
    read_examples,
    render,
    tokenize_example,
)

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def write_jsonl(path: Path, lines: list) -> Path:
    """Write records (dicts are JSON-encoded, strings are written verbatim) one per line."""
    path.write_text(
        "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines),
        encoding="utf-8",
    )
    return path


def chat(*turns: tuple[str, str], **extra) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns], **extra}


def ex(*turns: tuple[str, str]) -> Example:
    return Example(
        id="t", messages=tuple({"role": r, "content": c} for r, c in turns), source="mem:1"
    )


# --------------------------------------------------------------------------- converters


def test_registry_names():
    assert set(CONVERTERS) == {"chat", "alpaca", "gsm8k", "conversations"}
    assert set(PROMPT_FORMATS) == {"tulu", "chat-template"}


def test_chat_record(tmp_path):
    f = write_jsonl(
        tmp_path / "c.jsonl",
        [chat(("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello."),
              id="c1", dataset="gsm", category="x")],
    )
    [e] = read_examples(f)
    assert e.id == "c1"
    assert e.source == f"{f}:1"
    assert e.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
    )
    assert e.extra == {"dataset": "gsm", "category": "x"}


def test_alpaca_record_with_and_without_input(tmp_path):
    f = write_jsonl(
        tmp_path / "alp.jsonl",
        [
            {"instruction": "Translate.", "input": "chat", "output": "cat"},
            {"instruction": "Say hi.", "output": "hi", "source": "x"},
            {"instruction": "Say hi.", "input": "", "output": "hi"},
        ],
    )
    a, b, c = read_examples(f)
    assert a.messages == (
        {"role": "user", "content": "Translate.\n\nchat"},
        {"role": "assistant", "content": "cat"},
    )
    assert b.messages[0] == {"role": "user", "content": "Say hi."}
    assert c.messages[0] == {"role": "user", "content": "Say hi."}
    assert (a.id, b.id, c.id) == ("alp-1", "alp-2", "alp-3")
    assert b.extra == {"source": "x"}
    assert a.extra == {}


def test_gsm8k_record_answer_kept_as_is(tmp_path):
    answer = "2+2=<<2+2=4>>4\n#### 4"
    f = write_jsonl(tmp_path / "test.jsonl", ["", {"question": "2+2?", "answer": answer}, "  "])
    [e] = read_examples(f)
    assert e.id == "test-2"  # blank line 1 skipped but still counted
    assert e.source.endswith("test.jsonl:2")
    assert e.messages == (
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": answer},
    )


def test_integer_id_and_limit(tmp_path):
    f = write_jsonl(tmp_path / "n.jsonl", [chat(("user", "q"), ("assistant", "a"), id=i) for i in range(5)])
    got = read_examples(f, limit=2)
    assert [e.id for e in got] == ["0", "1"]


# --------------------------------------------------------------------------- prompt text

EOS = "</s>"


def test_tulu_prompt_without_system(tok):
    prompt, answer = render(ex(("user", "  What is 2+2? \n"), ("assistant", "\n 4 \n")), tok)
    assert prompt == "<|user|>\nWhat is 2+2?\n\n<|assistant|>\n"
    assert answer == "4</s>"


def test_tulu_prompt_with_system(tok):
    prompt, answer = render(
        ex(("system", "You are terse."), ("user", "Name a colour."), ("assistant", "Red.")), tok
    )
    assert prompt == "<|system|>\nYou are terse.\n\n<|user|>\nName a colour.\n\n<|assistant|>\n"
    assert answer == "Red.</s>"


def test_tulu_multi_turn_earlier_answers_end_with_eos(tok):
    prompt, answer = render(
        ex(("user", "a"), ("assistant", " b "), ("user", "c"), ("assistant", "d")), tok
    )
    assert prompt == "<|user|>\na\n\n<|assistant|>\nb</s>\n<|user|>\nc\n\n<|assistant|>\n"
    assert answer == "d</s>"


def test_unknown_prompt_format(tok):
    with pytest.raises(UserError, match=r"unknown prompt format 'alpaca'.*tulu.*chat-template"):
        render(ex(("user", "a"), ("assistant", "b")), tok, "alpaca")


def test_render_rejects_example_not_ending_with_assistant(tok):
    with pytest.raises(UserError, match=r"^mem:1: last turn is from the user"):
        render(ex(("user", "a"), ("assistant", "b"), ("user", "c")), tok)


# --------------------------------------------------------------------------- labels


def test_labels_mask_prompt_through_assistant_newline(tok):
    e = ex(("system", "S"), ("user", "Hi there"), ("assistant", "Hello!"))
    out = tokenize_example(e, tok)
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels)
    # char tokenizer: no BOS added, one token per character, markers are single tokens
    assert tok.decode(ids) == "<|system|>\nS\n\n<|user|>\nHi there\n\n<|assistant|>\nHello!</s>"
    asst = tok.convert_tokens_to_ids("<|assistant|>")
    k = len(ids) - 1 - ids[::-1].index(asst)
    assert tok.convert_ids_to_tokens(ids[k + 1]) == "\n"
    boundary = k + 2
    assert labels[:boundary] == [-100] * boundary
    assert labels[boundary:] == ids[boundary:]
    assert -100 not in labels[boundary:]
    assert tok.decode(labels[boundary:]) == "Hello!" + EOS
    assert ids[-1] == tok.eos_token_id
    assert has_answer(out)


def test_truncation_to_max_length(tok):
    e = ex(("user", "abc"), ("assistant", "defgh"))
    full = tokenize_example(e, tok)
    prompt_len = 1 + len("\nabc\n\n") + 1 + 1  # <|user|> and <|assistant|> are one token each
    assert full["labels"].count(-100) == prompt_len
    assert len(full["input_ids"]) == prompt_len + 5 + 1

    cut = tokenize_example(e, tok, max_length=prompt_len + 2)
    assert cut["input_ids"] == full["input_ids"][: prompt_len + 2]
    assert cut["labels"] == full["labels"][: prompt_len + 2]
    assert tok.decode(cut["labels"][prompt_len:]) == "de"
    assert has_answer(cut)

    none = tokenize_example(e, tok, max_length=prompt_len)
    assert len(none["input_ids"]) == prompt_len
    assert not has_answer(none)

    with pytest.raises(UserError, match="max_length"):
        tokenize_example(e, tok, max_length=0)


def test_bos_adding_tokenizer_keeps_boundary():
    from tokenizers import processors

    t = char_tokenizer()
    t._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", t.convert_tokens_to_ids("<s>"))]
    )
    out = tokenize_example(ex(("user", "q"), ("assistant", "ans")), t)
    ids = out["input_ids"]
    assert ids.count(t.bos_token_id) == 1 and ids[0] == t.bos_token_id
    n_answer = sum(lbl != -100 for lbl in out["labels"])
    assert n_answer == len("ans") + 1
    assert t.decode([lbl for lbl in out["labels"] if lbl != -100]) == "ans</s>"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=st.text(alphabet=string.printable, max_size=40),
       answer=st.text(alphabet=string.printable, max_size=40))
def test_labeled_region_is_stripped_answer_plus_eos(tok, user, answer):
    out = tokenize_example(ex(("user", user), ("assistant", answer)), tok)
    labeled = [lbl for lbl in out["labels"] if lbl != -100]
    assert out["labels"][len(out["labels"]) - len(labeled):] == labeled  # one contiguous tail
    assert tok.decode(labeled) == answer.strip() + EOS


# --------------------------------------------------------------------------- chat template

TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def test_chat_template_format():
    t = char_tokenizer()
    t.chat_template = TEMPLATE
    e = ex(("system", "sys"), ("user", "hi"), ("assistant", " yo "))
    prompt, answer = render(e, t, "chat-template")
    assert prompt == "[system] sys\n[user] hi\n[assistant] "
    assert answer == "yo</s>"
    out = tokenize_example(e, t, "chat-template")
    assert out["labels"].count(-100) == len(prompt)
    assert t.decode([lbl for lbl in out["labels"] if lbl != -100]) == "yo</s>"


def test_chat_template_missing(tok):
    with pytest.raises(UserError, match="no chat_template"):
        render(ex(("user", "a"), ("assistant", "b")), tok, "chat-template")


def test_chat_template_missing_names_the_tokenizer(tmp_path):
    """Of a teacher and a student, the error says which one has no template."""
    from transformers import AutoTokenizer

    folder = tmp_path / "base-teacher"
    char_tokenizer().save_pretrained(folder)
    t = AutoTokenizer.from_pretrained(folder)
    with pytest.raises(UserError, match=f"{folder} has no chat_template"):
        render(ex(("user", "a"), ("assistant", "b")), t, "chat-template")


def test_chat_template_failure_is_user_error():
    t = char_tokenizer()
    t.chat_template = "{{ raise_exception('system role not supported') }}"
    with pytest.raises(UserError, match=r"^mem:1: .*system role not supported"):
        render(ex(("user", "a"), ("assistant", "b")), t, "chat-template")


# --------------------------------------------------------------------------- errors

GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}

BAD_LINES = {
    "invalid_json": ('{"messages": [', "invalid JSON"),
    "not_object": ("[1, 2]", "record is a list (expected a JSON object)"),
    "string_record": ('"hello"', "record is a string"),
    "unknown_shape": ({"prompt": "q", "completion": "a"},
                      "unknown record shape with keys ['completion', 'prompt']"),
    "messages_empty": ({"messages": []}, '"messages" is empty'),
    "messages_not_list": ({"messages": "hi"}, '"messages" is a string (expected a list'),
    "message_not_object": ({"messages": ["hi"]}, "messages[0] is a string"),
    "role_missing": ({"messages": [{"content": "a"}]}, 'messages[0] "role" is missing'),
    "content_not_string": ({"messages": [{"role": "user", "content": 3}]},
                           'messages[0] "content" is a number (expected a string)'),
    "unknown_role": ({"messages": [{"role": "bot", "content": "a"}]},
                     "messages[0] has unknown role 'bot' (expected one of system, user, assistant)"),
    "no_assistant": ({"messages": [{"role": "user", "content": "a"}]}, "no assistant turn"),
    "last_not_assistant": (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}]},
        "last turn is from the user (expected the conversation to end with an assistant turn)",
    ),
    "alpaca_output_not_string": ({"instruction": "i", "output": None},
                                 '"output" is null (expected a string)'),
    "gsm_question_not_string": ({"question": ["q"], "answer": "a"}, '"question" is a list'),
    "bad_id": ({**GOOD, "id": {"x": 1}}, '"id" is an object'),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_record_errors_name_file_and_line(tmp_path, case):
    bad, expected = BAD_LINES[case]
    f = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(UserError) as info:
        read_examples(f)
    msg = str(info.value)
    assert msg.startswith(f"{f}:3: "), msg
    assert "\n" not in msg
    assert expected in msg
    assert "(expected" in msg  # says what was expected


def test_unknown_shape_names_accepted_shapes(tmp_path):
    f = write_jsonl(tmp_path / "u.jsonl", [{"text": "x"}])
    with pytest.raises(UserError) as info:
        read_examples(f)
    msg = str(info.value)
    for name in CONVERTERS:
        assert name in msg
    assert "instruction" in msg and "question" in msg and "messages" in msg


def test_empty_and_blank_files(tmp_path):
    for name, text in [("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n")]:
        f = tmp_path / name
        f.write_text(text)
        with pytest.raises(UserError) as info:
            read_examples(f)
        assert str(info.value) == f"{f}: no records"


def test_missing_file(tmp_path):
    f = tmp_path / "nope.jsonl"
    with pytest.raises(UserError) as info:
        read_examples(f)
    assert str(info.value) == f"{f}: no such file"
    with pytest.raises(UserError, match="no such file"):
        file_digest(f)


def test_invalid_utf8(tmp_path):
    f = tmp_path / "bin.jsonl"
    f.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(f))}:2: not valid UTF-8"):
        read_examples(f)


def test_file_digest(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    assert file_digest(f) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_load_tokenized(tmp_path, tok):
    f = write_jsonl(tmp_path / "l.jsonl", [GOOD, {"question": "q2", "answer": "a2"}])
    out = load_tokenized(f, tok, limit=1)
    assert len(out) == 1 and has_answer(out[0])
    assert tok.decode([x for x in out[0]["labels"] if x != -100]) == "a</s>"
    with pytest.raises(UserError, match="unknown prompt format"):
        load_tokenized(f, tok, prompt_format="nope")


def test_tokenizer_without_eos():
    t = char_tokenizer()
    t.eos_token = None
    with pytest.raises(UserError, match="eos_token"):
        render(ex(("user", "a"), ("assistant", "b")), t)


# --------------------------------------------------------------------------- real data


def _real_files() -> list[tuple[Path, int | None]]:
    if not SHARED_DATA.is_dir():
        return []
    files: list[tuple[Path, int | None]] = [(p, None) for p in sorted(SHARED_DATA.glob("*/sample_*.jsonl"))]
    gsm8k = SHARED_DATA / "gsm8k" / "test.jsonl"
    if gsm8k.is_file():
        files.append((gsm8k, 50))
    return files


def test_real_data_reads_and_has_answers(tok):
    files = _real_files()
    if not files:
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    for path, limit in files:
        examples = read_examples(path, limit=limit)
        assert examples, path
        if limit:
            assert len(examples) == limit
        for e in examples:
            assert e.messages[-1]["role"] == "assistant"
            # character tokens: some LIMA prompts exceed 2048 tokens, so do not truncate here
            out = tokenize_example(e, tok, max_length=10**6)
            assert has_answer(out), e.source
            labeled = [x for x in out["labels"] if x != -100]
            assert len(labeled) >= 2, e.source  # at least one answer token + EOS
            assert labeled[-1] == tok.eos_token_id



def test_lima_conversations_records(tmp_path):
    p = tmp_path / "lima.jsonl"
    p.write_text('{"conversations": ["Q1", "A1", "Q2", "A2"], "source": "x"}\n'
                 '{"conversations": ["only a question"]}\n')
    with pytest.raises(UserError, match=r"lima.jsonl:2:"):
        read_examples(p)
    p.write_text('{"conversations": ["Q1", "A1", "Q2", "A2"], "source": "x"}\n')
    (ex,) = read_examples(p)
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "user", "assistant"]
    assert ex.messages[-1]["content"] == "A2"
