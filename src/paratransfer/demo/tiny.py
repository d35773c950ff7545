"""Tiny models and tokenizers built offline, for tests, benchmarks and the built-in demo.

Nothing here downloads: models come from config classes with fixed seeds, tokenizers from a
character vocabulary.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

#: Characters every built-in tokenizer knows, so real task text (GSM, MMLU, ...) tokenizes too
#: (unknown characters map to <unk>).
DEFAULT_ALPHABET = string.printable + "’“”—–…€£°×÷"
SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]


def char_tokenizer(alphabet: str = DEFAULT_ALPHABET):
    """A character-level fast tokenizer: one token per character, `</s>` as EOS.

    Character tokens make the prompt/answer boundary unambiguous, which tests rely on.
    The chat markers of the prompt format are single tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(alphabet))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    return fast


#: Special tokens of `marker_tokenizer`: another naming than `char_tokenizer`'s for BOS/EOS.
MARKER_SPECIAL_TOKENS = ["<unk>", "<pad>", "<|begin|>", "<|endoftext|>", "<|user|>",
                         "<|assistant|>", "<|system|>"]


def marker_tokenizer(
    alphabet: str = DEFAULT_ALPHABET,
    *,
    marker: str = "▁",
    words: tuple[str, ...] = (),
    marked: str = "",
    byte_tokens: tuple[int, ...] = (),
    extra_tokens: tuple[str, ...] = (),
):
    """A word/character-level tokenizer whose vocabulary overlaps `char_tokenizer`'s.

    Spaces become `marker` (`▁` like SentencePiece, or `Ġ`), so a space joins the character or
    word after it: `marker + c` for each c in `marked`, `marker + w` for each word. The
    vocabulary also holds the single characters of `alphabet`, SentencePiece-style
    byte-fallback tokens `<0xNN>` for `byte_tokens` and any `extra_tokens`; EOS is
    `<|endoftext|>`. Encoding prefers listed words, then a marked character, then a single
    character (unknown ones map to `<unk>`). Built offline, for vocabulary-alignment tests.
    """
    import re

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(MARKER_SPECIAL_TOKENS)}
    pieces = [*sorted(set(alphabet) - {" "}), marker, *(marker + c for c in marked),
              *(marker + w for w in words), *(f"<0x{b:02X}>" for b in byte_tokens), *extra_tokens]
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    longest_first = sorted((marker + w for w in words), key=len, reverse=True)
    marked_chars = [marker + c for c in sorted(set(marked))]
    pattern = "|".join([*map(re.escape, [*longest_first, *marked_chars]), "[\\s\\S]"])
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", marker)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace(marker, " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<|begin|>",
        eos_token="<|endoftext|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )


def _llama_config(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=False, pad_token_id=1, bos_token_id=2, eos_token_id=3,
    )


def _qwen2_config(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=False, pad_token_id=1, bos_token_id=2, eos_token_id=3,
    )


def _mistral_config(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int):
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=False, pad_token_id=1, bos_token_id=2, eos_token_id=3,
    )


def _gpt2_config(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=mlp,
        n_positions=2048, pad_token_id=1, bos_token_id=2, eos_token_id=3,
        attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
    )


def _gpt_neox_config(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int):
    from transformers import GPTNeoXConfig

    if kv_heads != heads:
        raise ValueError("GPT-NeoX has no grouped-query attention (kv_heads must equal heads)")
    return GPTNeoXConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=2048, tie_word_embeddings=False,
        pad_token_id=1, bos_token_id=2, eos_token_id=3, attention_dropout=0.0,
        hidden_dropout=0.0,
    )


def _phi3_config(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int):
    from transformers import Phi3Config

    # Phi3Config's default pad_token_id (32000) is outside a tiny vocabulary.
    return Phi3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        original_max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=1,
        bos_token_id=2, eos_token_id=3,
    )


def _gemma_config(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int):
    from transformers import GemmaConfig

    # Gemma's default head_dim (256) is far wider than a tiny model; tied head, as released.
    return GemmaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=1, bos_token_id=2,
        eos_token_id=3,
    )


def _gemma2_config(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int):
    from transformers import Gemma2Config

    # Alternating sliding/full attention and both soft-caps, as the released models have them.
    return Gemma2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        query_pre_attn_scalar=hidden // heads, sliding_window=16, max_position_embeddings=2048,
        tie_word_embeddings=True, pad_token_id=1, bos_token_id=2, eos_token_id=3,
    )


def _gemma3_text_config(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int,
                        mlp: int):
    from transformers import Gemma3TextConfig

    # Gemma 3 270M's shape in miniature: q/k norms, scaled embedding, sliding windows with
    # every other layer full attention, tied head.
    return Gemma3TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        query_pre_attn_scalar=hidden // heads, sliding_window=16,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                     for i in range(layers)],
        max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=1, bos_token_id=2,
        eos_token_id=3,
    )


CONFIG_BUILDERS = {
    "llama": _llama_config,
    "qwen2": _qwen2_config,
    "mistral": _mistral_config,
    "gpt2": _gpt2_config,
    "gpt_neox": _gpt_neox_config,
    "phi3": _phi3_config,
    "gemma": _gemma_config,
    "gemma2": _gemma2_config,
    "gemma3_text": _gemma3_text_config,
}


def tiny_model(
    family: str = "llama",
    *,
    vocab: int,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    mlp: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool | None = None,
):
    """A randomly initialised causal LM of the given family, deterministic for a seed.

    `tie_word_embeddings` overrides the family's default (tied: GPT-2, the Gemma families).
    """
    from transformers import AutoModelForCausalLM

    if family not in CONFIG_BUILDERS:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(CONFIG_BUILDERS)}")
    config = CONFIG_BUILDERS[family](
        vocab, hidden, layers, heads, kv_heads or heads, mlp or 2 * hidden
    )
    if tie_word_embeddings is not None:
        config.tie_word_embeddings = tie_word_embeddings
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model


def save_tiny(model, tokenizer, path: str | Path) -> Path:
    """Save a model and its tokenizer as a folder `from_pretrained` loads (safetensors)."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
