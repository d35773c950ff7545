"""Records -> prompts -> tokens with answer-only labels (docs/method.md §1).

A JSONL file holds one record per line in one of the shapes of `CONVERTERS` (chat, alpaca,
GSM8K). Each record becomes an `Example` (a conversation ending with an assistant turn).
`render` turns it into (prompt, answer) text with one of `PROMPT_FORMATS`; `tokenize_example`
tokenizes prompt + answer and masks every prompt token with -100 so the loss covers the answer
only. Every problem with a file is a `UserError` naming `FILE:LINE`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paratransfer.io.errors import UserError
from paratransfer.io.readers import json_line

#: Label value ignored by the cross-entropy loss (PyTorch / transformers convention).
IGNORE_INDEX = -100

#: Roles a chat message may have.
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One conversation ending with the assistant turn to learn, and where it came from."""

    id: str
    messages: tuple[dict[str, str], ...]
    source: str  # "FILE:LINE"
    # Other fields of the record (e.g. `dataset`, `category`); not part of equality or hashing.
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def answer(self) -> str:
        """The final assistant turn's content, as stored (unstripped)."""
        return self.messages[-1]["content"]


class _BadRecord(Exception):
    """A problem with one record or example; callers prefix it with its FILE:LINE."""


# --------------------------------------------------------------------------- record converters


def _require_str(record: dict, key: str) -> str:
    """The string value of `key`, or a `_BadRecord` saying what it was instead."""
    value = record[key]
    if not isinstance(value, str):
        raise _BadRecord(f'"{key}" is {_kind(value)} (expected a string)')
    return value


def _kind(value: Any) -> str:
    """A short description of a JSON value's type, for error messages."""
    if value is None:
        return "null"
    return {
        bool: "a boolean", int: "a number", float: "a number", str: "a string",
        list: "a list", dict: "an object",
    }.get(type(value), type(value).__name__)


def _from_chat(record: dict) -> list[dict[str, str]]:
    """`{"messages": [{"role", "content"}, ...]}`: validated and copied to plain role/content."""
    raw = record["messages"]
    if not isinstance(raw, list):
        raise _BadRecord(f'"messages" is {_kind(raw)} (expected a list of {{role, content}})')
    if not raw:
        raise _BadRecord('"messages" is empty (expected at least one user and one assistant turn)')
    messages = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise _BadRecord(f'messages[{i}] is {_kind(msg)} (expected an object with role, content)')
        role, content = msg.get("role"), msg.get("content")
        for key, value in (("role", role), ("content", content)):
            if not isinstance(value, str):
                got = "missing" if key not in msg else _kind(value)
                raise _BadRecord(f'messages[{i}] "{key}" is {got} (expected a string)')
        if role not in ROLES:
            raise _BadRecord(f"messages[{i}] has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        messages.append({"role": role, "content": content})
    return messages


def _from_alpaca(record: dict) -> list[dict[str, str]]:
    """`{"instruction", "input"?, "output"}`: user = instruction (+ blank line + input)."""
    instruction = _require_str(record, "instruction")
    output = _require_str(record, "output")
    inp = record.get("input")
    if inp is not None and not isinstance(inp, str):
        raise _BadRecord(f'"input" is {_kind(inp)} (expected a string or absent)')
    user = instruction + ("\n\n" + inp if inp and inp.strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _from_gsm8k(record: dict) -> list[dict[str, str]]:
    """`{"question", "answer"}` (original GSM8K): user = question, assistant = answer as is."""
    question = _require_str(record, "question")
    answer = _require_str(record, "answer")
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _from_conversations(record: dict) -> list[dict[str, str]]:
    """`{"conversations": [str, ...]}` (LIMA): turns alternate user, assistant, user, ..."""
    raw = record["conversations"]
    if not isinstance(raw, list) or not raw:
        raise _BadRecord('"conversations" must be a non-empty list of strings (user, assistant, ...)')
    for i, turn in enumerate(raw):
        if not isinstance(turn, str):
            raise _BadRecord(f"conversations[{i}] is {_kind(turn)} (expected a string)")
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(raw)]


#: Record shapes, tried in order: name -> converter from a record to its chat messages.
CONVERTERS: dict[str, Callable[[dict], list[dict[str, str]]]] = {
    "chat": _from_chat,
    "alpaca": _from_alpaca,
    "gsm8k": _from_gsm8k,
    "conversations": _from_conversations,
}

#: The keys that identify each shape (all must be present); the optional ones are in the docs.
SHAPE_KEYS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "gsm8k": ("question", "answer"),
    "conversations": ("conversations",),
}

