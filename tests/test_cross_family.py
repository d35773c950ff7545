"""Transfer across families and tokenizers: tiny random pairs (Qwen2 -> Llama, GPT-NeoX -> GPT-2,
Llama -> Phi-3) with different vocabularies give adapters that load with PEFT, leave the student
unchanged at step 0, and hold exactly the blocks an independent recomputation (its own fused
splits, token matching and brute-force windows) says; plus the odd cases (a role one side lacks,
low vocabulary coverage, zero-padding, a weights source instead of a model) and the head-aware
window's guarantee."""

from __future__ import annotations

import json
import string
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paratransfer.adapter import inject
from paratransfer.arch import ROLES, HeadLayout
from paratransfer.demo.tiny import char_tokenizer, marker_tokenizer, save_tiny, tiny_model
from paratransfer.demo.world import arithmetic_records, write_jsonl
from paratransfer.extract import strategies as align
from paratransfer.extract.plan import ExtractSettings, extract, head_units, reduce_part
from paratransfer.extract.step import run_extract
from paratransfer.io.errors import UserError
from paratransfer.sensitivity.accumulate import SensitivityFile
from paratransfer.sensitivity.step import SensitivitySettings, run_sensitivity
from paratransfer.teacher.models import load_model
from paratransfer.train import TrainSettings, build_lora_model, lora_targets, resolve_settings

RANK, ALPHA, HEAD_DIM = 4, 8.0, 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spm_tokenizer():
    """SentencePiece-like: `▁` marks a space; shares the characters with `char_tokenizer`."""
    return marker_tokenizer(marker="▁", marked=string.ascii_lowercase[:8] + string.digits,
                            words=("the", "answer"), extra_tokens=("α", "β"))


def bpe_tokenizer():
    """`Ġ` marks a space (GPT-2 style)."""
    return marker_tokenizer(marker="Ġ", marked=string.digits, words=("is",))


#: name -> (teacher family, tokenizer, sizes), (student family, tokenizer, sizes, extra rows), reduce.
#: Head width 8 on both sides; the teacher is larger in every dimension.
PAIRS = {
    "qwen2-llama": (("qwen2", char_tokenizer, dict(hidden=48, layers=3, heads=6, kv_heads=3, mlp=80)),
                    ("llama", spm_tokenizer, dict(hidden=32, layers=2, heads=4, kv_heads=2, mlp=64), 3),
                    "window"),
    "gpt_neox-gpt2": (("gpt_neox", bpe_tokenizer, dict(hidden=48, layers=3, heads=6, mlp=96)),
                      ("gpt2", char_tokenizer, dict(hidden=32, layers=2, heads=4, mlp=64), 0),
                      "window"),
    "llama-phi3": (("llama", char_tokenizer, dict(hidden=48, layers=3, heads=6, kv_heads=2, mlp=96)),
                   ("phi3", bpe_tokenizer, dict(hidden=32, layers=2, heads=4, kv_heads=2, mlp=64), 0),
                   "window-heads"),
}


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> dict:
    """name -> dict(teacher, student, adapter, sens, report, reduce) for every pair."""
    root = tmp_path_factory.mktemp("cross")
    seeds = write_jsonl(root / "seeds.jsonl", arithmetic_records(3))
    out = {}
    for i, (name, ((t_fam, t_tok, t_kw), (s_fam, s_tok, s_kw, extra), reduce)) in enumerate(PAIRS.items()):
        t_tok, s_tok = t_tok(), s_tok()
        teacher = save_tiny(tiny_model(t_fam, vocab=len(t_tok), seed=30 + i, **t_kw), t_tok,
                            root / f"{name}-teacher")
        student = save_tiny(tiny_model(s_fam, vocab=len(s_tok) + extra, seed=40 + i, **s_kw),
                            s_tok, root / f"{name}-student")
        sens = root / f"{name}.safetensors"
        run_sensitivity(str(teacher), seeds, sens, SensitivitySettings(), torch.float32,
                        torch.device("cpu"), progress=False)
        adapter = root / f"{name}-adapter"
        report = run_extract(str(teacher), str(student), adapter,
                             ExtractSettings(rank=RANK, alpha=ALPHA, reduce=reduce),
                             sensitivity_path=sens, progress=False)
        out[name] = dict(teacher=teacher, student=student, adapter=adapter, sens=sens,
                         report=report, reduce=reduce, t_tok=t_tok, s_tok=s_tok)
    return out


