"""The teacher-free data-driven inits `eva` and `corda`: the student is unchanged at step 0,
the plain-LoRA export, the merged model and the live model agree after training, the factors
come from the training data (other data, other factors), and the embedding's factors (the
project's own path, PEFT has neither for embeddings) match brute force and PEFT's own formula
on the equivalent Linear layer."""

from __future__ import annotations

import json

import pytest
import torch

from paratransfer import inject
from paratransfer.demo import arithmetic_records, one_step, write_jsonl
from paratransfer.tasks.examples import IGNORE_INDEX, load_tokenized
from paratransfer.teacher.models import load_model, load_tokenizer
from paratransfer.train import (
    TrainSettings,
    build_lora_model,
    init_lora,
    load_examples,
    lora_targets,
    resolve_settings,
    run_train,
)
from paratransfer.train.data_inits import (
    corda_embedding_factors,
    eva_embedding_components,
    init_data,
)
from paratransfer.train.setup import data_for_init
from tolerances import logits

FAMILIES = ["llama", "qwen2", "gpt2"]
INITS = ["eva", "corda"]
RANK, ALPHA = 4, 8.0
FAST = dict(batch_size=4, micro_batch_size=2, max_length=160, max_steps=3, dropout=0.0,
            rank=RANK, alpha=ALPHA)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data-inits") / "train.jsonl",
                       arithmetic_records(8, seed=3))


@pytest.fixture(scope="module")
def other_file(tmp_path_factory):
    """Another task family (one-step problems), other examples."""
    return write_jsonl(tmp_path_factory.mktemp("data-inits-other") / "train.jsonl",
                       arithmetic_records(8, seed=11, family=one_step))


@pytest.fixture(scope="module")
def prompts(train_file, tokenizer) -> torch.Tensor:
    rows = [t["input_ids"][:60] for t in load_tokenized(train_file, tokenizer, limit=3)]
    width = min(len(r) for r in rows)
    return torch.tensor([r[:width] for r in rows])


def initialized(student_dir, data_file, init: str, seed: int = 1):
    """The student wrapped with LoRA and initialized as `init` from `data_file`, as `setup`
    does it (rank/alpha above, every module)."""
    student = load_model(str(student_dir))
    tokenizer = load_tokenizer(str(student_dir))
    settings = resolve_settings(TrainSettings(init=init, seed=seed, **FAST), None, None)
    examples, _ = load_examples(data_file, tokenizer, settings.prompt_format, settings.max_length)
    data = data_for_init(examples, settings, tokenizer.pad_token_id, torch.device("cpu"),
                         settings.max_steps)
    specs, _ = lora_targets(student, settings.modules)
    model = build_lora_model(student, specs, settings, str(student_dir), data)
    report = init_lora(model, settings, None, data)
    return model, report, data


