"""Neuron attribution (the "locate" of LaTen): how much one neuron raises the log-probability
of the answer's last token when its contribution is added to the residual stream.

For a seed example whose answer ends with token y, the model reads every token before y and,
at that last position, for decoder layer l:

    h_l   the residual stream entering the layer,  r_l = h_l + o_l (after attention)
    o_l   the attention output, Σ_c x_c · W_o[:, c]  (x: the input of o, c: one column)
    f_l   the MLP output,       Σ_i m_i · W_down[:, i]

    score(o-neuron c)    = log p(y | h_l + x_c W_o[:, c]) − log p(y | h_l)
    score(down-neuron i) = log p(y | r_l + m_i W_down[:, i]) − log p(y | r_l)
    score(attn layer l)  = log p(y | h_l + o_l) − log p(y | h_l)
    score(MLP layer l)   = log p(y | r_l + f_l) − log p(y | r_l)

with p(·|v) = softmax(head(final_norm(v))) (soft-capped where the config says so). An up row i
is the same MLP neuron as down column i; a v row (key/value head g, dimension j) scores the sum
over the query heads that read it. Forward passes only: no gradient, nothing kept per sample
beyond these score vectors.

Families with post-norms (Gemma 2 and 3: the layer adds P_a(o_l) and P_f(f_l), each an RMS norm
of the module's output) get the same scores with each neuron's term taken through its norm at
the layer's own scale: P_o(v) = g ⊙ v / rms(o), with rms(o) = √(mean(o²) + ε) of the whole
output o. The norm is linear in v once that scale is fixed, so the neurons' terms still add up
to exactly what the layer adds to the stream (checked on every example).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from paratransfer.arch.spec import ArchSpec
from paratransfer.io.errors import UserError

#: Vectors pushed through norm + head at once, as elements of the logits (keeps memory bounded
#: for large vocabularies).
_LOGIT_BUDGET = 1 << 22


@dataclass
class Attribution:
    """Summed scores over the examples: per layer, and per neuron of o, down, v and up."""

    attn_layers: torch.Tensor  # [layers] float64
    ffn_layers: torch.Tensor  # [layers]
    neurons: dict[str, torch.Tensor]  # role -> [layers, neurons] float64
    examples: int

    def __add__(self, other: Attribution) -> Attribution:
        return Attribution(self.attn_layers + other.attn_layers,
                           self.ffn_layers + other.ffn_layers,
                           {r: s + other.neurons[r] for r, s in self.neurons.items()},
                           self.examples + other.examples)


def prediction_point(sample: Mapping[str, Sequence[int]], eos_id: int | None) -> tuple[list[int], int]:
    """(tokens read, token predicted): the answer's last token other than EOS, and all before it."""
    ids, labels = list(sample["input_ids"]), list(sample["labels"])
    answer = [t for t, label in enumerate(labels) if label != -100 and t > 0]
    if not answer:
        raise UserError("a seed example has no answer token left after truncation "
                        "(raise --max-length)")
    content = [t for t in answer if ids[t] != eos_id]
    t = (content or answer)[-1]
    return ids[:t], ids[t]


def _layers(model: torch.nn.Module, spec: ArchSpec) -> torch.nn.ModuleList:
    return model.get_submodule(spec.layers)


def _module(layer: torch.nn.Module, spec: ArchSpec, role: str) -> torch.nn.Module:
    module = spec.module_for(role)
    if module is None:
        raise UserError(f"{spec.family}: has no {role} matrix, which LaTen's attribution needs")
    return layer.get_submodule(module.path)


def role_matrix(model: torch.nn.Module, spec: ArchSpec, role: str, layer: int) -> torch.Tensor:
    """The role's `[out, in]` matrix in one decoder layer (split out of a fused module)."""
    module = spec.module_for(role)
    weight = model.get_parameter(module.param_name(spec.layers, layer))
    return spec.split(module, model.config, module.to_linear(weight))[role]


