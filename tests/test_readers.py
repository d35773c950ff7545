"""Damaged files other steps wrote — a model's weights, an adapter, a sensitivity file — are a
one-line error naming the file in every command that reads them, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from paratransfer.cli.entry import main
from paratransfer.io.errors import UserError


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def truncate(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


@pytest.fixture()
def damaged(model_pairs, adapters, seeds_file, tmp_path) -> dict[str, Path]:
    """A student whose weights file lost its end, an adapter whose tensors file lost its end
    (and one whose header is cut), and a sensitivity file cut short."""
    from paratransfer.sensitivity.step import SensitivitySettings, run_sensitivity

    student = Path(shutil.copytree(model_pairs["llama"][1], tmp_path / "student"))
    truncate(student / "model.safetensors", 20000)
    adapter = Path(shutil.copytree(adapters["llama"], tmp_path / "adapter"))
    truncate(adapter / "adapter_model.safetensors", 5000)
    header_cut = Path(shutil.copytree(adapters["llama"], tmp_path / "header-cut"))
    truncate(header_cut / "adapter_model.safetensors", 100)
    sens = tmp_path / "sens.safetensors"
    run_sensitivity(str(model_pairs["llama"][0]), seeds_file, sens, SensitivitySettings(),
                    dtype=None, device="cpu", progress=False)
    truncate(sens, sens.stat().st_size - 64)
    return {"student": student, "adapter": adapter, "header_cut": header_cut, "sens": sens}


def test_damaged_safetensors_in_every_command(capsys, damaged, model_pairs, seeds_file, tmp_path):
    teacher, student = model_pairs["llama"]
    d = damaged
    cases = [
        (d["student"] / "model.safetensors",
         ["extract", "--teacher", teacher, "--student", d["student"], "--seeds", seeds_file,
          "--out", tmp_path / "o1", "--quiet"]),
        (d["student"] / "model.safetensors",
         ["train", "--student", d["student"], "--data", seeds_file, "--out", tmp_path / "o2",
          "--init", "standard", "--quiet"]),
        (d["student"] / "model.safetensors",
         ["evaluate", "--model", d["student"], "--task", "gsm", "--data", seeds_file, "--out",
          tmp_path / "o3", "--quiet"]),
        (d["student"] / "model.safetensors",
         ["sensitivity", "--teacher", d["student"], "--seeds", seeds_file, "--out",
          tmp_path / "o4.safetensors", "--quiet"]),
        (d["adapter"] / "adapter_model.safetensors",
         ["merge", "--student", student, "--adapter", d["adapter"], "--out", tmp_path / "o5"]),
        (d["header_cut"] / "adapter_model.safetensors",
         ["evaluate", "--model", student, "--adapter", d["header_cut"], "--task", "gsm",
          "--data", seeds_file, "--out", tmp_path / "o6", "--quiet"]),
        (d["adapter"] / "adapter_model.safetensors",
         ["train", "--student", student, "--data", seeds_file, "--adapter", d["adapter"],
          "--out", tmp_path / "o7", "--quiet"]),
        (d["sens"],
         ["extract", "--teacher", teacher, "--student", student, "--sensitivity", d["sens"],
          "--out", tmp_path / "o8", "--quiet"]),
    ]
    for damaged_file, argv in cases:
        code, err = run_cli(capsys, *argv)
        errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, (argv, err)
        assert f"{damaged_file}: not a complete safetensors file" in errors[0], (argv, err)
    assert not any(tmp_path.glob("o*"))


def test_header_checks(tmp_path):
    from paratransfer.io.readers import read_json, safetensors_header

    good = tmp_path / "good.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 2), "b": torch.ones(5, dtype=torch.bfloat16)}, str(good))
    assert set(safetensors_header(good)) >= {"a", "b"}
    raw = good.read_bytes()
    for name, data in (("short", raw[:6]), ("cut", raw[:-2]), ("long", raw + b"\0\0"),
                       ("header", raw[:8] + b"#" + raw[9:])):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(UserError, match=f"{name}.safetensors: not a complete safetensors"):
            safetensors_header(path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"r": 4,\n "lora_alpha": }')
    with pytest.raises(UserError, match=r"bad.json:2: not valid JSON"):
        read_json(bad)
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(UserError, match="not valid UTF-8"):
        read_json(bad)
    (tmp_path / "ok.json").write_text(json.dumps({"x": 1}))
    assert read_json(tmp_path / "ok.json") == {"x": 1}


def test_safetensors_layout_points_at_each_tensors_bytes(tmp_path):
    import torch
    from safetensors.torch import save_file

    from paratransfer.io.readers import safetensors_header, safetensors_layout

    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
               "b": torch.tensor([7.5, -1.0], dtype=torch.float32)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    header, start = safetensors_layout(path)
    raw = path.read_bytes()
    assert header == safetensors_header(path) and header["__metadata__"] == {"k": "v"}
    for name, tensor in tensors.items():
        begin, end = header[name]["data_offsets"]
        assert raw[start + begin:start + end] == tensor.numpy().tobytes()
    assert start + max(e["data_offsets"][1] for n, e in header.items() if n != "__metadata__") \
        == len(raw)
