"""The shared model loop: batched greedy generation (left padding + attention mask) gives what
one-at-a-time generation gives, and choice log-likelihoods are what the model's logits say."""

from __future__ import annotations

import pytest
import torch

from paratransfer.evaluate.generation import (
    choice_logprobs,
    continuation_ids,
    cut_at_eos,
    generate_greedy,
    length_batches,
)
from paratransfer.tiny import tiny_model

PROMPTS = [
    "<|user|>\nWhat is 2 plus 3?\n\n<|assistant|>\n",
    "<|user|>\nHi\n\n<|assistant|>\n",
    "<|user|>\nA much longer question about several apples, pears and plums in a basket?\n\n<|assistant|>\n",
    "<|user|>\nName a colour.\n\n<|assistant|>\n",
    "<|user|>\nCount: 1, 2, 3\n\n<|assistant|>\n",
    "<|user|>\nx\n\n<|assistant|>\nThe answer is:",
    "<|user|>\nWrite the word in capitals: stone\n\n<|assistant|>\n",
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tokenizer):
    """Random tiny models: Llama (rotary positions) and GPT-2 (learned absolute positions)."""
    return tiny_model(request.param, vocab=len(tokenizer), hidden=32, layers=2, heads=4, seed=5)


def test_batched_generation_equals_one_at_a_time(model, tokenizer):
    single = [generate_greedy(model, tokenizer, [p], max_new_tokens=12, batch_size=1)[0]
              for p in PROMPTS]
    batched = generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=len(PROMPTS))
    in_threes = generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3)
    assert batched == single == in_threes
    assert len(set(single)) > 1 and all(single)  # real, prompt-dependent outputs
    assert max(len(tokenizer(s)["input_ids"]) for s in single) <= 12


def test_choice_logprobs_are_the_models_next_token_logprobs(model, tokenizer):
    choices = [("A", "B", "C", "D")] * len(PROMPTS)
    batched = choice_logprobs(model, tokenizer, PROMPTS, choices, batch_size=4)
    letter_ids = [tokenizer.convert_tokens_to_ids(c) for c in "ABCD"]
    for prompt, got in zip(PROMPTS, batched, strict=True):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            expected = torch.log_softmax(model(ids).logits[0, -1].float(), -1)[letter_ids]
        assert got == pytest.approx(expected.tolist(), abs=1e-5)
    one_by_one = [choice_logprobs(model, tokenizer, [p], choices[:1], batch_size=1)[0] for p in PROMPTS]
    for a, b in zip(batched, one_by_one, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_multi_token_choices_sum_their_tokens(model, tokenizer):
    prompt = PROMPTS[0]
    got = choice_logprobs(model, tokenizer, [prompt], [("5", "five", "A")], batch_size=8)[0]
    for choice, value in zip(("5", "five", "A"), got, strict=True):
        ids = tokenizer(prompt + choice)["input_ids"]
        n = len(tokenizer(prompt)["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        expected = sum(float(logp[i - 1, ids[i]]) for i in range(n, len(ids)))
        assert value == pytest.approx(expected, abs=1e-4)


def test_continuation_tokens_follow_training_tokenization(tokenizer):
    prompt = "<|assistant|>\nThe answer is:"
    ids = tokenizer(prompt)["input_ids"]
    assert continuation_ids(tokenizer, prompt, ids, " C") == tokenizer(" C", add_special_tokens=False)["input_ids"]


def test_cut_at_eos_and_batches():
    assert cut_at_eos([5, 6, 3, 1, 1], [3]) == [5, 6]
    assert cut_at_eos([5, 6], [3]) == [5, 6]
    assert cut_at_eos([9, 5, 7], [7, 9]) == []
    assert length_batches([2, 5, 3, 5, 1], 2) == [[1, 3], [2, 0], [4]]
