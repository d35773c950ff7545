"""LaTen (paratransfer.laten): attribution against a brute-force oracle, the translator's
zero point and training, the adapter round trip and laten.json, on tiny pairs."""

from __future__ import annotations

import json

import pytest
import torch

from paratransfer import data
from paratransfer.arch import arch_for
from paratransfer.experiment.heldout_contrasts import NO_HELDOUT, not_trained
from paratransfer.io.errors import UserError
from paratransfer.laten import LatenSettings, attribution, run_laten
from paratransfer.laten.attribution import attribute_many, attribute_one
from paratransfer.laten.inject import apply_deltas, injected_parameters, weight_deltas
from paratransfer.laten.locate import KIND, locate, neuron_counts, neuron_vectors
from paratransfer.laten.loop import Step, example_loss, train_translator
from paratransfer.laten.translator import Translator
from paratransfer.teacher.models import load_model
from tolerances import tolerance

FAMILIES = ("llama", "gpt2")
#: Families with fused matrices holding a LaTen role (Phi-3: v in qkv_proj, up in gate_up_proj;
#: GPT-NeoX: v interleaved per head in query_key_value), built here.
FUSED = {"phi3": (dict(hidden=48, layers=4, heads=6, kv_heads=2, mlp=96),
                  dict(hidden=32, layers=2, heads=4, kv_heads=2, mlp=64)),
         "gpt_neox": (dict(hidden=48, layers=4, heads=6, mlp=96),
                      dict(hidden=32, layers=2, heads=4, mlp=64))}
#: Gemma 1 (pre-norm, as Llama) and Gemma 2 / 3 (post-norms on the attention and MLP outputs;
#: Gemma 2 soft-caps its logits), built here with random norm gains so the gains matter.
GEMMAS = {name: (dict(hidden=48, layers=4, heads=6, kv_heads=2, mlp=96),
                 dict(hidden=32, layers=2, heads=4, kv_heads=2, mlp=64))
          for name in ("gemma", "gemma2", "gemma3_text")}


SHALLOW = "gemma3_text-to-deeper-llama"


