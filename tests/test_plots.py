"""Plots: the sensitivity picture shows each window over the map it was chosen from."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

from paratransfer.extract.plan import ExtractSettings
from paratransfer.extract.plots import plot_sensitivity, role_sensitivity
from paratransfer.extract.step import run_extract
from paratransfer.sensitivity.accumulate import SensitivityFile
from paratransfer.sensitivity.step import SensitivitySettings, run_sensitivity


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def extraction(request, model_pairs, seeds_file, tmp_path_factory):
    """(transfer.json, sensitivity file, teacher config) for a plain and a fused (GPT-2) teacher."""
    teacher, student = model_pairs[request.param]
    root = tmp_path_factory.mktemp(f"plots-{request.param}")
    sens = root / "sens.safetensors"
    run_sensitivity(str(teacher), seeds_file, sens, SensitivitySettings(), torch.float32,
                    torch.device("cpu"), progress=False)
    run_extract(str(teacher), str(student), root / "adapter", ExtractSettings(rank=4, alpha=8),
                sensitivity_path=sens, seeds=seeds_file, progress=False)
    report = json.loads((root / "adapter" / "transfer.json").read_text())
    return report, SensitivityFile(sens), AutoConfig.from_pretrained(teacher)


def test_each_window_is_the_maximum_of_the_map_drawn_under_it(extraction):
    report, sens, config = extraction
    checked = 0
    for entry in report["modules"]:
        heat = role_sensitivity(sens, config, entry)
        if heat is None:
            continue
        rows, cols = entry["student_shape"]
        (r, c) = entry["window"]
        sums = torch.nn.functional.avg_pool2d(heat.double()[None, None], (rows, cols), stride=1)
        sums = sums[0, 0] * rows * cols  # every window's sum, brute force
        assert float(sums[r, c]) == pytest.approx(float(sums.max()), rel=1e-9), entry["name"]
        checked += 1
    assert checked >= 7  # q, k, v, o (split out of GPT-2's fused c_attn), mlp, embed, head


def test_sensitivity_picture_is_written(extraction, tmp_path):
    report, sens, config = extraction
    plot_sensitivity(report, tmp_path / "s.png", sens, config)
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
