"""The model loop every task shares: batched greedy generation and choice log-likelihoods.

Prompts are tokenized with the tokenizer's defaults, exactly as training tokenizes them
(docs/method.md §1, step 3). Batches are cut from the prompts sorted by length, longest
first (little padding, and a batch too big for memory fails at once); results come back in the
input order. Generation pads on the left, so every prompt ends where the new tokens start, and
passes the attention mask (from which `generate` also derives positions), so a prompt's output
does not depend on its batch-mates. Likelihood scoring pads on the right, where padding cannot
reach the scored positions of a causal model.

What batching guarantees. Batched and one-at-a-time runs compute each position's logits from
the same weights with differently shaped kernels, so they agree to the rounding of the dtype,
not bit for bit (5e-7 apart in fp32 on some CPUs, equal on others). Choice log-probabilities
therefore agree within that tolerance, and the greedy token is the same unless the two best
logits are within it of each other (a near tie). At a near tie the two runs may pick different
tokens, and from there their continuations differ; a benchmark counts such divergences.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from paratransfer.io.errors import UserError


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text with the tokenizer's defaults (its own BOS, as in training)."""
    return [list(tokenizer(text)["input_ids"]) for text in texts]


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first; ties keep input order."""
    if batch_size < 1:
        raise UserError(f"--batch-size: must be at least 1 (got {batch_size})")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends an answer: the tokenizer's EOS and the model's generation EOS(es)."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    if not ids:
        raise UserError("the tokenizer and the model define no EOS token (expected one to stop at)")
    return sorted(ids)


def pad_token_id(tokenizer, eos_ids: Sequence[int]) -> int:
    """The tokenizer's pad token, else the first EOS (what pads is masked out anyway)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if isinstance(pad, int) else eos_ids[0]


def cut_at_eos(tokens: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """The generated tokens before the first EOS (what follows it in a batch is padding)."""
    eos = set(eos_ids)
    for i, t in enumerate(tokens):
        if t in eos:
            return list(tokens[:i])
    return list(tokens)


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of sequences padded to one length on the given side."""
    width = max(len(s) for s in seqs)
    ids, mask = [], []
    for s in seqs:
        fill = width - len(s)
        if side == "left":
            ids.append([pad_id] * fill + list(s))
            mask.append([0] * fill + [1] * len(s))
        else:
            ids.append(list(s) + [pad_id] * fill)
            mask.append([1] * len(s) + [0] * fill)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _progress(total: int, enabled: bool, desc: str):
    from paratransfer.io.console import progress as progress_bar

    return progress_bar(total=total, desc=desc, unit="ex", enabled=enabled)


# --------------------------------------------------------------------------- generation


def greedy_config(model, tokenizer, max_new_tokens: int):
    """A GenerationConfig for plain greedy decoding, whatever the model's own config asks for.

    `generate` fills every field left unset from the model's generation_config (which may ask
    for sampling, repetition penalties, ...); the fields here pin greedy decoding down.
    """
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: must be at least 1 (got {max_new_tokens})")
    eos = eos_token_ids(model, tokenizer)
    return GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
        repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=eos,
        pad_token_id=pad_token_id(tokenizer, eos),
    )


def greedy_token_ids(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                     batch_size: int = 16, progress: bool = False,
                     desc: str = "generate") -> list[list[int]]:
    """Each prompt's greedy continuation as token ids, up to (without) EOS or `max_new_tokens`."""
    config = greedy_config(model, tokenizer, max_new_tokens)
    eos = list(config.eos_token_id)
    encoded = encode(tokenizer, prompts)
    tokens: list[list[int]] = [[] for _ in prompts]
    device = _device(model)
    with _progress(len(prompts), progress, desc) as bar, torch.inference_mode():
        for batch in length_batches([len(e) for e in encoded], batch_size):
            ids, mask = pad([encoded[i] for i in batch], config.pad_token_id, "left")
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=config)
            for i, row in zip(batch, out[:, ids.shape[1]:].tolist(), strict=True):
                tokens[i] = cut_at_eos(row, eos)
            bar.update(len(batch))
    return tokens


def generate_greedy(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                    batch_size: int = 16, progress: bool = False,
                    desc: str = "generate") -> list[str]:
    """Each prompt's greedy continuation up to EOS or `max_new_tokens`, decoded without specials."""
    return [tokenizer.decode(ids, skip_special_tokens=True)
            for ids in greedy_token_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size, progress=progress, desc=desc)]