def factors(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().double().clone() for name, p in inject.lora_parameters(model).items()}


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("family", FAMILIES)
def test_step0_invariance(init, family, model_pairs, train_file, prompts):
    student_dir = model_pairs[family][1]
    want = logits(load_model(str(student_dir)), prompts)
    model, report, data = initialized(student_dir, train_file, init)
    assert (logits(model, prompts) - want).abs().max().item() < 1e-4
    layers = inject.lora_layers(model)
    assert report["modules"] == len(layers) > 0
    embedding = [n for n in layers if n.endswith(("embed_tokens", "wte"))]
    assert report["by_own_path"] == embedding and len(embedding) == 1
    assert set(report["by_peft"]) == set(layers) - set(embedding)
    assert report["data"]["batches"] == 3 and report["data"]["examples"] == 12
    assert report["data"]["answer_tokens"] > 0 and len(report["data"]["batch_digests"]) == 3
    f = factors(model)
    if init == "eva":  # A holds the directions, B starts at zero: the base is unchanged
        assert all(t.abs().max() == 0 for n, t in f.items() if "_B" in n)
        assert all(t.abs().max() > 0 for n, t in f.items() if "_A" in n)
    else:  # residual: the base alone computes something else (the check is not vacuous)
        assert all(t.abs().max() > 0 for t in f.values())
        with model.disable_adapter():
            assert (logits(model, prompts) - want).abs().max().item() > 1e-2


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_tiny_learning_rate_keeps_the_student(init, family, model_pairs, train_file, prompts,
                                                tmp_path):
    """lr 1e-12: live model and the export on the unmodified student compute the student."""
    from peft import PeftModel

    student_dir = model_pairs[family][1]
    want = logits(load_model(str(student_dir)), prompts)
    out = tmp_path / "run"
    result = run_train(str(student_dir), train_file, out,
                       TrainSettings(init=init, lr=1e-12, **FAST), progress=False)
    assert (logits(result.model, prompts) - want).abs().max().item() < 1e-4
    plain = PeftModel.from_pretrained(load_model(str(student_dir)), str(out))
    assert (logits(plain, prompts) - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("family", FAMILIES)
def test_plain_lora_export_equals_merged_and_live_model(init, family, model_pairs, train_file,
                                                        prompts, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from paratransfer.adapter.merge import run_merge

    student_dir = model_pairs[family][1]
    out = tmp_path / "run"
    result = run_train(str(student_dir), train_file, out, TrainSettings(init=init, lr=1e-2, **FAST),
                       progress=False)
    live = logits(result.model, prompts)
    assert (live - logits(load_model(str(student_dir)), prompts)).abs().max().item() > 1e-3
    plain = PeftModel.from_pretrained(load_model(str(student_dir)), str(out))
    assert (logits(plain, prompts) - live).abs().max().item() < 1e-4
    run_merge(str(student_dir), out, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    assert (logits(merged, prompts) - live).abs().max().item() < 1e-4
    rank = 2 * RANK if init == "corda" else RANK
    assert result.summary["adapter_rank"] == rank and result.summary["init"] == init
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == rank and not config.get("rank_pattern")
    injection = json.loads((out / "train.json").read_text())["injection"]
    assert injection["by_own_path"] and injection["own_path_reason"].startswith("PEFT's ")


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("family", FAMILIES)
def test_factors_come_from_the_training_data(init, family, model_pairs, train_file, other_file):
    student_dir = model_pairs[family][1]
    first, _, _ = initialized(student_dir, train_file, init)
    again, _, _ = initialized(student_dir, train_file, init)
    other, _, _ = initialized(student_dir, other_file, init)
    a, b, c = factors(first), factors(again), factors(other)
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # the same data: the same factors
    moved = [n for n in a if a[n].abs().max() > 0 and not torch.allclose(a[n], c[n], atol=1e-3)]
    nonzero = [n for n in a if a[n].abs().max() > 0]
    assert moved == nonzero, sorted(set(nonzero) - set(moved))  # other data: other factors


def layer_inputs(model, module: str, batches: list[dict]) -> torch.Tensor:
    """The inputs of `module` at the answer tokens of the batches (as EVA selects them)."""
    seen = []

    def hook(mod, args, output):
        seen.append(args[0].detach())

    handle = model.get_submodule(module).register_forward_hook(hook)
    rows = []
    with torch.no_grad():
        for batch in batches:
            seen.clear()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            rows.append(seen[0][batch["labels"] != IGNORE_INDEX])
    handle.remove()
    return torch.cat(rows).double()


@pytest.mark.parametrize("family", FAMILIES)
def test_eva_rows_are_the_principal_directions_of_the_layer_inputs(family, model_pairs,
                                                                   train_file):
    """Oracle: the exact top-r principal subspace of a layer's inputs at the answer tokens
    (centred SVD of all of them) against PEFT's incremental one: nearly the same subspace."""
    student_dir = model_pairs[family][1]
    model, _, data = initialized(student_dir, train_file, "eva")
    plain = load_model(str(student_dir))
    layers = inject.lora_layers(model)
    checked = 0
    for name in [n for n in layers if n.endswith(("q_proj", "c_attn", "down_proj", "c_fc"))][:2]:
        x = layer_inputs(plain, name, data.batches)
        _, s, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
        a = layers[name].lora_A["default"].weight.detach().double()
        torch.testing.assert_close(a @ a.T, torch.eye(RANK, dtype=torch.float64), atol=1e-4, rtol=0)
        # The variance the rows capture against the most any r directions capture (1: the top
        # subspace; near-equal singular values make the subspace itself less sharp), and the
        # mean cos² of the principal angles (about r/dim, under 0.15 here, for random rows).
        captured = float(((x - x.mean(0)) @ a.T).pow(2).sum() / s[:RANK].pow(2).sum())
        overlap = float((vh[:RANK] @ a.T).pow(2).sum() / RANK)
        assert captured > 0.97 and overlap > 0.8, (name, captured, overlap, s[:RANK + 1])
        checked += 1
    assert checked == 2


def test_eva_embedding_components_against_brute_force():
    """The one-hot inputs' centred principal directions, from their SVD, on token counts with
    distinct frequencies (a well-defined subspace)."""
    vocab, rank = 12, 3
    counts = {1: 9, 4: 7, 5: 5, 7: 3, 10: 2, 11: 1}
    ids = torch.tensor([t for t, n in counts.items() for _ in range(n)])
    a = eva_embedding_components(ids, vocab, rank)
    onehot = torch.nn.functional.one_hot(ids, vocab).double()
    _, _, vh = torch.linalg.svd(onehot - onehot.mean(0), full_matrices=False)
    torch.testing.assert_close(a.T @ a, vh[:rank].T @ vh[:rank], atol=1e-10, rtol=0)
    assert a[:, [0, 2, 3, 6, 8, 9]].abs().max() == 0  # tokens never seen get no weight
    # Fewer directions than the rank (two distinct tokens: one direction): the rest are zero.
    two = eva_embedding_components(torch.tensor([2, 2, 3]), vocab, rank)
    assert two[0].norm() == pytest.approx(1.0) and two[1:].abs().max() == 0


def test_corda_embedding_factors_match_peft_on_the_equivalent_linear():
    """PEFT's own CorDA decomposition (`collect_eigens_for_layer`, instruction-previewed mode)
    on a Linear layer of weight Eᵀ with the one-hot covariance, against ours."""
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import collect_eigens_for_layer

    g = torch.Generator().manual_seed(0)
    vocab, d, rank, scale = 10, 6, 3, 2.0
    weight = torch.randn(vocab, d, generator=g)
    examples = [torch.tensor([1, 2, 2, 5]), torch.tensor([5, 5, 7]), torch.tensor([0, 1, 9, 9, 9])]
    b, a = corda_embedding_factors(weight, examples, rank, scale)
    linear = torch.nn.Linear(vocab, d, bias=False)
    linear.weight.data = weight.T.clone()
    covariance = torch.zeros(vocab, vocab)
    for ids in examples:  # PEFT's hook: xᵀx per example (one-hot rows, max 1), then the mean
        x = torch.nn.functional.one_hot(ids, vocab).float()
        covariance += x.T @ x
    linear.covariance_matrix = covariance / len(examples)
    config = LoraConfig(r=rank, init_lora_weights="corda", corda_config=CordaConfig())
    eigens = collect_eigens_for_layer(linear, config)
    s = eigens.S_WC[:rank].double()
    want = eigens.U_WC[:, :rank].double() @ torch.diag(s) @ eigens.V_WC[:, :rank].double().T
    torch.testing.assert_close(scale * b @ a, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.T @ b, torch.diag(torch.diagonal(b.T @ b)), atol=1e-8, rtol=0)


def test_init_data_is_the_first_training_batches(train_file, tokenizer):
    from paratransfer.train import batch_digest, batch_indices

    examples, _ = load_examples(train_file, tokenizer, "tulu", 160)
    data = init_data(examples, batch_size=4, micro_batch_size=3, seed=5, steps=2, pad_id=0,
                     device=torch.device("cpu"))
    picked = [batch_indices(len(examples), 4, 5, step) for step in range(2)]
    assert data.record["batch_digests"] == [batch_digest(i) for i in picked]
    assert data.record["micro_batches"] == 4 == len(data.batches)  # 4 = 3 + 1, twice
    assert [x.tolist() for x in data.examples] == [examples[i].input_ids.tolist()
                                                   for ids in picked for i in ids]
    assert data.record["answer_tokens"] == sum(examples[i].answer_tokens
                                               for ids in picked for i in ids)


def test_corda_run_resumes_to_the_same_adapter(model_pairs, train_file, tmp_path):
    """The residual base is rebuilt from the same data on resume: same result as one go."""
    from safetensors.torch import load_file

    student_dir = model_pairs["llama"][1]
    settings = TrainSettings(init="corda", lr=1e-2, checkpoint_every=1, **FAST)
    run_train(str(student_dir), train_file, tmp_path / "full", settings, progress=False)
    cut = run_train(str(student_dir), train_file, tmp_path / "cut", settings, progress=False,
                    stop_after=1)
    assert not cut.complete
    run_train(str(student_dir), train_file, tmp_path / "cut", settings, progress=False,
              resume=True)
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_recipe_arms_eva_and_corda_with_their_contrasts(model_pairs, seeds_file, tmp_path):
    """`{init: eva}` and `{init: corda}` run as recipe arms beside transfer and lora (no
    extraction of their own), and the results give transfer − eva and transfer − corda on the
    task metric and on the held-out loss."""
    import yaml

    from paratransfer.experiment import run_experiment
    from paratransfer.experiment.recipe import load_recipe

    teacher, student = model_pairs["llama"]
    recipe = {
        "teacher": str(teacher), "student": str(student),
        "task": {"type": "gsm", "seeds": str(seeds_file),
                 "train": str(write_jsonl(tmp_path / "train.jsonl", arithmetic_records(8, seed=5))),
                 "eval": str(write_jsonl(tmp_path / "test.jsonl", arithmetic_records(2, seed=6))),
                 "heldout": str(write_jsonl(tmp_path / "heldout.jsonl",
                                            arithmetic_records(4, seed=8)))},
        "seeds": [1, 2], "references": ["student"],
        "arms": {"transfer": {}, "lora": {"init": "standard"}, "eva": {"init": "eva"},
                 "corda": {"init": "corda"}},
        "rank": 4, "alpha": 8, "max_length": 160, "max_steps": 2, "batch_size": 4,
        "micro_batch_size": 4, "checkpoint_every": 1, "limit": 2, "max_new_tokens": 4,
        "eval_batch_size": 2, "lr": 1e-2, "eval_every": 1, "dtype": "float32", "device": "cpu",
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    lines: list[str] = []
    result = run_experiment(load_recipe(path), tmp_path / "run", progress=False, log=lines.append)
    assert sum(" extract " in f" {line} " for line in lines) == 1  # transfer's only
    said = {c["contrast"]: c for c in result["contrasts"]}
    assert {"transfer − eva", "transfer − corda"} <= set(said)
    assert "the teacher over the student's own task data (EVA)" == said["transfer − eva"]["isolates"]
    for name in ("transfer − eva", "transfer − corda"):
        assert said[name]["n"] == 2 and said[name]["heldout"]["final"]["n"] == 2
    md = (tmp_path / "run" / "results.md").read_text()
    assert "(transfer − corda): " in md and "final held-out loss (transfer − eva)" in md
    for arm in ("eva", "corda"):
        info = json.loads((tmp_path / "run" / "arms" / arm / "seed-1" / "train" /
                           "train.json").read_text())
        assert info["init"] == arm and info["injection"]["data"]["batches"] == 2


def test_eva_refuses_batches_too_small_for_the_rank(model_pairs, tmp_path):
    """PEFT's EVA skips micro-batches with fewer answer tokens than the rank and, with none
    left, would never end: refused with a one-line error instead."""
    from paratransfer.io.errors import UserError

    records = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"Say {i}."},
                                            {"role": "assistant", "content": "k"}]}
               for i in range(4)]
    data = write_jsonl(tmp_path / "short.jsonl", records)
    settings = TrainSettings(init="eva", lr=1e-2, **{**FAST, "micro_batch_size": 1, "rank": 8})
    with pytest.raises(UserError, match="no micro-batch .* has 8 answer tokens"):
        run_train(str(model_pairs["llama"][1]), data, tmp_path / "run", settings, progress=False)


def test_a_checkpoint_from_before_init_batches_still_resumes(model_pairs, train_file, tmp_path):
    """A setting added since a checkpoint was written (`init_batches`) is accepted at its
    default; a changed setting is still refused."""
    from paratransfer.io.errors import UserError
    from paratransfer.train.checkpoints import CHECKPOINTS, STATE

    student_dir = model_pairs["llama"][1]
    settings = TrainSettings(init="standard", lr=1e-2, checkpoint_every=1, **FAST)
    run_train(str(student_dir), train_file, tmp_path / "run", settings, progress=False,
              stop_after=1)
    state = tmp_path / "run" / CHECKPOINTS / "step-000001" / STATE
    info = json.loads(state.read_text())
    del info["meta"]["settings"]["init_batches"]
    state.write_text(json.dumps(info))
    with pytest.raises(UserError, match="setting lr is"):
        run_train(str(student_dir), train_file, tmp_path / "run",
                  TrainSettings(init="standard", lr=2e-2, checkpoint_every=1, **FAST),
                  progress=False, resume=True)
    result = run_train(str(student_dir), train_file, tmp_path / "run", settings, progress=False,
                       resume=True)
    assert result.complete and result.summary["steps_done"] == 3
