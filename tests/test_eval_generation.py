"""The shared model loop: batched greedy generation (left padding + attention mask) gives what
one-at-a-time generation gives, and choice log-likelihoods are what the model's logits say."""

from __future__ import annotations

import pytest
import torch

from paratransfer.demo.tiny import tiny_model
from paratransfer.evaluate.generation import (
    choice_logprobs,
    continuation_ids,
    cut_at_eos,
    eos_token_ids,
    generate_greedy,
    greedy_token_ids,
    length_batches,
)
from tolerances import assert_floats_close, decisive_margin

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


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (one ending early counts), or None."""
    for k in range(max(len(a), len(b))):
        if k >= len(a) or k >= len(b) or a[k] != b[k]:
            return k
    return None


@pytest.mark.parametrize("batch_size", [len(PROMPTS), 3])
def test_batched_generation_agrees_with_one_at_a_time_up_to_near_ties(model, tokenizer, batch_size):
    """Same greedy tokens, except after a near tie of the two best logits (the documented
    guarantee: logits agree to fp32 rounding, not bit for bit)."""
    eos = eos_token_ids(model, tokenizer)[0]
    single = [greedy_token_ids(model, tokenizer, [p], max_new_tokens=12, batch_size=1)[0]
              for p in PROMPTS]
    batched = greedy_token_ids(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=batch_size)
    agree = 0
    for prompt, one, many in zip(PROMPTS, single, batched, strict=True):
        k = first_divergence(one, many)
        if k is None:
            agree += 1
            continue
        if k == 12:  # both ran out of budget at different lengths: impossible without a stop
            raise AssertionError(f"{prompt!r}: {one} vs {many}")
        ids = torch.tensor([tokenizer(prompt)["input_ids"] + one[:k]])
        with torch.no_grad():
            logits = model(ids).logits[0, -1].double()
        picked = [one[k] if k < len(one) else eos, many[k] if k < len(many) else eos]
        assert not decisive_margin([float(logits[picked[0]]), float(logits[picked[1]]), -1e30]), (
            f"{prompt!r}: batched generation chose {picked[1]} over {picked[0]} at step {k} "
            "although the two logits are not a near tie")
    assert agree >= len(PROMPTS) - 1  # divergences are rare; most outputs are the same
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in single]
    assert len(set(texts)) > 1 and all(texts)  # real, prompt-dependent outputs
    assert max(len(t) for t in single) <= 12
    assert generate_greedy(model, tokenizer, PROMPTS[:2], max_new_tokens=12, batch_size=1) == texts[:2]


def test_choice_logprobs_are_the_models_next_token_logprobs(model, tokenizer):
    choices = [("A", "B", "C", "D")] * len(PROMPTS)
    batched = choice_logprobs(model, tokenizer, PROMPTS, choices, batch_size=4)
    letter_ids = [tokenizer.convert_tokens_to_ids(c) for c in "ABCD"]
    for prompt, got in zip(PROMPTS, batched, strict=True):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            expected = torch.log_softmax(model(ids).logits[0, -1].float(), -1)[letter_ids]
        assert_floats_close(got, expected.tolist())
    one_by_one = [choice_logprobs(model, tokenizer, [p], choices[:1], batch_size=1)[0] for p in PROMPTS]
    for a, b in zip(batched, one_by_one, strict=True):
        assert_floats_close(a, b)  # other batch shapes: equal to fp32 rounding


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