class _Recorder:
    """Forward hooks keeping, at the last position only, what the scores need.

    `y[role, l]` is what the module adds to the stream: its output, or with post-norms the
    norm's output; `gain[role, l]` then maps a neuron's raw term onto that (module docstring).
    """

    def __init__(self, model: torch.nn.Module, spec: ArchSpec):
        self.h: dict[int, torch.Tensor] = {}
        self.x: dict[tuple[str, int], torch.Tensor] = {}
        self.raw: dict[tuple[str, int], torch.Tensor] = {}
        self.y: dict[tuple[str, int], torch.Tensor] = {}
        self.post: dict[tuple[str, int], torch.nn.Module] = {}
        self.final: torch.Tensor | None = None
        self.handles = []
        post_norms = spec.post_norms(model.config)
        for index, layer in enumerate(_layers(model, spec)):
            self.handles.append(layer.register_forward_pre_hook(
                lambda m, args, kwargs, i=index: self._enter(i, args, kwargs), with_kwargs=True))
            for n, role in enumerate(("o", "down")):
                self.handles.append(_module(layer, spec, role).register_forward_hook(
                    lambda m, args, out, i=index, r=role: self._module(r, i, args, out)))
                if post_norms:
                    norm = layer.get_submodule(post_norms[n])
                    self.post[role, index] = norm
                    self.handles.append(norm.register_forward_hook(
                        lambda m, args, out, i=index, r=role: self._normed(r, i, out)))
        if not spec.final_norm:
            raise UserError(f"{spec.family}: its final norm is not declared (arch/families.py), "
                            "which LaTen's attribution needs")
        self.norm = model.get_submodule(spec.final_norm)
        self.softcap = float(getattr(model.config, "final_logit_softcapping", None) or 0.0)
        self.handles.append(self.norm.register_forward_pre_hook(
            lambda m, args: setattr(self, "final", args[0][0, -1].detach())))

    def _enter(self, index: int, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.h[index] = hidden[0, -1].detach()

    def _module(self, role: str, index: int, args, out) -> None:
        out = out[0] if isinstance(out, tuple) else out
        self.x[role, index] = args[0][0, -1].detach()
        self.raw[role, index] = out[0, -1].detach()
        if (role, index) not in self.post:
            self.y[role, index] = self.raw[role, index]

    def _normed(self, role: str, index: int, out) -> None:
        self.y[role, index] = out[0, -1].detach()

    def gain(self, role: str, index: int) -> torch.Tensor | None:
        """g / rms(raw output), the post-norm's map at this layer's scale (None: no post-norm).

        The gain g is the norm's output for a vector of ones times √(1 + ε); an RMS norm
        `v · rsqrt(mean(v²) + ε) · g` is the only kind this is exact for, which the residual
        check then confirms.
        """
        norm = self.post.get((role, index))
        if norm is None:
            return None
        eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
        raw = self.raw[role, index].float()
        ones = torch.ones(1, raw.shape[-1], dtype=raw.dtype, device=raw.device)
        g = norm.forward(ones)[0].float() * (1.0 + eps) ** 0.5  # forward: not through the hooks
        return g * torch.rsqrt(raw.square().mean() + eps)

    def term(self, role: str, index: int, raw: torch.Tensor) -> torch.Tensor:
        """A part of the module's raw output, as the stream receives it."""
        gain = self.gain(role, index)
        return raw if gain is None else (raw.float() * gain).to(raw.dtype)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _check_residual(rec: _Recorder, layers: int, dtype: torch.dtype, family: str) -> None:
    """The scores assume layer output = input + what attention adds + what the MLP adds, and,
    with post-norms, that each norm is the RMS norm the neurons' terms are mapped through;
    refuse otherwise."""
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for i in range(layers):
        after = rec.h[i + 1] if i + 1 < layers else rec.final
        want = rec.h[i].float() + rec.y["o", i].float() + rec.y["down", i].float()
        scale = float(want.abs().max()) + 1.0
        if float((after.float() - want).abs().max()) > tol * scale:
            raise UserError(f"{family}: layer {i}'s output is not its input plus the attention "
                            "and MLP outputs, so LaTen's neuron attribution does not apply")
        for role in ("o", "down"):
            if (role, i) not in rec.post:
                continue
            mapped = rec.term(role, i, rec.raw[role, i]).float()
            normed = rec.y[role, i].float()
            if float((mapped - normed).abs().max()) > tol * (float(normed.abs().max()) + 1.0):
                raise UserError(f"{family}: layer {i}'s post-norm after {role} is not an RMS "
                                "norm with a gain, so LaTen's neuron attribution does not apply")


def _logprob(rec: _Recorder, head: torch.nn.Module, vectors: torch.Tensor, target: int) -> torch.Tensor:
    """log p(target | v) for each row v, through the final norm and the head (float64 out)."""
    vocab = head.weight.shape[0]
    chunk = max(1, _LOGIT_BUDGET // vocab)
    out = []
    for part in vectors.split(chunk):
        logits = head(rec.norm(part.unsqueeze(0)))[0].float()
        if rec.softcap:
            logits = torch.tanh(logits / rec.softcap) * rec.softcap
        out.append(torch.log_softmax(logits, dim=-1)[:, target].double())
    return torch.cat(out)


def _neuron_scores(rec: _Recorder, head, base: torch.Tensor, x: torch.Tensor,
                   matrix: torch.Tensor, target: int, role: str, layer: int) -> torch.Tensor:
    """score of each column c: log p(y | base + x_c W[:, c]) − log p(y | base), the term taken
    through the post-norm where the family has one."""
    before = _logprob(rec, head, base.unsqueeze(0), target)[0]
    scores = []
    step = max(1, _LOGIT_BUDGET // max(1, head.weight.shape[0]))
    for start in range(0, matrix.shape[1], step):
        cols = matrix[:, start:start + step]
        terms = rec.term(role, layer, (cols * x[start:start + step].unsqueeze(0)).t())
        vectors = base.unsqueeze(0) + terms
        scores.append(_logprob(rec, head, vectors, target) - before)
    return torch.cat(scores)


def _v_scores(o_scores: torch.Tensor, spec: ArchSpec, config, v_rows: int) -> torch.Tensor:
    """A v row's score: the sum of the o columns (query heads) that read it."""
    heads = spec.heads(config)
    if o_scores.shape[-1] != heads.heads * heads.head_dim or v_rows != heads.kv_heads * heads.head_dim:
        raise UserError(f"{spec.family}: o has {o_scores.shape[-1]} input columns and v {v_rows} "
                        f"rows, but the config gives {heads.heads} heads, {heads.kv_heads} "
                        f"key/value heads of width {heads.head_dim}")
    group = heads.heads // heads.kv_heads
    per = o_scores.reshape(*o_scores.shape[:-1], heads.kv_heads, group, heads.head_dim)
    return per.sum(dim=-2).reshape(*o_scores.shape[:-1], v_rows)


@torch.no_grad()
def attribute_one(model: torch.nn.Module, spec: ArchSpec, sample: Mapping[str, Sequence[int]],
                  eos_id: int | None) -> Attribution:
    """The scores of one seed example (docstring of this module)."""
    tokens, target = prediction_point(sample, eos_id)
    layers = len(_layers(model, spec))
    head = model.get_output_embeddings()
    device = model.get_input_embeddings().weight.device
    rec = _Recorder(model, spec)
    try:
        model(input_ids=torch.tensor([tokens], device=device), use_cache=False)
        _check_residual(rec, layers, head.weight.dtype, spec.family)
        attn = torch.zeros(layers, dtype=torch.float64)
        ffn = torch.zeros(layers, dtype=torch.float64)
        per_role: dict[str, list[torch.Tensor]] = {"o": [], "down": []}
        for i in range(layers):
            h, o_out, f_out = rec.h[i], rec.y["o", i], rec.y["down", i]
            r = h + o_out
            pair = _logprob(rec, head, torch.stack([h, r, r + f_out]), target)
            attn[i], ffn[i] = pair[1] - pair[0], pair[2] - pair[1]
            per_role["o"].append(_neuron_scores(rec, head, h, rec.x["o", i],
                                                role_matrix(model, spec, "o", i), target, "o", i))
            per_role["down"].append(_neuron_scores(rec, head, r, rec.x["down", i],
                                                   role_matrix(model, spec, "down", i), target,
                                                   "down", i))
    finally:
        rec.close()
    neurons = {role: torch.stack(rows).cpu() for role, rows in per_role.items()}
    neurons["up"] = neurons["down"].clone()
    v_rows = role_matrix(model, spec, "v", 0).shape[0]
    neurons["v"] = _v_scores(neurons["o"], spec, model.config, v_rows)
    return Attribution(attn, ffn, neurons, 1)


def attribute(model: torch.nn.Module, spec: ArchSpec, samples: Iterable[Mapping[str, Sequence[int]]],
              eos_id: int | None) -> Attribution:
    """The scores summed over several examples."""
    total = None
    for sample in samples:
        one = attribute_one(model, spec, sample, eos_id)
        total = one if total is None else total + one
    if total is None:
        raise UserError("LaTen's attribution needs at least one seed example")
    return total