_SHAPE_HELP = 'chat {"messages"}, alpaca {"instruction", "output", optional "input"}, gsm8k {"question", "answer"}, conversations {"conversations": [user, assistant, ...]}'
_OPTIONAL_KEYS: dict[str, tuple[str, ...]] = {"alpaca": ("input",)}


def detect_shape(record: dict) -> str:
    """The name of the first shape in `CONVERTERS` whose keys the record has."""
    for name in CONVERTERS:
        if all(key in record for key in SHAPE_KEYS[name]):
            return name
    raise _BadRecord(
        f"unknown record shape with keys {sorted(record)!r} (expected one of: {_SHAPE_HELP})"
    )


def _check_conversation(messages: list[dict[str, str]] | tuple[dict[str, str], ...]) -> None:
    """A trainable conversation has an assistant turn and ends with one."""
    if not any(m["role"] == "assistant" for m in messages):
        raise _BadRecord("no assistant turn (expected the conversation to end with one)")
    if messages[-1]["role"] != "assistant":
        raise _BadRecord(
            f"last turn is from the {messages[-1]['role']} "
            "(expected the conversation to end with an assistant turn)"
        )


def example_from_record(record: Any, *, source: str, default_id: str) -> Example:
    """One record (already parsed JSON) as an `Example`; problems raise UserError at `source`."""
    try:
        if not isinstance(record, dict):
            raise _BadRecord(f"record is {_kind(record)} (expected a JSON object)")
        shape = detect_shape(record)
        messages = CONVERTERS[shape](record)
        _check_conversation(messages)
        if not messages[-1]["content"].strip():
            raise _BadRecord("the final assistant turn is empty (expected an answer to learn "
                             "and score; an empty one would teach the end-of-answer token alone)")
        rid = record.get("id")
        if rid is None:
            rid = default_id
        elif isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise _BadRecord(f'"id" is {_kind(rid)} (expected a string or an integer)')
    except _BadRecord as e:
        raise UserError(f"{source}: {e}") from None
    used = {*SHAPE_KEYS[shape], *_OPTIONAL_KEYS.get(shape, ()), "id"}
    extra = {k: v for k, v in record.items() if k not in used}
    return Example(id=str(rid), messages=tuple(messages), source=source, extra=extra)


def read_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """Read a JSONL file of records (blank lines skipped) into Examples, at most `limit` of them."""
    path = Path(path)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"{path}: limit must be a positive integer, got {limit!r}")
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a file (expected a JSONL file)")
    examples: list[Example] = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if limit is not None and len(examples) >= limit:
                break
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            record = json_line(raw, where)
            examples.append(
                example_from_record(record, source=where, default_id=f"{path.stem}-{lineno}")
            )
    if not examples:
        raise UserError(f"{path}: no records")
    return examples


# --------------------------------------------------------------------------- prompt formats


def _eos(tokenizer) -> str:
    """The tokenizer's EOS token text, which ends every answer so the model learns to stop."""
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise UserError("tokenizer has no eos_token (expected one to end the answer with)")
    return eos


def _tulu(messages: tuple[dict[str, str], ...], tokenizer) -> tuple[str, str]:
    """Tulu / Open-Instruct format (docs/method.md §1, prompt format).

    Turns are `<|role|>\\n` + content.strip() + `\\n\\n`; an earlier assistant turn ends with
    EOS + `\\n` instead, as Open-Instruct's `_concat_messages` writes it, so multi-turn prompts
    show the model the same end-of-answer marker it learns to produce. The prompt ends with the
    generation marker `<|assistant|>\\n`; the answer is the last turn stripped + EOS.
    """
    eos = _eos(tokenizer)
    parts = []
    for msg in messages[:-1]:
        role, content = msg["role"], msg["content"].strip()
        if role == "assistant":
            parts.append(f"<|assistant|>\n{content}{eos}\n")
        else:
            parts.append(f"<|{role}|>\n{content}\n\n")
    parts.append("<|assistant|>\n")
    return "".join(parts), messages[-1]["content"].strip() + eos


def _chat_template(messages: tuple[dict[str, str], ...], tokenizer) -> tuple[str, str]:
    """The tokenizer's own chat template with the generation prompt; answer = last turn + EOS."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise UserError(
            f"prompt format 'chat-template': {name} has no chat_template "
            "(expected a tokenizer that defines one, or prompt format 'tulu')"
        )
    eos = _eos(tokenizer)
    try:
        prompt = tokenizer.apply_chat_template(
            [dict(m) for m in messages[:-1]], tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # jinja2 TemplateError, raise_exception() in templates, ...
        msg = " ".join(str(e).split())
        raise _BadRecord(f"the tokenizer's chat template failed: {msg}") from None
    if not isinstance(prompt, str):
        raise UserError(f"the tokenizer's chat template returned {type(prompt).__name__} (expected text)")
    return prompt, messages[-1]["content"].strip() + eos


#: Prompt formats: name -> function(messages, tokenizer) -> (prompt_text, answer_text).
PROMPT_FORMATS: dict[str, Callable[[tuple[dict[str, str], ...], Any], tuple[str, str]]] = {
    "tulu": _tulu,
    "chat-template": _chat_template,
}


def prompt_formats_help(about_tulu: str = "") -> str:
    """`--prompt-format`'s help: every format's name, tulu's with where it is described."""
    return " or ".join(f"{name} (docs/method.md §1{about_tulu})" if name == "tulu" else name
                       for name in PROMPT_FORMATS)