# --------------------------------------------------------------------------- choice likelihoods


def continuation_ids(tokenizer, prompt: str, prompt_ids: Sequence[int], continuation: str) -> list[int]:
    """The tokens `continuation` adds after `prompt`, as training tokenizes prompt + answer.

    Taken from the tokenization of the joined text (so "The answer is: C" and " C" after
    "The answer is:" are the same tokens); when the join changes the prompt's own last
    tokens, the continuation is tokenized on its own instead.
    """
    joined = list(tokenizer(prompt + continuation)["input_ids"])
    n = len(prompt_ids)
    if len(joined) > n and joined[:n] == list(prompt_ids):
        return joined[n:]
    alone = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    if not alone:
        raise UserError(f"choice {continuation!r} has no tokens (expected a non-empty answer)")
    return alone


@dataclass
class _Request:
    """One sequence to run, and per choice the (position, token) pairs whose log-probs add up."""

    ids: list[int]
    targets: list[list[tuple[int, int]]]
    prompt: int  # index of the prompt it answers
    first_choice: int  # index, among the prompt's choices, of targets[0]


def _requests(tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]]) -> list[_Request]:
    """One sequence per prompt when every choice is one token (all read at its last position),
    else one per (prompt, choice)."""
    requests = []
    for p, (prompt, prompt_ids) in enumerate(zip(prompts, encode(tokenizer, prompts), strict=True)):
        conts = [continuation_ids(tokenizer, prompt, prompt_ids, c) for c in choices[p]]
        last = len(prompt_ids) - 1
        if last < 0:
            raise UserError(f"prompt {p} has no tokens (expected text to score choices after)")
        if all(len(c) == 1 for c in conts):
            requests.append(_Request(list(prompt_ids), [[(last, c[0])] for c in conts], p, 0))
            continue
        for j, cont in enumerate(conts):
            ids = list(prompt_ids) + cont
            requests.append(_Request(ids[:-1], [[(last + k, t) for k, t in enumerate(cont)]], p, j))
    return requests


def _selected_logits(model, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Logits at the `keep` positions (bool [batch, seq]), flattened row by row: [n, vocab].

    Asks the model for those positions only when it can (`logits_to_keep` with a mask), which
    spares a [batch, seq, vocab] tensor: gigabytes for few-shot prompts and a 32k vocabulary.
    """
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
        if logits.ndim == 2 and logits.shape[0] == int(keep.sum()):
            return logits
    return model(input_ids=ids, attention_mask=mask).logits[keep]


def choice_logprobs(model, tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]], *,
                    batch_size: int = 16, progress: bool = False,
                    desc: str = "score") -> list[list[float]]:
    """Per prompt, the log-probability of each of its choices as the text that follows it.

    A choice of several tokens scores the sum of their log-probabilities. The likeliest choice
    is the model's answer; no text is generated.
    """
    if len(choices) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(choices)} lists of choices")
    requests = _requests(tokenizer, prompts, choices)
    scores = [[0.0] * len(c) for c in choices]
    pad_id = pad_token_id(tokenizer, eos_token_ids(model, tokenizer))
    device = _device(model)
    with _progress(len(prompts), progress, desc) as bar, torch.inference_mode():
        for batch in length_batches([len(r.ids) for r in requests], batch_size):
            ids, mask = pad([requests[i].ids for i in batch], pad_id, "right")
            keep = torch.zeros_like(mask, dtype=torch.bool)
            for row, i in enumerate(batch):
                for targets in requests[i].targets:
                    for pos, _ in targets:
                        keep[row, pos] = True
            logits = _selected_logits(model, ids.to(device), mask.to(device), keep.to(device))
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            # Rows of `logprobs` are the kept positions in row-major order.
            flat = {(b, pos): n for n, (b, pos) in enumerate(keep.nonzero().tolist())}
            for row, i in enumerate(batch):
                r = requests[i]
                for j, targets in enumerate(r.targets):
                    total = sum(float(logprobs[flat[row, pos], tok]) for pos, tok in targets)
                    scores[r.prompt][r.first_choice + j] = total
            bar.update(sum(1 for i in batch if requests[i].first_choice == 0))
    return scores
