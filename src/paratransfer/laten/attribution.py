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

The cost is the head: every o and down neuron's vector goes through it (vocabulary × width
multiply-adds each). When the final norm is an RMS norm with a gain, the head's product with a
neuron's column is the same for every example (`_SharedHead`), so several examples share one
pass and each adds only its own scaling and log-sum-exp; other norms take the direct path.

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
        """g / rms(raw output), the post-norm's map at this layer's scale (None: no post-norm)."""
        parts = self.gain_parts(role, index)
        return None if parts is None else parts[0] * parts[1]

    def gain_parts(self, role: str, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(g, 1 / rms(raw output)): the post-norm's gain, shared by every example, and this
        example's scale (None: no post-norm).

        The gain g is the norm's output for a vector of ones times √(1 + ε); an RMS norm
        `v · rsqrt(mean(v²) + ε) · g` is the only kind this is exact for, which the residual
        check then confirms.
        """
        norm = self.post.get((role, index))
        if norm is None:
            return None
        raw = self.raw[role, index].float()
        g, eps = rms_gain(norm, raw.shape[-1], raw.device)
        return g, torch.rsqrt(raw.square().mean() + eps)

    def term(self, role: str, index: int, raw: torch.Tensor) -> torch.Tensor:
        """A part of the module's raw output, as the stream receives it."""
        gain = self.gain(role, index)
        return raw if gain is None else (raw.float() * gain).to(raw.dtype)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def rms_gain(norm: torch.nn.Module, width: int, device) -> tuple[torch.Tensor, float]:
    """(g, ε) of a norm read as `v · rsqrt(mean(v²) + ε) · g` (float32); callers check that
    the norm is one."""
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
    ones = torch.ones(1, width, dtype=torch.float32, device=device)
    return norm.forward(ones)[0].float() * (1.0 + eps) ** 0.5, eps  # forward: not the hooks


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


class _SharedHead:
    """log p(y | base + a·m) for many columns m and coefficients a at once, the head's product
    shared by every example (exact; used when the final norm is an RMS norm with a gain and
    the head a bias-free linear map, which `of` checks).

    With n(v) = g ⊙ v / ρ(v), ρ(v) = √(mean(v²) + ε), the logits of v = b + a·m are

        H n(v) = (H (g ⊙ b) + a · H (g ⊙ m)) / ρ(v)

    so H (g ⊙ m) — the costly part, vocabulary × width per column — is computed once per
    column and read by every example, which adds only its own coefficients, scales and a
    log-sum-exp (tiled over the vocabulary, so no full logits matrix is held).
    """

    def __init__(self, weight: torch.Tensor, g: torch.Tensor, eps: float, softcap: float):
        self.weight, self.g, self.eps, self.softcap = weight, g, eps, softcap

    @classmethod
    def of(cls, rec: _Recorder, head: torch.nn.Module, probes: torch.Tensor,
           target: int) -> _SharedHead | None:
        """The shared form when it reproduces the model's own norm and head on `probes`
        (vectors the scores start from), else None (the direct path is used)."""
        weight = getattr(head, "weight", None)
        if (not isinstance(head, torch.nn.Linear) or head.bias is not None or weight is None
                or weight.dim() != 2):
            return None
        g, eps = rms_gain(rec.norm, weight.shape[1], weight.device)
        shared = cls(weight, g, eps, rec.softcap)
        tol = 1e-4 if weight.dtype == torch.float32 else 5e-2
        with torch.no_grad():
            normed = rec.norm(probes.unsqueeze(0))[0].float()
            mine = shared.normed(probes.float())
            if float((normed - mine).abs().max()) > tol * (float(normed.abs().max()) + 1.0):
                return None
            direct = _logprob(rec, head, probes, target)
            ours = shared.base_logprob(probes, target)
        if float((direct - ours).abs().max()) > tol * (float(direct.abs().max()) + 1.0):
            return None
        return shared

    def normed(self, v: torch.Tensor) -> torch.Tensor:
        return v * self.g * torch.rsqrt(v.square().mean(-1, keepdim=True) + self.eps)

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        if self.softcap:
            return logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def _chunks(self, columns: int):
        vocab = self.weight.shape[0]
        width = max(1, min(columns, 256))
        return width, max(1, _LOGIT_BUDGET // width), vocab

    def base_logprob(self, bases: torch.Tensor, target: int) -> torch.Tensor:
        """log p(target | b) for each row b (float64)."""
        normed = self.normed(bases.float())
        lse = torch.full((bases.shape[0],), float("-inf"))
        _, step, vocab = self._chunks(bases.shape[0])
        for k in range(0, vocab, step):
            logits = self._cap(normed @ self.weight[k:k + step].float().t())
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1).cpu())
        at = self._cap(normed @ self.weight[target].float()).cpu()
        return (at - lse).double()

    def scores(self, bases: torch.Tensor, coefs: torch.Tensor, columns: torch.Tensor,
               targets: list[int]) -> torch.Tensor:
        """[examples, columns]: log p(y_e | b_e + coef[e, c] · m_c) − log p(y_e | b_e), with
        `columns` the `[width, C]` vectors m_c and `bases` `[examples, width]` (float64)."""
        bases, coefs, columns = bases.float(), coefs.float(), columns.float()
        n, count = coefs.shape
        gm = columns * self.g.unsqueeze(1)  # g ⊙ m_c, [width, C]
        gb = bases * self.g  # g ⊙ b_e, [E, width]
        # 1/ρ(v) for every (example, column): ||b + a m||² = ||b||² + 2a b·m + a²||m||²
        width = bases.shape[1]
        dots, sq = bases @ columns, columns.square().sum(0)
        ms = (bases.square().sum(1, keepdim=True) + 2 * coefs * dots + coefs.square() * sq) / width
        inv = torch.rsqrt(ms.clamp_min(0) + self.eps)  # [E, C]
        rows = self.weight[targets].float()  # H[y_e], [E, width]
        at = (torch.einsum("ed,ed->e", gb, rows).unsqueeze(1)
              + coefs * (rows @ gm)) * inv  # the target's logit, [E, C]
        at = self._cap(at)
        inv0 = torch.rsqrt(bases.square().mean(1) + self.eps)  # the bases alone, [E]
        at0 = self._cap(torch.einsum("ed,ed->e", gb, rows) * inv0)
        lse0 = torch.full((n,), float("-inf"), device=coefs.device)
        lse = torch.full((n, count), float("-inf"), device=coefs.device)
        part, step, vocab = self._chunks(count)
        for k in range(0, vocab, step):
            block = self.weight[k:k + step].float()  # [Vk, width]
            base_logits = gb @ block.t()  # [E, Vk]
            lse0 = torch.logaddexp(lse0, torch.logsumexp(
                self._cap(base_logits * inv0.unsqueeze(1)), dim=-1))
            for c in range(0, count, part):
                shared = gm[:, c:c + part].t() @ block.t()  # H (g ⊙ m), [Cc, Vk]: once
                for e in range(n):
                    logits = torch.addcmul(base_logits[e].unsqueeze(0),
                                           coefs[e, c:c + part].unsqueeze(1), shared)
                    logits = self._cap(logits.mul_(inv[e, c:c + part].unsqueeze(1)))
                    lse[e, c:c + part] = torch.logaddexp(lse[e, c:c + part],
                                                         torch.logsumexp(logits, dim=-1))
        return ((at - lse).double() - (at0 - lse0).double().unsqueeze(1)).cpu()