def _random_norm_gains(model, seed):
    """Every norm weight of a tiny model drawn at random (they start at their neutral value)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.fixture(scope="module")
def pairs(model_pairs, tokenizer, tmp_path_factory):
    """family -> (teacher folder, student folder): the shared pairs plus the fused families."""
    from paratransfer.demo.tiny import save_tiny, tiny_model

    root = tmp_path_factory.mktemp("laten-models")
    out = dict(model_pairs)
    for i, (family, (t_kw, s_kw)) in enumerate(FUSED.items()):
        out[family] = (save_tiny(tiny_model(family, vocab=len(tokenizer), seed=30 + i, **t_kw),
                                 tokenizer, root / f"{family}-teacher"),
                       save_tiny(tiny_model(family, vocab=len(tokenizer), seed=40 + i, **s_kw),
                                 tokenizer, root / f"{family}-student"))
    for i, (family, (t_kw, s_kw)) in enumerate(GEMMAS.items()):
        teacher = _random_norm_gains(tiny_model(family, vocab=len(tokenizer), seed=50 + i, **t_kw),
                                     60 + i)
        student = _random_norm_gains(tiny_model(family, vocab=len(tokenizer), seed=70 + i, **s_kw),
                                     80 + i)
        out[family] = (save_tiny(teacher, tokenizer, root / f"{family}-teacher"),
                       save_tiny(student, tokenizer, root / f"{family}-student"))
    # the real pair's situation in miniature: a post-norm Gemma 3 teacher shallower than a
    # Llama student (4 layers into 6)
    deep = tiny_model("llama", vocab=len(tokenizer), seed=90, hidden=32, layers=6, heads=4,
                      kv_heads=2, mlp=64)
    out[SHALLOW] = (out["gemma3_text"][0], save_tiny(deep, tokenizer, root / "llama-6-student"))
    return out


def _sample(path, tokenizer, index=0):
    example = data.read_examples(path)[index]
    return data.tokenize_example(example, tokenizer, "tulu", 1024)


# --------------------------------------------------------------------------- brute force


def _oracle_scores(model, sample, eos_id):
    """Layer and neuron scores the slow way: per neuron, its contribution computed by calling
    the module on an input with only that neuron's value kept, pushed through the model's own
    final norm and head one vector at a time.

    With post-norms (Gemma 2/3) the layer adds the norms' outputs, and a neuron's part goes
    through Gemma's RMS norm written out here, `v · (1 + w) / √(mean(o²) + ε)`, at the scale
    of the module's whole output o."""
    spec = arch_for(model)
    ids, labels = sample["input_ids"], sample["labels"]
    answer = [t for t, lab in enumerate(labels) if lab != -100 and ids[t] != eos_id]
    t = answer[-1]
    tokens, target = ids[:t], ids[t]
    layers = model.get_submodule(spec.layers)
    inputs = {}
    hooks = [layer.get_submodule(spec.module_for(role).path).register_forward_hook(
        lambda m, args, out, i=i, role=role: inputs.__setitem__((role, i), args[0][0, -1].clone()))
        for i, layer in enumerate(layers) for role in ("o", "down")]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]), output_hidden_states=True)
    for h in hooks:
        h.remove()
    norm, head = model.get_submodule(spec.final_norm), model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    post = spec.post_norms(model.config)

    def logp(v):
        with torch.no_grad():
            logits = head(norm(v[None, None]))[0, 0].double()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            return float(torch.log_softmax(logits, -1)[target])

    def through(layer, n, whole):
        """What the layer adds for a module output `whole`, and the map of a part of it."""
        if not post:
            return whole, lambda part: part
        p = layer.get_submodule(post[n])
        scale = torch.rsqrt(whole.double().square().mean() + p.eps)
        return p(whole[None])[0], lambda part: (part.double() * (1 + p.weight.double()) * scale).float()

    scores = {"attn": [], "ffn": [], "o": [], "down": []}
    for i, layer in enumerate(layers):
        h = out.hidden_states[i][0, -1]
        o_mod = layer.get_submodule(spec.module_for("o").path)
        d_mod = layer.get_submodule(spec.module_for("down").path)
        with torch.no_grad():
            o_out, o_map = through(layer, 0, o_mod(inputs["o", i][None])[0])
            r = h + o_out
            f_out, f_map = through(layer, 1, d_mod(inputs["down", i][None])[0])
        scores["attn"].append(logp(r) - logp(h))
        scores["ffn"].append(logp(r + f_out) - logp(r))
        for role, module, base, to_stream in (("o", o_mod, h, o_map), ("down", d_mod, r, f_map)):
            x = inputs[role, i]
            row = []
            for c in range(x.shape[0]):
                only = torch.zeros_like(x)
                only[c] = x[c]
                with torch.no_grad():
                    part = module(only[None])[0] - module(torch.zeros_like(x)[None])[0]
                row.append(logp(base + to_stream(part)) - logp(base))
            scores[role].append(row)
    heads = spec.heads(model.config)
    group = heads.heads // heads.kv_heads
    scores["v"] = [[sum(row[(g * group + q) * heads.head_dim + j] for q in range(group))
                    for g in range(heads.kv_heads) for j in range(heads.head_dim)]
                   for row in scores["o"]]
    scores["up"] = scores["down"]
    return scores


def _top(values, k):
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return order[:k]


