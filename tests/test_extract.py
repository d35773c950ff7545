"""Extraction end to end on tiny pairs: the adapter loads with PEFT and every factor is what an
independent recomputation (brute-force window, float64 SVD) says it should be."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from paratransfer.arch import arch_for
from paratransfer.extract.plan import ExtractSettings
from paratransfer.extract.step import run_extract
from paratransfer.sensitivity.accumulate import SensitivityFile
from paratransfer.sensitivity.step import SensitivitySettings, run_sensitivity
from paratransfer.teacher.models import load_model


@pytest.fixture(scope="module")
def extracted(model_pairs, seeds_file, tmp_path_factory):
    """family -> (adapter folder, sensitivity file) for every tiny pair."""
    out = {}
    for family, (teacher, student) in model_pairs.items():
        root = tmp_path_factory.mktemp(f"extract-{family}")
        sens = root / "sens.safetensors"
        run_sensitivity(str(teacher), seeds_file, sens, SensitivitySettings(), torch.float32,
                        torch.device("cpu"), progress=False)
        run_extract(str(teacher), str(student), root / "adapter", ExtractSettings(rank=4, alpha=8),
                    seeds=seeds_file, sensitivity_path=sens, progress=False)
        out[family] = (root / "adapter", sens)
    return out


def brute_force_window(sens: np.ndarray, rows: int, cols: int) -> tuple[int, int]:
    best, where = -np.inf, (0, 0)
    for i in range(sens.shape[0] - rows + 1):
        for j in range(sens.shape[1] - cols + 1):
            s = sens[i:i + rows, j:j + cols].sum()
            if s > best + 1e-9 * abs(best if np.isfinite(best) else 0):
                best, where = s, (i, j)
    return where


def best_rank_r(block: np.ndarray, r: int) -> tuple[np.ndarray, float]:
    u, s, vt = np.linalg.svd(block, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r], float((s[:r] ** 2).sum() / (s ** 2).sum())


def lora_delta(model, module_name: str, embedding: bool) -> np.ndarray:
    """B @ A of the loaded PEFT layer, in [out, in] orientation ([d, vocab] for the embedding)."""
    layer = model.base_model.model.get_submodule(module_name)
    if embedding:
        b, a = layer.lora_embedding_B["default"], layer.lora_embedding_A["default"]
    else:
        b, a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    return (b.detach().double() @ a.detach().double()).numpy()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_adapter_loads_and_factors_are_best_rank_r_of_chosen_block(family, model_pairs, extracted):
    from peft import PeftModel

    teacher_dir, student_dir = model_pairs[family]
    adapter_dir, sens_path = extracted[family]
    report = json.loads((adapter_dir / "transfer.json").read_text())
    teacher, student = load_model(str(teacher_dir)), load_model(str(student_dir))
    sens = SensitivityFile(sens_path)
    t_arch = arch_for(teacher)

    # Layer selection: the student's layer count of highest-scoring teacher layers, in order.
    n_t = t_arch.num_layers(teacher)
    scores = [sum(float(sens[n].double().sum()) for n in sens if n.startswith(f"{t_arch.layers}.{i}."))
              for i in range(n_t)]
    assert report["layer_scores"] == pytest.approx(scores, rel=1e-9)
    k = arch_for(student).num_layers(student)
    assert report["selected_layers"] == sorted(np.argsort(-np.array(scores), kind="stable")[:k].tolist())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(student, str(adapter_dir))
    assert not [w for w in caught if "missing" in str(w.message).lower()
                or "unexpected" in str(w.message).lower()], [str(w.message) for w in caught]
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    loaded = {n for n, _ in peft_model.named_parameters() if "lora_" in n}
    assert {k.replace(".weight", ".default.weight") if "lora_A" in k or "lora_B" in k
            else k + ".default" for k in saved} == loaded

    t_params = dict(teacher.named_parameters(remove_duplicate=False))
    by_module: dict[str, list[dict]] = {}
    for entry in report["modules"]:
        by_module.setdefault(entry["name"], []).append(entry)
    assert by_module, "nothing was extracted"
    for name, entries in by_module.items():
        spec = next(m for m in t_arch.modules() if name.endswith(m.path + ".weight"))
        parts = []
        for e in entries:
            t_full = spec.to_linear(t_params[e["teacher_name"]]).detach().double().numpy()
            s_full = spec.to_linear(sens[e["teacher_name"]]).double().numpy()
            lo, hi = e.get("teacher_rows", [0, t_full.shape[0]])
            t_block, s_block = t_full[lo:hi], s_full[lo:hi]
            rows, cols = e["student_shape"]
            assert e["teacher_shape"] == list(t_block.shape)
            assert tuple(e["window"]) == brute_force_window(s_block, rows, cols), name
            i, j = e["window"]
            parts.append(t_block[i:i + rows, j:j + cols])
        block = np.concatenate(parts, axis=0)
        want, energy = best_rank_r(block, report["rank"])
        got = lora_delta(peft_model, name[: -len(".weight")], spec.embedding)
        np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), err_msg=name)
        for e in entries:
            assert e["energy"] == pytest.approx(energy, rel=1e-4)


def test_gpt2_tied_head_is_skipped_and_reported(extracted):
    report = json.loads((extracted["gpt2"][0] / "transfer.json").read_text())
    skipped = {s["role"]: s["reason"] for s in report["skipped"]}
    assert "head" in skipped and "gate" in skipped
    assert not any(e["name"].startswith("lm_head") for e in report["modules"])


def test_transfer_json_has_required_fields(extracted):
    report = json.loads((extracted["llama"][0] / "transfer.json").read_text())
    for key in ("teacher", "student", "rank", "alpha", "selected_layers", "layer_scores", "modules"):
        assert key in report
    for entry in report["modules"]:
        for key in ("name", "teacher_name", "teacher_shape", "student_shape", "window", "energy"):
            assert key in entry
        # --svd auto, the default: how each block was factorized, and its certificate
        svd = entry["svd"]
        assert svd["method"] in ("krylov", "exact") and svd["certified"] is True
        assert entry["energy"] == pytest.approx(1 - svd["residual"], abs=1e-6)
    assert report["settings"]["svd"] == "auto"
    assert any(e["svd"]["method"] == "krylov" for e in report["modules"])
    assert (extracted["llama"][0] / "layers.png").stat().st_size > 1000


def test_same_inputs_same_bytes(model_pairs, extracted, seeds_file, tmp_path):
    teacher, student = model_pairs["llama"]
    first, sens = extracted["llama"]
    for i, settings in enumerate([ExtractSettings(rank=4, alpha=8)]):
        again = tmp_path / f"again{i}"
        run_extract(str(teacher), str(student), again, settings, sensitivity_path=sens, progress=False)
        assert (again / "adapter_model.safetensors").read_bytes() == \
            (first / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("layers,reduce,modules,svd", [
    ("first", "rows-cols", "mlp", "randomized"),
    ("random", "random", "attn,head", "exact"),
    ("uniform", "first", "embed,q,v", "exact"),
])
def test_other_strategies_produce_loadable_adapters(layers, reduce, modules, svd, model_pairs,
                                                    extracted, tmp_path):
    from peft import PeftModel

    teacher, student = model_pairs["llama"]
    settings = ExtractSettings(rank=4, alpha=8, layers=layers, reduce=reduce,
                               modules=tuple(modules.split(",")), svd=svd, seed=3)
    report = run_extract(str(teacher), str(student), tmp_path / "a", settings,
                         sensitivity_path=extracted["llama"][1], progress=False)
    roles = {e["role"] for e in report["modules"]}
    assert roles == set(settings.modules)
    if layers == "first":
        assert report["selected_layers"] == [0, 1]
    if reduce == "first":
        assert all(e["window"] == [0, 0] for e in report["modules"])
    if reduce in ("rows-cols", "random"):
        assert all(e["window"] is None for e in report["modules"])
    model = PeftModel.from_pretrained(load_model(str(student)), str(tmp_path / "a"))
    assert sum(1 for n, _ in model.named_parameters() if "lora_" in n) == 2 * len(report["modules"])