# --- an independent recomputation: names, fused layouts and token matching written out here ---

NAMES = {
    "llama": {"embed": "model.embed_tokens", "head": "lm_head", "q": "model.layers.{}.self_attn.q_proj",
              "k": "model.layers.{}.self_attn.k_proj", "v": "model.layers.{}.self_attn.v_proj",
              "o": "model.layers.{}.self_attn.o_proj", "gate": "model.layers.{}.mlp.gate_proj",
              "up": "model.layers.{}.mlp.up_proj", "down": "model.layers.{}.mlp.down_proj"},
    "gpt_neox": {"embed": "gpt_neox.embed_in", "head": "lm_head",
                 "qkv": "gpt_neox.layers.{}.attention.query_key_value",
                 "o": "gpt_neox.layers.{}.attention.dense", "up": "gpt_neox.layers.{}.mlp.dense_h_to_4h",
                 "down": "gpt_neox.layers.{}.mlp.dense_4h_to_h"},
    "gpt2": {"embed": "transformer.wte", "qkv": "transformer.h.{}.attn.c_attn",
             "o": "transformer.h.{}.attn.c_proj", "up": "transformer.h.{}.mlp.c_fc",
             "down": "transformer.h.{}.mlp.c_proj"},
    "phi3": {"embed": "model.embed_tokens", "head": "lm_head", "qkv": "model.layers.{}.self_attn.qkv_proj",
             "o": "model.layers.{}.self_attn.o_proj", "gate_up": "model.layers.{}.mlp.gate_up_proj",
             "down": "model.layers.{}.mlp.down_proj"},
}
NAMES["qwen2"] = NAMES["llama"]


def role_matrix(family: str, config, tensors, role: str, layer: int | None) -> np.ndarray:
    """The role's matrix in [out, in] orientation (embedding: [d, vocab]), float64."""
    names = NAMES[family]
    fused = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "gate_up", "up": "gate_up"}
    key = role if role in names else fused[role]
    w = tensors[names[key].format(layer) + ".weight"].detach().double().numpy()
    if family == "gpt2" and role != "head":
        w = w.T  # Conv1D stores [in, out]; the embedding [vocab, d] -> [d, vocab]
    elif role == "embed":
        w = w.T
    if key == "qkv":
        h, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        hd = w.shape[0] // (h + 2 * kv)
        if family == "gpt_neox":  # rows per head: [q_h | k_h | v_h]
            per_head = w.reshape(h, 3, hd, w.shape[1])
            return per_head[:, "qkv".index(role)].reshape(h * hd, -1)
        start = {"q": 0, "k": h * hd, "v": (h + kv) * hd}[role]
        return w[start:start + (h if role == "q" else kv) * hd]
    if key == "gate_up":
        half = w.shape[0] // 2
        return w[:half] if role == "gate" else w[half:]
    return w


def token_map(t_tok, s_tok, rows: int) -> np.ndarray:
    """Student row -> teacher id, for these tokenizers: same string, else `▁`/`Ġ` read as a space,
    else the same special role; -1 otherwise."""
    t_vocab = t_tok.get_vocab()
    t_norm = {}
    for tok, i in sorted(t_vocab.items(), key=lambda kv: kv[1]):
        t_norm.setdefault(tok.replace("▁", " ").replace("Ġ", " "), i)
    out = np.full(rows, -1)
    for tok, j in s_tok.get_vocab().items():
        if tok in t_vocab:
            out[j] = t_vocab[tok]
        elif tok.replace("▁", " ").replace("Ġ", " ") in t_norm:
            out[j] = t_norm[tok.replace("▁", " ").replace("Ġ", " ")]
    for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
        j = s_tok.convert_tokens_to_ids(getattr(s_tok, role))
        if out[j] < 0:
            out[j] = t_vocab[getattr(t_tok, role)]
    return out


def gather(matrix: np.ndarray, ids: np.ndarray, axis: int) -> np.ndarray:
    out = np.take(matrix, np.maximum(ids, 0), axis=axis)
    index = [slice(None), slice(None)]
    index[axis] = ids < 0
    out[tuple(index)] = 0.0
    return out