def _spy_shared_head(monkeypatch) -> list:
    """Record what `_SharedHead.of` returns (None: the direct path) on each call."""
    seen, real = [], attribution._SharedHead.of
    monkeypatch.setattr(attribution._SharedHead, "of",
                        classmethod(lambda cls, *a: seen.append(real(*a)) or seen[-1]))
    return seen


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gemma2", "gemma3_text"])
def test_the_shared_head_pass_gives_each_example_the_direct_scores(family, pairs, seeds_file,
                                                                   tokenizer, monkeypatch):
    """Three examples through one shared head pass, the vocabulary and the columns tiled
    unevenly, score as each one alone through the model's own norm and head."""
    teacher = load_model(str(pairs[family][0]))
    spec = arch_for(teacher)
    samples = [_sample(seeds_file, tokenizer, i) for i in range(3)]
    monkeypatch.setattr(attribution, "_LOGIT_BUDGET", 333)  # ragged vocabulary tiles
    seen = _spy_shared_head(monkeypatch)
    many = attribute_many(teacher, spec, samples, tokenizer.eos_token_id)
    assert seen and all(s is not None for s in seen), "the shared path was not taken"
    monkeypatch.setattr(attribution._SharedHead, "of", classmethod(lambda cls, *a: None))
    for sample, got in zip(samples, many, strict=True):
        want = attribute_one(teacher, spec, sample, tokenizer.eos_token_id)
        torch.testing.assert_close(got.attn_layers, want.attn_layers, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.ffn_layers, want.ffn_layers, rtol=1e-4, atol=1e-5)
        for role in ("o", "down", "v", "up"):
            torch.testing.assert_close(got.neurons[role], want.neurons[role], rtol=1e-4,
                                       atol=1e-5)


def test_a_layer_norm_head_takes_the_direct_path(pairs, seeds_file, tokenizer, monkeypatch):
    """GPT-2's final LayerNorm is not an RMS norm with a gain: the shared form would be wrong,
    so it is not used (the brute-force test checks the scores)."""
    teacher = load_model(str(pairs["gpt2"][0]))
    seen = _spy_shared_head(monkeypatch)
    attribute_one(teacher, arch_for(teacher), _sample(seeds_file, tokenizer),
                  tokenizer.eos_token_id)
    assert seen and all(s is None for s in seen)


@pytest.mark.parametrize("family", [*FAMILIES, "qwen2", "phi3", *GEMMAS])
def test_located_neurons_are_the_top_share_by_brute_force_attribution(family, pairs,
                                                                       seeds_file, tokenizer):
    teacher_dir, student_dir = pairs[family]
    teacher, student = load_model(str(teacher_dir)), load_model(str(student_dir))
    spec = arch_for(teacher)
    counts = neuron_counts(student, spec, ("up", "down", "v", "o"), 0.1)
    keep = len(student.get_submodule(spec.layers))
    sample = _sample(seeds_file, tokenizer, 1)
    attribution = attribute_one(teacher, spec, sample, tokenizer.eos_token_id)
    want = _oracle_scores(teacher, sample, tokenizer.eos_token_id)
    for kind, got in (("attn", attribution.attn_layers), ("ffn", attribution.ffn_layers)):
        torch.testing.assert_close(got, torch.tensor(want[kind], dtype=torch.float64),
                                   rtol=1e-4, atol=1e-5)
    for role in ("o", "down", "v", "up"):
        torch.testing.assert_close(attribution.neurons[role],
                                   torch.tensor(want[role], dtype=torch.float64),
                                   rtol=1e-4, atol=1e-5)
    located = locate(attribution, keep, counts)
    for kind in ("attn", "ffn"):
        assert located.layers[kind] == sorted(_top(want[kind], keep))
    for role, k in counts.items():
        for layer, got in zip(located.layers[KIND[role]], located.neurons[role], strict=True):
            assert got == _top(want[role][layer], k)


def test_neuron_counts_are_a_tenth_of_the_student_widths(model_pairs):
    student = load_model(str(model_pairs["llama"][1]))  # mlp 64, 4 heads x 8, 2 kv heads
    counts = neuron_counts(student, arch_for(student), ("up", "down", "v", "o"), 0.1)
    assert counts == {"up": 6, "down": 6, "v": 1, "o": 3}
    with pytest.raises(UserError, match="--rate"):
        neuron_counts(student, arch_for(student), ("v",), 0.01)


# --------------------------------------------------------------------------- translator


