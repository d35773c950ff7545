"""Vocabulary alignment: which teacher token each student token is, so embed and head transfer.

Student tokens are matched to teacher tokens by their strings: first the token string exactly
as the vocabulary spells it; then its normalized form, the bytes it stands for (leading-space
markers `Ġ` and `▁` both mean a space, byte-level BPE alphabets are decoded, SentencePiece
byte-fallback tokens `<0xNN>` are the byte); last, the special tokens by their role (the
student's EOS is the teacher's EOS). Teacher rows are gathered into the student's vocabulary
order; a student token with no match gets a zero row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import torch

BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
SPACE_MARKERS = ("Ġ", "▁")
SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")
#: How many unmatched student tokens `transfer.json` lists, as examples.
UNMATCHED_EXAMPLES = 20


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (the inverse of `bytes_to_unicode`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def normalized_form(token: str, byte_level: bool) -> bytes:
    """The bytes a vocabulary entry stands for, whatever the tokenizer's conventions."""
    m = BYTE_FALLBACK.fullmatch(token)
    if m:
        return bytes([int(m.group(1), 16)])
    if byte_level:
        table = byte_decoder()
        if all(c in table for c in token):
            return bytes(table[c] for c in token)
    if token[:1] in SPACE_MARKERS:
        token = " " + token[1:]
    return token.replace("▁", " ").encode("utf-8")


def is_byte_level(tokenizer) -> bool:
    """Whether the tokenizer spells bytes in GPT-2's byte-level alphabet (`Ġ` = space)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    for part in (backend.decoder, backend.pre_tokenizer):
        if part is None:
            continue
        try:
            state = json.loads(part.__getstate__())
        except (AttributeError, TypeError, ValueError):
            continue
        if '"ByteLevel"' in json.dumps(state):
            return True
    return False


@dataclass(frozen=True)
class VocabAlignment:
    """For every student embedding row, the teacher row it takes (-1: none, a zero row)."""

    teacher_ids: torch.Tensor  # int64 [student rows]
    student_vocab_size: int  # tokens of the student's vocabulary (the coverage denominator)
    teacher_vocab_size: int
    counts: dict[str, int] = field(default_factory=dict)  # matches per method
    unmatched: list[str] = field(default_factory=list)  # some unmatched student tokens
    identical: bool = False

    @property
    def matched(self) -> int:
        return sum(self.counts.values())

    @property
    def coverage(self) -> float:
        """Matched student tokens / student vocabulary size."""
        return self.matched / self.student_vocab_size if self.student_vocab_size else 0.0

    def is_identity(self, teacher_rows: int) -> bool:
        """Whether gathering would return the teacher's matrix unchanged."""
        return self.identical and len(self.teacher_ids) == teacher_rows

    def gather(self, matrix: torch.Tensor, dim: int) -> torch.Tensor:
        """Teacher rows (dim 0) or columns (dim 1) in student vocabulary order; zeros unmatched."""
        if self.is_identity(matrix.shape[dim]):
            return matrix
        ids = self.teacher_ids
        out = matrix.index_select(dim, ids.clamp(min=0))
        missing = (ids < 0).nonzero().flatten()
        if len(missing):
            out.index_fill_(dim, missing, 0)
        return out

    def report(self) -> dict:
        """What transfer.json says about the alignment."""
        return {
            "student_vocab_size": self.student_vocab_size,
            "teacher_vocab_size": self.teacher_vocab_size,
            "student_rows": len(self.teacher_ids),
            "matched": self.matched,
            "coverage": round(self.coverage, 6),
            "matched_by": dict(self.counts),
            "identical": self.identical,
            "unmatched_examples": list(self.unmatched),
        }


def identity_alignment(rows: int) -> VocabAlignment:
    """Teacher and student share one vocabulary: row i is row i."""
    return VocabAlignment(torch.arange(rows, dtype=torch.int64), rows, rows,
                          counts={"identical": rows}, identical=True)


def align_vocabularies(teacher_tokenizer, student_tokenizer, teacher_rows: int | None = None,
                       student_rows: int | None = None) -> VocabAlignment:
    """Match every student token to a teacher token (see the module docstring).

    `teacher_rows` / `student_rows` are the embedding matrices' row counts (default: the
    vocabulary sizes); ids at or beyond them take part in no match.
    """
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    t_rows = teacher_rows if teacher_rows is not None else max(t_vocab.values(), default=-1) + 1
    s_rows = student_rows if student_rows is not None else max(s_vocab.values(), default=-1) + 1
    if t_vocab == s_vocab and t_rows == s_rows:
        return identity_alignment(s_rows)
    return align_vocab_maps(
        t_vocab, s_vocab, t_rows, s_rows,
        teacher_byte_level=is_byte_level(teacher_tokenizer),
        student_byte_level=is_byte_level(student_tokenizer),
        teacher_special=_special_tokens(teacher_tokenizer),
        student_special=_special_tokens(student_tokenizer),
    )


def _special_tokens(tokenizer) -> dict[str, str]:
    out = {}
    for role in SPECIAL_ROLES:
        token = getattr(tokenizer, role, None)
        if isinstance(token, str) and token:
            out[role] = token
    return out


def align_vocab_maps(teacher_vocab: Mapping[str, int], student_vocab: Mapping[str, int],
                     teacher_rows: int, student_rows: int, *, teacher_byte_level: bool = False,
                     student_byte_level: bool = False,
                     teacher_special: Mapping[str, str] | None = None,
                     student_special: Mapping[str, str] | None = None) -> VocabAlignment:
    """`align_vocabularies` on plain token -> id maps (what a tokenizer's `get_vocab` gives)."""
    teacher = {tok: i for tok, i in teacher_vocab.items() if 0 <= i < teacher_rows}
    # Normalized form -> teacher id: ordinary tokens before byte-fallback ones, lower ids first.
    by_form: dict[bytes, int] = {}
    for tok, i in sorted(teacher.items(), key=lambda kv: (bool(BYTE_FALLBACK.fullmatch(kv[0])), kv[1])):
        by_form.setdefault(normalized_form(tok, teacher_byte_level), i)
    ids = [-1] * student_rows
    counts = {"exact": 0, "normalized": 0, "special": 0}
    students = sorted((i, tok) for tok, i in student_vocab.items() if 0 <= i < student_rows)
    for i, tok in students:
        if tok in teacher:
            ids[i] = teacher[tok]
            counts["exact"] += 1
            continue
        form = normalized_form(tok, student_byte_level)
        if form in by_form:
            ids[i] = by_form[form]
            counts["normalized"] += 1
    for role, s_tok in (student_special or {}).items():
        t_tok = (teacher_special or {}).get(role)
        i = student_vocab.get(s_tok)
        if t_tok in teacher and i is not None and 0 <= i < student_rows and ids[i] < 0:
            ids[i] = teacher[t_tok]
            counts["special"] += 1
    unmatched = [tok for i, tok in students if ids[i] < 0][:UNMATCHED_EXAMPLES]
    return VocabAlignment(torch.tensor(ids, dtype=torch.int64), len(students), len(teacher),
                          counts, unmatched)