def _prompt_format(name: str):
    """The registered prompt-format function, or a UserError naming the known ones."""
    try:
        return PROMPT_FORMATS[name]
    except (KeyError, TypeError):
        raise UserError(
            f"unknown prompt format {name!r} (expected one of: {', '.join(PROMPT_FORMATS)})"
        ) from None


def render(example: Example, tokenizer, prompt_format: str = "tulu") -> tuple[str, str]:
    """(prompt_text, answer_text): the prompt ends with the generation marker, the answer is the last turn."""
    fmt = _prompt_format(prompt_format)
    try:
        if not example.messages:
            raise _BadRecord("no messages (expected a conversation ending with an assistant turn)")
        _check_conversation(example.messages)
        return fmt(example.messages, tokenizer)
    except _BadRecord as e:
        raise UserError(f"{example.source}: {e}") from None


# --------------------------------------------------------------------------- tokenization


def tokenize_example(
    example: Example, tokenizer, prompt_format: str = "tulu", max_length: int = 2048
) -> dict[str, list[int]]:
    """`input_ids` of prompt + answer and `labels` masking the prompt with -100, cut to max_length.

    Both texts are tokenized with the tokenizer's defaults (its own BOS, if it adds one, and
    nothing else); the answer starts at the token length of the prompt tokenized on its own
    (docs/method.md §1 step 3). Truncation may leave no answer token: see `has_answer`.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise UserError(f"max_length must be a positive integer, got {max_length!r}")
    prompt, answer = render(example, tokenizer, prompt_format)
    input_ids = leading_tokens(tokenizer, prompt + answer, max_length)
    boundary = min(len(leading_tokens(tokenizer, prompt, max_length)), len(input_ids))
    labels = [IGNORE_INDEX] * boundary + input_ids[boundary:]
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


_LONGEST_TOKEN: dict[tuple[int, int], int] = {}


def longest_token(tokenizer) -> int:
    """The most characters one token of `tokenizer` stands for: its longest vocabulary string
    (byte-level and SentencePiece spellings are never shorter than the text they cover)."""
    key = (id(tokenizer), len(tokenizer))
    if key not in _LONGEST_TOKEN:
        _LONGEST_TOKEN[key] = max((len(t) for t in tokenizer.get_vocab()), default=1) or 1
    return _LONGEST_TOKEN[key]


def text_cap(tokenizer, tokens: int) -> int:
    """A length in characters past which a text certainly holds more than `tokens` tokens, with
    room to spare (4x, for normalizers that merge characters)."""
    return 4 * longest_token(tokenizer) * (tokens + 1) + 1024


def leading_tokens(tokenizer, text: str, tokens: int) -> list[int]:
    """The token ids of `text`, of which only the first `tokens` are needed: a text too long
    to matter is tokenized only up to `text_cap` characters (a 30 MB record costs what a
    record of that cap costs), and the result holds at least `tokens + 1` ids when the text
    has more than `tokens`. Tokens well before the cut are those of the whole text."""
    cap = text_cap(tokenizer, tokens)
    if len(text) > cap:
        ids = list(tokenizer(text[:cap])["input_ids"])
        if len(ids) > tokens:
            return ids
    return list(tokenizer(text)["input_ids"])


def has_answer(tokens: dict[str, list[int]]) -> bool:
    """Whether any label is trained on (truncation can cut the whole answer off)."""
    return any(label != IGNORE_INDEX for label in tokens["labels"])


def load_tokenized(
    path: str | Path,
    tokenizer,
    prompt_format: str = "tulu",
    max_length: int = 2048,
    limit: int | None = None,
) -> list[dict[str, list[int]]]:
    """Read a JSONL file and tokenize every example (kept even when truncation removed the answer)."""
    _prompt_format(prompt_format)  # fail on a bad name before reading the file
    return [
        tokenize_example(ex, tokenizer, prompt_format, max_length)
        for ex in read_examples(path, limit=limit)
    ]


def file_digest(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes, recorded as provenance of the data a run used."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