def _pair_inputs(family, model_pairs, seeds_file, tokenizer, index=0):
    teacher = load_model(str(model_pairs[family][0]))
    student = load_model(str(model_pairs[family][1]))
    spec_t, spec_s = arch_for(teacher), arch_for(student)
    counts = neuron_counts(student, spec_s, ("up", "down", "v", "o"), 0.1)
    keep = len(student.get_submodule(spec_s.layers))
    sample = _sample(seeds_file, tokenizer, index)
    t_loc = locate(attribute_one(teacher, spec_t, sample, tokenizer.eos_token_id), keep, counts)
    s_loc = locate(attribute_one(student, spec_s, sample, tokenizer.eos_token_id), keep, counts)
    return teacher, student, neuron_vectors(teacher, spec_t, t_loc), s_loc, sample


@pytest.mark.parametrize("family", FAMILIES)
def test_a_zero_translator_leaves_the_student_unchanged(family, model_pairs, seeds_file, tokenizer):
    _, student, vectors, s_loc, sample = _pair_inputs(family, model_pairs, seeds_file, tokenizer)
    spec = arch_for(student)
    translator = Translator(("up", "down", "v", "o"), 48, 32, 1e-5, 0)
    with torch.no_grad():
        for p in translator.parameters():
            p.zero_()
    ids = torch.tensor([sample["input_ids"]])
    with torch.no_grad():
        before = student(input_ids=ids).logits
        deltas = weight_deltas(student, spec, s_loc, translator(vectors))
        assert set(deltas) and all(not bool(d.any()) for d in deltas.values())
        params = injected_parameters(student, spec, deltas)
        through = torch.func.functional_call(student, params, args=(), kwargs={"input_ids": ids},
                                             strict=False, tie_weights=False).logits
        apply_deltas(student, spec, deltas)
        after = student(input_ids=ids).logits
    assert torch.equal(before, through) and torch.equal(before, after)


def test_the_translator_trains_on_a_fixed_batch(model_pairs, seeds_file, tokenizer):
    _, student, vectors, s_loc, sample = _pair_inputs("llama", model_pairs, seeds_file, tokenizer)
    batch = [_sample(seeds_file, tokenizer, i) for i in range(3)]
    translator = Translator(("up", "down", "v", "o"), 48, 32, 1e-5, 0)
    settings = LatenSettings(steps=12, lr=1e-2, warmup=0.0)
    curve = train_translator(student, arch_for(student), translator,
                             [Step(vectors, s_loc, batch)] * 12, settings)
    losses = [r["loss"] for r in curve]
    assert losses[-1] < losses[0] - 1e-3
    # step 1 starts at the student's own loss: the translator begins (almost) at zero
    assert abs(curve[0]["lm_loss"] - curve[0]["student_lm_loss"]) < 1e-6
    plain = sum(float(example_loss(student, None, s)) for s in batch) / 3
    assert curve[-1]["student_lm_loss"] == pytest.approx(plain, rel=1e-6)


# --------------------------------------------------------------------------- the command


RUNS = (*FAMILIES, *FUSED, "gemma3_text", SHALLOW)


@pytest.fixture(scope="module")
def laten_runs(pairs, seeds_file, tmp_path_factory):
    """family -> output folder of a short run (lr large enough that the injection is visible)."""
    out = {}
    for family in RUNS:
        folder = tmp_path_factory.mktemp(f"laten-{family}") / "out"
        run_laten(str(pairs[family][0]), str(pairs[family][1]), seeds_file, folder,
                  LatenSettings(steps=3, batch=4, lr=5e-2, seed=7), progress=False)
        out[family] = folder
    return out