def _record(model: torch.nn.Module, spec: ArchSpec, sample: Mapping[str, Sequence[int]],
            eos_id: int | None) -> tuple[_Recorder, int]:
    """One forward pass; the recorder (hooks removed) holding what the scores need, and y."""
    tokens, target = prediction_point(sample, eos_id)
    device = model.get_input_embeddings().weight.device
    rec = _Recorder(model, spec)
    try:
        model(input_ids=torch.tensor([tokens], device=device), use_cache=False)
        _check_residual(rec, len(_layers(model, spec)), model.get_output_embeddings().weight.dtype,
                        spec.family)
    finally:
        rec.close()
    return rec, target


def _role_scores(recs: list[tuple[_Recorder, int]], head: torch.nn.Module,
                 bases: list[torch.Tensor], matrix: torch.Tensor, role: str,
                 layer: int) -> list[torch.Tensor]:
    """Every column's score for each example: through the shared head when it applies."""
    rec0, target0 = recs[0]
    shared = _SharedHead.of(rec0, head, torch.stack(bases), target0)
    if shared is not None:
        coefs, columns = [], matrix
        for rec, _ in recs:
            x = rec.x[role, layer]
            parts = rec.gain_parts(role, layer)
            coefs.append(x.float() if parts is None else x.float() * parts[1])
        if parts is not None:  # the post-norm's gain is the same for every example
            columns = matrix.float() * parts[0].unsqueeze(1)
        return list(shared.scores(torch.stack(bases), torch.stack(coefs), columns,
                                  [t for _, t in recs]))
    return [_neuron_scores(rec, head, base, rec.x[role, layer], matrix, target, role, layer)
            for (rec, target), base in zip(recs, bases, strict=True)]


@torch.no_grad()
def attribute_many(model: torch.nn.Module, spec: ArchSpec,
                   samples: Sequence[Mapping[str, Sequence[int]]],
                   eos_id: int | None) -> list[Attribution]:
    """The scores of each example (module docstring): one forward pass each, then per layer
    one pass of the head over every neuron, shared by the examples where the norm allows."""
    if not samples:
        raise UserError("LaTen's attribution needs at least one seed example")
    recs = [_record(model, spec, s, eos_id) for s in samples]
    layers = len(_layers(model, spec))
    head = model.get_output_embeddings()
    attn = torch.zeros(len(recs), layers, dtype=torch.float64)
    ffn = torch.zeros(len(recs), layers, dtype=torch.float64)
    per_role: dict[str, list[list[torch.Tensor]]] = {"o": [], "down": []}
    for i in range(layers):
        hs, rs = [], []
        for e, (rec, target) in enumerate(recs):
            h, o_out, f_out = rec.h[i], rec.y["o", i], rec.y["down", i]
            r = h + o_out
            pair = _logprob(rec, head, torch.stack([h, r, r + f_out]), target)
            attn[e, i], ffn[e, i] = pair[1] - pair[0], pair[2] - pair[1]
            hs.append(h)
            rs.append(r)
        per_role["o"].append(_role_scores(recs, head, hs, role_matrix(model, spec, "o", i),
                                          "o", i))
        per_role["down"].append(_role_scores(recs, head, rs, role_matrix(model, spec, "down", i),
                                             "down", i))
    v_rows = role_matrix(model, spec, "v", 0).shape[0]
    out = []
    for e in range(len(recs)):
        neurons = {role: torch.stack([layer[e] for layer in rows]).cpu()
                   for role, rows in per_role.items()}
        neurons["up"] = neurons["down"].clone()
        neurons["v"] = _v_scores(neurons["o"], spec, model.config, v_rows)
        out.append(Attribution(attn[e], ffn[e], neurons, 1))
    return out


def attribute_one(model: torch.nn.Module, spec: ArchSpec, sample: Mapping[str, Sequence[int]],
                  eos_id: int | None) -> Attribution:
    """The scores of one seed example (docstring of this module)."""
    return attribute_many(model, spec, [sample], eos_id)[0]


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