def brute_window(sens: np.ndarray, rows: int, cols: int, row_unit: int = 1, col_unit: int = 1):
    best, where = -np.inf, None
    for i in range(0, sens.shape[0] - rows + 1, row_unit):
        for j in range(0, sens.shape[1] - cols + 1, col_unit):
            s = sens[i:i + rows, j:j + cols].sum()
            if s > best + 1e-9 * abs(best if np.isfinite(best) else 0):
                best, where = s, (i, j)
    return where


def fuse_student(family: str, name: str, parts: dict[str, np.ndarray]) -> np.ndarray:
    order = {"c_attn": "qkv", "qkv_proj": "qkv", "gate_up_proj": ["gate", "up"]}
    for key, roles in order.items():
        if f".{key}." in name:
            return np.concatenate([parts[r] for r in roles], axis=0)
    (part,) = parts.values()
    return part


def lora_delta(model, module_name: str) -> np.ndarray:
    layer = model.base_model.model.get_submodule(module_name)
    if hasattr(layer, "lora_embedding_A") and "default" in layer.lora_embedding_A:
        b, a = layer.lora_embedding_B["default"], layer.lora_embedding_A["default"]
    else:
        b, a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    return (b.detach().double() @ a.detach().double()).numpy()


def best_rank_r(block: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(block, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def load_peft(student_dir, adapter_dir):
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(load_model(str(student_dir)), str(adapter_dir))
    bad = [str(w.message) for w in caught
           if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert not bad, bad
    return model


@pytest.mark.parametrize("name", list(PAIRS))
def test_adapter_holds_the_independently_recomputed_blocks(name, extracted):
    x = extracted[name]
    (t_fam, _, _), (s_fam, _, _, _), reduce = PAIRS[name]
    report = json.loads((x["adapter"] / "transfer.json").read_text())
    teacher = load_model(str(x["teacher"]))
    t_tensors = dict(teacher.named_parameters(remove_duplicate=False))
    sens = SensitivityFile(x["sens"])
    sens_tensors = {n: sens[n] for n in sens}
    if "lm_head.weight" not in sens_tensors:  # a tied teacher head shares the embedding's
        sens_tensors["lm_head.weight"] = sens_tensors[NAMES[t_fam]["embed"] + ".weight"]
    peft_model = load_peft(x["student"], x["adapter"])
    s_rows = peft_model.get_input_embeddings().weight.shape[0]
    ids = token_map(x["t_tok"], x["s_tok"], s_rows)
    assert report["vocabulary"]["matched"] == int((ids >= 0).sum())
    assert report["vocabulary"]["coverage"] == pytest.approx((ids >= 0).sum() / len(x["s_tok"]), abs=1e-6)

    by_module: dict[str, list[dict]] = {}
    for e in report["modules"]:
        by_module.setdefault(e["name"], []).append(e)
    expected_modules = {"gpt2": 2 + 4 * 2 - 1, "llama": 2 + 7 * 2, "phi3": 2 + 4 * 2}[s_fam]
    assert len(by_module) == expected_modules  # gpt2: no head (tied); every other module
    for module, entries in by_module.items():
        parts = {}
        for e in entries:
            role, t_layer = e["role"], e["teacher_layer"]
            w = role_matrix(t_fam, teacher.config, t_tensors, role, t_layer)
            s = role_matrix(t_fam, teacher.config, sens_tensors, role, t_layer)
            assert e["teacher_shape"] == list(w.shape)
            if role in ("embed", "head"):
                axis = 1 if role == "embed" else 0
                w, s = gather(w, ids, axis), gather(s, ids, axis)
            rows, cols = e["student_shape"]
            units = [1, 1]
            if reduce == "window-heads" and role in "qkvo":
                dim = 1 if role == "o" else 0
                if w.shape[dim] > (rows, cols)[dim]:
                    units[dim] = HEAD_DIM
            assert tuple(e["window"]) == brute_window(s, rows, cols, *units), (module, role)
            i, j = e["window"]
            parts[role] = w[i:i + rows, j:j + cols]
        got = lora_delta(peft_model, module[: -len(".weight")])
        want = best_rank_r(fuse_student(s_fam, module, parts), RANK)
        np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), err_msg=module)


@pytest.mark.parametrize("name", list(PAIRS))
def test_step0_invariance(name, extracted):
    """The transfer init as training applies it leaves the student's logits as they were."""
    x = extracted[name]
    text = "<|user|>\nWhat is 12 + 7?\n\n<|assistant|>\nthe answer is 19"
    ids = torch.tensor([x["s_tok"](text)["input_ids"]])
    with torch.no_grad():
        want = load_model(str(x["student"]))(input_ids=ids).logits
    student = load_model(str(x["student"]))
    adapter = inject.read_adapter(x["adapter"])
    train_settings = resolve_settings(TrainSettings(dropout=0.0), adapter, _arch(student))
    specs, _ = lora_targets(student, train_settings.modules)
    model = build_lora_model(student, specs, train_settings, str(x["student"]))
    report = inject.inject_transfer_init(model, adapter)
    model.eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
        with model.disable_adapter():
            residual_only = model(input_ids=ids).logits
    assert report["modules"] > 0
    assert (got - want).abs().max().item() < 1e-4
    assert (residual_only - want).abs().max().item() > 1e-2  # not vacuous


def _arch(model):
    from paratransfer.arch import arch_for

    return arch_for(model)


def test_reports_name_families_and_skips(extracted):
    neox = extracted["gpt_neox-gpt2"]["report"]
    assert (neox["teacher_family"], neox["student_family"]) == ("gpt_neox", "gpt2")
    skipped = {s["role"]: s["reason"] for s in neox["skipped"]}
    assert set(skipped) == {"gate", "head"} and "gpt2 family has no gate" in skipped["gate"]
    assert all(e.get("teacher_layout") == "interleaved per head"
               for e in neox["modules"] if e["role"] in "qkv")
    assert extracted["qwen2-llama"]["report"]["skipped"] == []
    phi = extracted["llama-phi3"]["report"]
    assert {tuple(e["student_rows"]) for e in phi["modules"] if e["role"] == "k"} == {(32, 48)}
    for x in extracted.values():
        assert x["report"]["padded"] == []


# --- in memory: roles one side lacks, coverage threshold, padding, a weights source ---------


def random_sensitivity(model, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}


def test_teacher_without_gate_leaves_fused_rows_zero_or_module_out():
    teacher = tiny_model("gpt2", vocab=40, hidden=24, layers=2, heads=3, mlp=48, seed=1)
    phi3 = tiny_model("phi3", vocab=40, hidden=16, layers=1, heads=2, kv_heads=1, mlp=32, seed=2)
    result = extract(teacher, phi3, random_sensitivity(teacher), ExtractSettings(rank=2))
    factors = {f.module_name: f for f in result.factors}
    gate_up = factors["model.layers.0.mlp.gate_up_proj"]
    delta = gate_up.B @ gate_up.A
    assert delta[:32].abs().max() < 1e-6 * delta[32:].abs().max()  # zero up to SVD rounding
    reasons = [s["reason"] for s in result.skipped if s["role"] == "gate"]
    assert reasons == ["the teacher's gpt2 family has no gate: its rows in the student's "
                       "mlp.gate_up_proj are left zero"]


def test_a_module_the_teacher_has_nothing_for_gets_the_standard_init(tmp_path):
    """GPT-NeoX has no gate: the student's gate_proj gets A random, B zero, so a transfer run
    trains the same modules as the baseline (all roles) and is unchanged at step 0."""
    from paratransfer.adapter.write import write_adapter

    tok = char_tokenizer()
    neox = tiny_model("gpt_neox", vocab=len(tok), hidden=24, layers=2, heads=3, mlp=48, seed=3)
    llama = tiny_model("llama", vocab=len(tok), hidden=16, layers=2, heads=2, mlp=32, seed=4)
    settings_ = ExtractSettings(rank=2, alpha=4)
    result = extract(neox, llama, random_sensitivity(neox), settings_)
    gates = [f for f in result.factors if f.module_name.endswith("gate_proj")]
    assert len(gates) == 2 and all(g.B.abs().max() == 0 and g.A.std() > 0 for g in gates)
    assert not torch.equal(gates[0].A, gates[1].A)
    assert not any(e["role"] == "gate" for e in result.entries)
    assert [(s["role"], "standard LoRA init" in s["reason"]) for s in result.skipped] == [("gate", True)]

    save_tiny(llama, tok, tmp_path / "student")
    write_adapter(load_model(str(tmp_path / "student")), result.factors, tmp_path / "adapter", 2, 4.0,
                  0.0, str(tmp_path / "student"))
    student = load_model(str(tmp_path / "student"))
    adapter = inject.read_adapter(tmp_path / "adapter")
    train_settings = resolve_settings(TrainSettings(dropout=0.0, modules=ROLES), adapter, _arch(student))
    specs, _ = lora_targets(student, train_settings.modules)
    model = build_lora_model(student, specs, train_settings, str(tmp_path / "student"))
    inject.inject_transfer_init(model, adapter)  # every targeted module has factors
    ids = torch.tensor([tok("12 + 7 = 19")["input_ids"]])
    model.eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want = load_model(str(tmp_path / "student"))(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-4


def test_low_vocabulary_coverage_is_refused_with_the_figure():
    t_tok, s_tok = char_tokenizer(), spm_tokenizer()
    teacher = tiny_model("llama", vocab=len(t_tok), hidden=24, layers=2, heads=3, mlp=48, seed=1)
    student = tiny_model("llama", vocab=len(s_tok), hidden=16, layers=1, heads=2, mlp=32, seed=2)
    sens = random_sensitivity(teacher)
    matched = int((token_map(t_tok, s_tok, len(s_tok)) >= 0).sum())
    pattern = rf"only {matched} of the student's {len(s_tok)} tokens.*--min-vocab-coverage 0\.95"
    with pytest.raises(UserError, match=pattern):
        extract(teacher, student, sens, ExtractSettings(rank=2, min_vocab_coverage=0.95),
                teacher_tokenizer=t_tok, student_tokenizer=s_tok)
    with pytest.raises(UserError, match="no tokenizers"):
        extract(teacher, student, sens, ExtractSettings(rank=2))
    # without embed and head the vocabularies do not matter
    result = extract(teacher, student, sens, ExtractSettings(rank=2, modules=("attn", "mlp")))
    assert result.vocab is None and len(result.factors) == 7


@pytest.mark.parametrize("reduce", ["window", "window-heads"])
def test_narrower_teacher_is_padded_only_when_allowed(reduce):
    # teacher: one key/value head (k, v: 8 rows); student: two (16 rows)
    teacher = tiny_model("llama", vocab=40, hidden=24, layers=2, heads=3, kv_heads=1, mlp=48, seed=1)
    student = tiny_model("phi3", vocab=40, hidden=16, layers=1, heads=2, kv_heads=2, mlp=32, seed=2)
    sens = random_sensitivity(teacher)
    with pytest.raises(UserError, match="--allow-pad"):
        extract(teacher, student, sens, ExtractSettings(rank=2, reduce=reduce))
    result = extract(teacher, student, sens, ExtractSettings(rank=2, reduce=reduce, allow_pad=True))
    assert [(p["role"], p["rows"], p["cols"]) for p in result.padded] == [("k", 8, 0), ("v", 8, 0)]
    assert all(p["name"] == "model.layers.0.self_attn.qkv_proj.weight" for p in result.padded)
    qkv = next(f for f in result.factors if f.module_name.endswith("qkv_proj"))
    delta = qkv.B @ qkv.A  # rows: q 0-16, k 16-32 (teacher rows 16-24 padded), v 32-48 (40-48)
    scale = delta[16:24].abs().max()
    assert scale > 1e-3
    assert delta[24:32].abs().max() < 1e-5 * scale and delta[40:48].abs().max() < 1e-5 * scale


class DictWeights:
    """A weights source that is not a model: a state dict without tied duplicates (as a
    checkpoint file stores it) that resolves the tied head, and records every read."""

    def __init__(self, model):
        self.config = model.config
        self.tensors = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.aliases = {"lm_head.weight": "transformer.wte.weight"}
        self.reads: list[str] = []

    def __getitem__(self, name):
        self.reads.append(name)
        return self.tensors[self.aliases.get(name, name)]

    def __contains__(self, name):
        return self.aliases.get(name, name) in self.tensors

    def keys(self):
        return self.tensors.keys()


def test_a_weights_source_gives_the_same_factors_as_the_model():
    teacher = tiny_model("gpt2", vocab=40, hidden=24, layers=3, heads=3, mlp=48, seed=1)
    student = tiny_model("llama", vocab=40, hidden=16, layers=2, heads=2, mlp=32, seed=2)
    sens = random_sensitivity(teacher)
    settings_ = ExtractSettings(rank=2)
    source = DictWeights(teacher)
    from_source = extract(source, student, sens, settings_)
    from_model = extract(teacher, student, sens, settings_)
    assert [f.module_name for f in from_source.factors] == [f.module_name for f in from_model.factors]
    for a, b in zip(from_source.factors, from_model.factors, strict=True):
        assert torch.equal(a.B, b.B) and torch.equal(a.A, b.A)
    assert "lm_head.weight" in source.reads  # the tied head, read through its alias
    assert set(source.reads) <= set(source.tensors) | {"lm_head.weight"}


# --- window-heads never cuts a head --------------------------------------------------------


@st.composite
def head_pairs(draw):
    """Teacher and student head layouts (grouped-query ratios included), the student's
    attention a whole number of teacher heads wide and not wider than the teacher's."""
    t_hd = draw(st.sampled_from([2, 3, 4]))
    t_kv = draw(st.integers(1, 4))
    t_heads = t_kv * draw(st.integers(1, 4))
    s_hd = draw(st.sampled_from([d for d in (1, 2, 3, 4, 6, 8) if d <= 2 * t_hd]))
    s_kv = draw(st.integers(1, 4))
    s_heads = s_kv * draw(st.integers(1, 4))
    ok = (s_heads * s_hd <= t_heads * t_hd and s_kv * s_hd <= t_kv * t_hd
          and (s_heads * s_hd) % t_hd == 0 and (s_kv * s_hd) % t_hd == 0)
    if not ok:
        s_hd, s_heads, s_kv = t_hd, draw(st.integers(1, t_heads)), draw(st.integers(1, t_kv))
    return HeadLayout(t_heads, t_kv, t_hd), HeadLayout(s_heads, s_kv, s_hd)


@settings(max_examples=150, deadline=None)
@given(head_pairs(), st.sampled_from("qkvo"), st.integers(0, 2**31 - 1))
def test_window_heads_never_cuts_a_head(heads, role, seed):
    teacher, student = heads
    g = torch.Generator().manual_seed(seed)
    t_count = teacher.kv_heads if role in "kv" else teacher.heads
    s_count = student.kv_heads if role in "kv" else student.heads
    t_width, s_width = t_count * teacher.head_dim, s_count * student.head_dim
    t_other, s_other = 7, 5  # the model width on the other side
    t_shape = (t_other, t_width) if role == "o" else (t_width, t_other)
    s_shape = (s_other, s_width) if role == "o" else (s_width, s_other)
    sens = torch.rand(t_shape, generator=g) ** 4  # peaked, so the plain window often cuts heads
    units = head_units(role, teacher, student, t_shape, s_shape)
    sel = reduce_part("window-heads", role, sens, *s_shape, units, seed=0)
    dim = 1 if role == "o" else 0
    start, size = sel.window[dim], s_shape[dim]
    for boundary in (start, start + size):  # both ends on teacher and student head boundaries
        assert boundary % teacher.head_dim == 0
        assert (boundary - start) % student.head_dim == 0
    assert start + size <= t_width
    # and it is the best such block
    plain = align.window_sums(sens, *s_shape)
    allowed = plain[::units[0], ::units[1]]
    assert float(plain[sel.window]) == float(allowed.max())


def test_window_heads_refuses_heads_that_do_not_tile():
    teacher, student = HeadLayout(4, 4, 6), HeadLayout(4, 4, 4)  # 16 rows: not whole 6-wide heads
    with pytest.raises(UserError, match="window-heads.*use --reduce window"):
        head_units("q", teacher, student, (24, 10), (16, 8))
    assert head_units("up", teacher, student, (40, 10), (16, 8)) == (1, 1)
