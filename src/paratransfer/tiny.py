"""Tiny models and tokenizers built offline, for tests, benchmarks and the built-in demo.

Nothing here downloads: models come from config classes with fixed seeds, tokenizers from a
character vocabulary.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

#: Characters every built-in tokenizer knows, so the seed sets in ../shared/data tokenize too
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


CONFIG_BUILDERS = {
    "llama": _llama_config,
    "qwen2": _qwen2_config,
    "mistral": _mistral_config,
    "gpt2": _gpt2_config,
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
):
    """A randomly initialised causal LM of the given family, deterministic for a seed."""
    from transformers import AutoModelForCausalLM

    if family not in CONFIG_BUILDERS:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(CONFIG_BUILDERS)}")
    config = CONFIG_BUILDERS[family](
        vocab, hidden, layers, heads, kv_heads or heads, mlp or 2 * hidden
    )
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