@pytest.mark.parametrize("family", RUNS)
def test_the_adapter_is_the_injection_rebuilt_from_laten_json(family, laten_runs, pairs,
                                                              seeds_file, tokenizer):
    from peft import PeftModel
    from safetensors.torch import load_file

    from paratransfer.laten.locate import Located

    folder = laten_runs[family]
    report = json.loads((folder / "laten.json").read_text())
    teacher = load_model(str(pairs[family][0]))
    student = load_model(str(pairs[family][1]))
    spec_t, spec_s = arch_for(teacher), arch_for(student)
    t_loc = Located(**report["located"]["teacher"])
    s_loc = Located(**report["located"]["student"])
    translator = Translator(report["translator"]["roles"], *report["translator"]["layers"][1:],
                            1e-5, 0)
    translator.load_state_dict(load_file(str(folder / "translator.safetensors")))
    with torch.no_grad():
        translated = translator(neuron_vectors(teacher, spec_t, t_loc))
    ids = torch.tensor([_sample(seeds_file, tokenizer, 2)["input_ids"]])
    with torch.no_grad():
        plain = student(input_ids=ids).logits
        apply_deltas(student, spec_s, weight_deltas(student, spec_s, s_loc, translated))
        live = student(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(load_model(str(pairs[family][1])), str(folder))
        through_adapter = loaded(input_ids=ids).logits
    torch.testing.assert_close(through_adapter, live, **tolerance(torch.float32))
    assert float((live - plain).abs().max()) > 1e-3  # the injection is not a no-op here


def test_laten_json_says_what_was_located_and_how_it_trained(laten_runs, model_pairs, seeds_file):
    report = json.loads((laten_runs["llama"] / "laten.json").read_text())
    assert report["method"] == "laten"
    assert report["neuron_counts"] == {"up": 6, "down": 6, "v": 1, "o": 3}
    assert report["settings"]["steps"] == 3 and report["settings"]["rate"] == 0.1
    assert [r["step"] for r in report["curve"]] == [1, 2, 3]
    assert all(set(r) >= {"lm_loss", "reg", "loss", "lr", "student_lm_loss"} for r in report["curve"])
    teacher, student = report["located"]["teacher"], report["located"]["student"]
    assert student["layers"] == {"attn": [0, 1], "ffn": [0, 1]}
    for kind in ("attn", "ffn"):  # 2 of the teacher's 4 layers, in their original order
        assert len(teacher["layers"][kind]) == 2 and teacher["layers"][kind] == sorted(
            set(teacher["layers"][kind]))
    for role, k in report["neuron_counts"].items():
        for located in (teacher, student):
            assert [len(n) for n in located["neurons"][role]] == [k, k]
            assert all(len(set(n)) == k for n in located["neurons"][role])
    assert report["translator"]["layers"] == [48, 48, 32]
    assert report["seeds_sha256"] == data.file_digest(seeds_file)
    assert len(report["teacher_fingerprint"]) == 16 and len(report["student_fingerprint"]) == 16
    assert report["adapter"]["rank"] == 6 and report["adapter"]["alpha"] == 6.0
    assert 1 <= report["injection_example"] <= 5
    assert len(report["locating_examples"]) == 3


def test_the_same_seed_gives_the_same_adapter(laten_runs, model_pairs, seeds_file, tmp_path):
    from safetensors.torch import load_file

    again = tmp_path / "again"
    run_laten(str(model_pairs["llama"][0]), str(model_pairs["llama"][1]), seeds_file, again,
              LatenSettings(steps=3, batch=4, lr=5e-2, seed=7), progress=False)
    first = load_file(str(laten_runs["llama"] / "adapter_model.safetensors"))
    second = load_file(str(again / "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_the_command_refuses_an_existing_output_and_replaces_it_with_overwrite(
        model_pairs, seeds_file, tmp_path, capsys):
    from paratransfer.cli import main

    teacher, student = model_pairs["llama"]
    out = tmp_path / "laten"
    args = ["laten", "--teacher", str(teacher), "--student", str(student), "--seeds",
            str(seeds_file), "--out", str(out), "--steps", "1", "--batch", "2", "--quiet"]
    assert main(args) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "laten.json").is_file()
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--rate", "0.2"]) == 0
    assert json.loads((out / "laten.json").read_text())["settings"]["rate"] == 0.2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_settings_refuse_bad_values():
    for bad in (dict(rate=0.0), dict(rate=1.5), dict(steps=0), dict(lr=float("nan")),
                dict(roles=("q",)), dict(batch=0), dict(reg_weight=-1.0)):
        with pytest.raises(UserError):
            LatenSettings(**bad)


@pytest.mark.parametrize("family", ["gpt2", *FUSED])
def test_fused_modules_get_the_vectors_in_their_own_roles_rows(family, pairs, seeds_file,
                                                               tokenizer):
    from paratransfer.laten.attribution import role_matrix

    student = load_model(str(pairs[family][1]))
    spec = arch_for(student)
    counts = neuron_counts(student, spec, ("up", "v"), 0.25)
    sample = _sample(seeds_file, tokenizer)
    s_loc = locate(attribute_one(student, spec, sample, tokenizer.eos_token_id), 2, counts)
    translated = {role: torch.randn(2, k, 32, generator=torch.Generator().manual_seed(1))
                  for role, k in counts.items()}
    before = {role: [role_matrix(student, spec, role, i).clone() for i in range(2)]
              for role in ("q", "k", "v", "gate", "up") if spec.module_for(role) is not None}
    apply_deltas(student, spec, weight_deltas(student, spec, s_loc, translated))
    for role, mats in before.items():
        for layer, old in enumerate(mats):
            change = role_matrix(student, spec, role, layer) - old
            if role not in translated:
                assert not bool(change.any()), (role, layer)  # the other roles' rows untouched
                continue
            rows = s_loc.neurons[role][layer]
            torch.testing.assert_close(change[rows], translated[role][layer])
            others = [i for i in range(change.shape[0]) if i not in rows]
            assert not bool(change[others].any())


# --------------------------------------------------------------------------- recipe arms


def _recipe(tmp_path, model_pairs, seeds_file, **changes):
    import yaml

    from paratransfer.demo import arithmetic_records, write_jsonl

    teacher, student = model_pairs["llama"]
    raw = {"teacher": str(teacher), "student": str(student),
           "task": {"type": "gsm", "seeds": str(seeds_file),
                    "train": str(write_jsonl(tmp_path / "train.jsonl", arithmetic_records(8, seed=5))),
                    "eval": str(write_jsonl(tmp_path / "test.jsonl", arithmetic_records(4, seed=6)))},
           "seeds": [1, 2], "rank": 4, "alpha": 8, "max_length": 160, "max_steps": 2,
           "batch_size": 4, "micro_batch_size": 4, "checkpoint_every": 1, "limit": 2,
           "max_new_tokens": 6, "eval_batch_size": 4, "lr": 1e-2, "dtype": "float32",
           "device": "cpu", "laten_steps": 2, "laten_batch": 3, "laten_lr": 5e-2,
           "arms": {"transfer": {}, "lora": {"init": "standard"}, "laten": {"laten": "only"},
                    "laten-lora": {"init": "standard", "laten": "lora"}}, **changes}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_laten_arms_run_in_a_recipe_with_their_rows_and_contrasts(model_pairs, seeds_file,
                                                                   tmp_path):
    from paratransfer.experiment import run_experiment
    from paratransfer.experiment.recipe import load_recipe

    recipe = load_recipe(_recipe(tmp_path, model_pairs, seeds_file))
    lines: list[str] = []
    run = tmp_path / "run"
    result = run_experiment(recipe, run, progress=False, log=lines.append)
    assert sum("] laten seed " in line for line in lines) == 2  # one per seed, shared by both arms
    assert sum("] merge laten seed " in line for line in lines) == 2
    assert not any("train laten seed" in line for line in lines)  # `laten` is not fine-tuned
    assert {row["arm"] for row in result["arms"]} == {"transfer", "lora", "laten", "laten-lora"}
    said = {c["contrast"]: c for c in result["contrasts"]}
    assert {"laten − student", "transfer − laten-lora", "laten-lora − lora"} <= set(said)
    assert all(said[c]["n"] == 2 for c in said)
    rows = {row["arm"]: row for row in result["arms"]}
    student = next(r["value"] for r in result["references"] if r["name"] == "student")
    assert said["laten − student"]["mean"] == pytest.approx(rows["laten"]["mean"] - student)
    trained = json.loads((run / "arms" / "laten-lora" / "seed-1" / "train" / "train.json")
                         .read_text())
    merged = run / "arms" / "laten" / "laten-student-seed-1"
    assert trained["student"] == str(merged.resolve())
    assert json.loads((merged / "merge.json").read_text())["adapter"] == str(
        (run / "arms" / "laten" / "laten-seed-1").resolve())
    md = (run / "results.md").read_text()
    assert "LaTen's injection, without fine-tuning (laten − student)" in md
    # `laten` is not fine-tuned: it has no held-out curve whether or not the recipe gave a set
    assert rows["laten"]["heldout"] == {"missing": not_trained(["laten"])}
    assert said["laten − student"]["heldout"] == {"missing": not_trained(["laten", "student"])}
    assert rows["laten-lora"]["heldout"] == {"missing": NO_HELDOUT}  # this recipe gives none


def test_recipes_refuse_laten_settings_that_do_not_make_an_arm(model_pairs, seeds_file, tmp_path):
    from paratransfer.experiment.recipe import load_recipe

    with pytest.raises(UserError, match="laten: the recipe's settings are every arm's"):
        load_recipe(_recipe(tmp_path, model_pairs, seeds_file, laten="only"))
    with pytest.raises(UserError, match="standard LoRA init"):
        load_recipe(_recipe(tmp_path, model_pairs, seeds_file,
                            arms={"lora": {"init": "standard"}, "x": {"laten": "lora"}}))
    with pytest.raises(UserError, match="expected one of: none, only, lora"):
        load_recipe(_recipe(tmp_path, model_pairs, seeds_file,
                            arms={"lora": {"init": "standard"}, "x": {"laten": "yes"}}))
    with pytest.raises(UserError, match="arms.laten: laten_steps: must be"):
        load_recipe(_recipe(tmp_path, model_pairs, seeds_file, laten_steps=0))


def test_the_teacher_is_loaded_once_and_gone_before_the_student_loads(model_pairs, seeds_file,
                                                                        tmp_path, monkeypatch):
    import gc
    import weakref

    import paratransfer.teacher.models as models

    teacher_dir, student_dir = (str(p) for p in model_pairs["llama"])
    real, loads, alive_at_student = models.load_model, [], []
    teachers: list[weakref.ref] = []

    def counting(name, *args, **kwargs):
        if name == student_dir:
            gc.collect()
            alive_at_student.append(any(ref() is not None for ref in teachers))
        model = real(name, *args, **kwargs)
        loads.append(name)
        if name == teacher_dir:
            teachers.append(weakref.ref(model))
        return model

    monkeypatch.setattr(models, "load_model", counting)
    run_laten(teacher_dir, student_dir, seeds_file, tmp_path / "out",
              LatenSettings(steps=2, batch=3), progress=False)
    assert loads.count(teacher_dir) == 1 and loads.count(student_dir) == 1
    assert alive_at_student == [False]


def test_a_shallower_teacher_feeds_the_student_layers_by_relative_depth(laten_runs):
    """Gemma 3 (4 layers, post-norms) into a 6-layer Llama: every teacher layer is used, in
    order, student layer i taking teacher layer round(i·3/5), as extraction's --layers depth."""
    report = json.loads((laten_runs[SHALLOW] / "laten.json").read_text())
    teacher, student = report["located"]["teacher"], report["located"]["student"]
    assert teacher["layer_rule"] == "depth" and student["layer_rule"] == "attribution"
    assert teacher["layers"] == {"attn": [0, 1, 1, 2, 2, 3], "ffn": [0, 1, 1, 2, 2, 3]}
    assert student["layers"] == {"attn": list(range(6)), "ffn": list(range(6))}
    assert all(len(n) == 6 for n in teacher["neurons"].values())


def test_a_post_norm_that_is_not_an_rms_norm_is_refused(pairs, seeds_file, tokenizer):
    teacher = load_model(str(pairs["gemma3_text"][0]))
    spec = arch_for(teacher)
    norm = teacher.get_submodule(spec.layers)[1].post_feedforward_layernorm
    norm.forward = lambda x: torch.tanh(x) * 3.0  # same shapes, not an RMS norm
    with pytest.raises(UserError, match="layer 1's post-norm after down is not an RMS norm"):
        attribute_one(teacher, spec, _sample(seeds_file, tokenizer), tokenizer.eos_token_id)
