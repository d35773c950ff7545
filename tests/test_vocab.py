"""Vocabulary alignment (paratransfer.extract.vocab): every shared token of a constructed pair of
tokenizers maps to the right teacher token, and the coverage figure is right."""

from __future__ import annotations

import pytest
import torch

from paratransfer.demo.tiny import char_tokenizer, marker_tokenizer
from paratransfer.extract.vocab import (
    align_vocab_maps,
    align_vocabularies,
    byte_decoder,
    is_byte_level,
    normalized_form,
)


def byte_level_tokenizer(tokens: list[str]):
    """GPT-2 style: byte-level alphabet (`Ġ` = space, `Ċ` = newline), one special token that is
    BOS, EOS and UNK at once."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def sentencepiece_like_tokenizer(tokens: list[str]):
    """Llama-2 style: `▁` = space, byte-fallback tokens `<0xNN>`, `<s>` / `</s>` / `<unk>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


TEACHER_TOKENS = ["<|endoftext|>", "the", "Ġthe", "Ġ", "Ċ", "a", "Ġa", "Ã©", "Ã", "hello",
                  "Ġx", "▁x", "!", "Ġworld", "only-teacher"]
STUDENT_TOKENS = ["<unk>", "<s>", "</s>", "the", "▁the", "▁", "<0x0A>", "a", "▁a", "é",
                  "<0xC3>", "▁x", "hello", "▁hello", "xyz", "!", "▁world", "<0x21>"]

#: Student token -> the teacher token it must map to (None: no match), and how.
EXPECTED = {
    "<unk>": ("<|endoftext|>", "special"),  # the teacher's UNK (GPT-2: one token for all three)
    "<s>": ("<|endoftext|>", "special"),
    "</s>": ("<|endoftext|>", "special"),
    "the": ("the", "exact"),
    "▁the": ("Ġthe", "normalized"),  # both are " the"
    "▁": ("Ġ", "normalized"),
    "<0x0A>": ("Ċ", "normalized"),  # byte fallback 0x0A = byte-level newline
    "a": ("a", "exact"),
    "▁a": ("Ġa", "normalized"),
    "é": ("Ã©", "normalized"),  # UTF-8 c3 a9, spelled in the byte-level alphabet
    "<0xC3>": ("Ã", "normalized"),  # a lone byte
    "▁x": ("▁x", "exact"),  # the exact spelling wins over "Ġx", which is also " x"
    "hello": ("hello", "exact"),
    "▁hello": (None, None),  # the teacher has "hello" but not " hello"
    "xyz": (None, None),
    "!": ("!", "exact"),
    "▁world": ("Ġworld", "normalized"),
    "<0x21>": ("!", "normalized"),  # byte fallback for "!" (the student's "!" matched exactly)
}


@pytest.fixture(scope="module")
def pair():
    return byte_level_tokenizer(TEACHER_TOKENS), sentencepiece_like_tokenizer(STUDENT_TOKENS)


def test_every_token_maps_as_expected_and_coverage_is_right(pair):
    teacher, student = pair
    assert set(EXPECTED) == set(STUDENT_TOKENS)
    alignment = align_vocabularies(teacher, student)
    t_vocab, s_vocab = teacher.get_vocab(), student.get_vocab()
    for tok, (want, _) in EXPECTED.items():
        got = int(alignment.teacher_ids[s_vocab[tok]])
        assert got == (t_vocab[want] if want is not None else -1), tok
    by = {}
    for _, how in EXPECTED.values():
        if how:
            by[how] = by.get(how, 0) + 1
    assert alignment.counts == by
    matched = sum(1 for want, _ in EXPECTED.values() if want is not None)
    assert alignment.matched == matched == 16
    assert alignment.student_vocab_size == len(STUDENT_TOKENS)
    assert alignment.coverage == pytest.approx(16 / 18)
    report = alignment.report()
    assert report["coverage"] == pytest.approx(16 / 18, abs=1e-6)
    assert set(report["unmatched_examples"]) == {"▁hello", "xyz"}


def test_gather_puts_teacher_rows_in_student_order_with_zero_rows_unmatched(pair):
    teacher, student = pair
    alignment = align_vocabularies(teacher, student)
    head = torch.arange(len(TEACHER_TOKENS) * 3, dtype=torch.float32).reshape(-1, 3) + 1
    rows = alignment.gather(head, 0)  # lm_head [vocab, d]
    cols = alignment.gather(head.T, 1)  # embedding handled as [d, vocab]
    t_vocab, s_vocab = teacher.get_vocab(), student.get_vocab()
    for tok, (want, _) in EXPECTED.items():
        expect = head[t_vocab[want]] if want is not None else torch.zeros(3)
        assert torch.equal(rows[s_vocab[tok]], expect), tok
        assert torch.equal(cols[:, s_vocab[tok]], expect), tok


def test_embedding_rows_beyond_the_tokenizers_take_part_in_no_match(pair):
    teacher, student = pair
    # student embedding padded with 4 rows; the teacher's matrix lacks its last token's row
    alignment = align_vocabularies(teacher, student, teacher_rows=len(TEACHER_TOKENS) - 1,
                                   student_rows=len(STUDENT_TOKENS) + 4)
    assert alignment.teacher_ids.shape == (len(STUDENT_TOKENS) + 4,)
    assert (alignment.teacher_ids[-4:] == -1).all()
    assert alignment.student_vocab_size == len(STUDENT_TOKENS)
    assert alignment.teacher_vocab_size == len(TEACHER_TOKENS) - 1
    assert int(alignment.teacher_ids.max()) < len(TEACHER_TOKENS) - 1


def test_identical_vocabularies_are_the_identity():
    alignment = align_vocabularies(char_tokenizer(), char_tokenizer())
    assert alignment.identical and alignment.coverage == 1.0
    m = torch.randn(5, len(alignment.teacher_ids))
    assert alignment.gather(m, 1) is m


def test_normalized_forms():
    assert normalized_form("Ġthe", byte_level=True) == b" the"
    assert normalized_form("Ġthe", byte_level=False) == b" the"
    assert normalized_form("▁the", byte_level=False) == b" the"
    assert normalized_form("▁▁", byte_level=False) == b"  "
    assert normalized_form("<0x0A>", byte_level=False) == b"\n"
    assert normalized_form("Ċ", byte_level=True) == b"\n"
    assert normalized_form("Ċ", byte_level=False) == "Ċ".encode()  # only byte-level means bytes
    assert normalized_form("é", byte_level=False) == "é".encode()
    assert normalized_form("Ã©", byte_level=True) == "é".encode()
    assert sorted(byte_decoder().values()) == list(range(256))


def test_byte_level_detection(pair):
    teacher, student = pair
    assert is_byte_level(teacher) and not is_byte_level(student)
    assert not is_byte_level(char_tokenizer()) and not is_byte_level(marker_tokenizer(marker="Ġ"))


def test_the_char_and_marker_test_tokenizers_share_most_tokens():
    """The pair the cross-family tests use: `▁`-marked pieces are the student's extra tokens."""
    alignment = align_vocabularies(char_tokenizer(), marker_tokenizer(marked="ab", words=("the",)))
    assert alignment.coverage > 0.9
    assert set(alignment.unmatched) == {"▁a", "▁b", "▁the"}


def test_normalized_matches_prefer_ordinary_teacher_tokens_to_byte_fallback():
    # "Ġ" is a space; so are the teacher's "<0x20>" (id 0) and "▁" (id 1): the ordinary one wins
    alignment = align_vocab_maps({"<0x20>": 0, "▁": 1}, {"Ġ": 0, "<0x20>": 1, "q": 2}, 2, 3)
    assert alignment.teacher_ids.tolist() == [1, 0, -1]
    assert alignment.counts == {"exact": 1, "normalized": 1, "special": 0}
