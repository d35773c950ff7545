"""GGUF files as models (paratransfer.teacher.gguf): converted once into a cache keyed by the
file's SHA-256, reused afterwards, written atomically (two processes convert once), recorded in
provenance; a missing package or an architecture transformers cannot read is a one-line error.
The conversion itself on real files is in the real-model tier (test_real_pair.py)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paratransfer.demo.tiny import char_tokenizer, save_tiny, tiny_model
from paratransfer.io.errors import UserError
from paratransfer.teacher import gguf as gguf_models


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(gguf_models.CACHE_ENV, str(root))
    return root


def fake_convert(path: Path, out: Path, sha256: str) -> None:
    """Stands in for transformers' GGUF reader: a tiny Llama saved as the converted folder,
    its weights seeded by the file's bytes; counts its calls in a file beside the cache."""
    counter = out.parents[2] / "conversions.txt"
    with counter.open("a") as fh:
        fh.write(f"{path.name}\n")
    seed = int(sha256[:8], 16)
    out.mkdir(parents=True)
    save_tiny(tiny_model("llama", vocab=len(char_tokenizer()), seed=seed), char_tokenizer(), out)
    (out / gguf_models.SOURCE_FILE).write_text(json.dumps(
        {"file": str(path), "sha256": sha256, "format": gguf_models.FORMAT}))


def _conversions(cache: Path) -> list[str]:
    f = cache.parent / "conversions.txt"
    return f.read_text().split() if f.exists() else []


def test_converted_once_keyed_by_content(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_models, "convert", fake_convert)
    monkeypatch.setattr(gguf_models, "_check_gguf_package", lambda: None)
    a = tmp_path / "a.gguf"
    a.write_bytes(b"GGUF model one")
    folder = gguf_models.converted_folder(a)
    assert folder == cache / hashlib.sha256(b"GGUF model one").hexdigest()
    assert gguf_models.converted_folder(a) == folder
    copy = tmp_path / "copy.GGUF"
    copy.write_bytes(b"GGUF model one")  # same bytes under another name: the same folder
    assert gguf_models.converted_folder(copy) == folder
    assert _conversions(cache) == ["a.gguf"]
    a.write_bytes(b"GGUF model two")  # changed in place: a new digest, a new folder
    assert gguf_models.converted_folder(a) != folder
    assert _conversions(cache) == ["a.gguf", "a.gguf"]
    assert not [p for p in cache.iterdir() if p.name.startswith(".") and p.is_dir()]


def test_every_model_reader_takes_the_file(cache, tmp_path, monkeypatch):
    from paratransfer.teacher.lazy import SafetensorsWeights
    from paratransfer.teacher.models import fingerprint, load_model, load_tokenizer

    monkeypatch.setattr(gguf_models, "convert", fake_convert)
    monkeypatch.setattr(gguf_models, "_check_gguf_package", lambda: None)
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF tiny")
    model = load_model(str(f))
    folder = gguf_models.converted_folder(f)
    assert fingerprint(model) == fingerprint(load_model(str(folder)))
    assert fingerprint(SafetensorsWeights(str(f))) == fingerprint(model)
    assert load_tokenizer(str(f)).get_vocab() == load_tokenizer(str(folder)).get_vocab()
    prov = gguf_models.gguf_provenance("teacher", str(f))
    assert prov == {"teacher_gguf": {"file": str(f.resolve()),
                                     "sha256": hashlib.sha256(b"GGUF tiny").hexdigest(),
                                     "folder": str(folder)}}
    assert gguf_models.gguf_provenance("teacher", str(folder)) == {}


def test_laten_takes_gguf_files(cache, tmp_path, monkeypatch, seeds_file):
    """`paratransfer laten` reads the student's shapes before loading it: from the converted
    folder too, and its adapter loads on that folder."""
    from peft import PeftModel

    from paratransfer.laten import LatenSettings, run_laten
    from paratransfer.teacher.models import load_model

    monkeypatch.setattr(gguf_models, "convert", fake_convert)
    monkeypatch.setattr(gguf_models, "_check_gguf_package", lambda: None)
    teacher, student = tmp_path / "t.gguf", tmp_path / "s.gguf"
    teacher.write_bytes(b"GGUF teacher")
    student.write_bytes(b"GGUF student")
    out = tmp_path / "laten"
    report = run_laten(str(teacher), str(student), seeds_file, out,
                       LatenSettings(steps=2, batch=2), progress=False)
    assert report["curve"] and (out / "adapter_model.safetensors").is_file()
    PeftModel.from_pretrained(load_model(str(student)), str(out))


def test_an_adapter_for_a_gguf_student_names_its_folder_without_a_warning(cache, tmp_path,
                                                                         monkeypatch):
    """PEFT names the adapter's base by the loaded model (the converted folder) and warns when
    the config said the `.gguf` path: extraction and training both write the folder, silently."""
    import warnings

    from peft import get_peft_model

    from paratransfer.adapter.lora import lora_config
    from paratransfer.arch import arch_for
    from paratransfer.teacher.models import load_model
    from paratransfer.train.settings import TrainSettings
    from paratransfer.train.setup import build_lora_model

    monkeypatch.setattr(gguf_models, "convert", fake_convert)
    monkeypatch.setattr(gguf_models, "_check_gguf_package", lambda: None)
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF tiny")
    folder = str(gguf_models.converted_folder(f))
    specs = [s for s in arch_for(load_model(str(f))).modules() if s.in_layer][:1]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*base_model_name_or_path.*")
        student = load_model(str(f))  # as extraction wraps it (adapter.write)
        extracted = get_peft_model(student, lora_config(student, specs, 2, 2.0, 0.0,
                                                        base_model_name_or_path=str(f)))
        trained = build_lora_model(load_model(str(f)), specs,
                                   TrainSettings(init="standard", rank=2, alpha=2.0), str(f))
    extracted.save_pretrained(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == folder
    assert trained.peft_config["default"].base_model_name_or_path == folder
    # a model built from a config has no name: the id given is kept
    fresh = tiny_model("llama", vocab=len(char_tokenizer()), seed=0)
    assert lora_config(fresh, specs, 2, 2.0, 0.0,
                       base_model_name_or_path="given").base_model_name_or_path == "given"


def test_the_digest_is_remembered_until_the_file_changes(cache, tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"first")
    assert gguf_models.file_sha256(f) == hashlib.sha256(b"first").hexdigest()
    memo = next((cache / "digests").iterdir())
    memo.write_text("f" * 64 + "\n")  # the memo is what is read while the file is unchanged
    assert gguf_models.file_sha256(f) == "f" * 64
    f.write_bytes(b"second, longer")
    assert gguf_models.file_sha256(f) == hashlib.sha256(b"second, longer").hexdigest()


def _convert_in_process(args: tuple[str, str]) -> str:
    path, root = args
    import os

    os.environ[gguf_models.CACHE_ENV] = root
    gguf_models.convert = fake_convert
    gguf_models._check_gguf_package = lambda: None
    return str(gguf_models.converted_folder(path))


def test_two_processes_convert_once(cache, tmp_path):
    f = tmp_path / "shared.gguf"
    f.write_bytes(b"GGUF shared")
    # spawn, not fork: a child forked from a process whose torch/OpenMP threads hold a lock can
    # wait on it forever (seen once here after in-process CLI calls earlier in the session).
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        folders = pool.map(_convert_in_process, [(str(f), str(cache))] * 2)
    assert len(set(folders)) == 1 and _conversions(cache) == ["shared.gguf"]
    assert (Path(folders[0]) / "model.safetensors").is_file()


def test_missing_gguf_package_is_one_line(cache, tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(UserError, match=r"needs the gguf package .*paratransfer\[gguf\]"):
        gguf_models.converted_folder(f)


def test_missing_file_is_one_line(cache, tmp_path):
    from paratransfer.teacher.models import load_model

    with pytest.raises(UserError, match="no such file"):
        load_model(str(tmp_path / "absent.gguf"))


def test_unknown_architecture_is_one_line(cache, tmp_path):
    """A real GGUF file (written with the gguf package) of an architecture transformers does not
    read: the CLI prints one line naming the file."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "nosucharch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from paratransfer.demo import arithmetic_records, write_jsonl

    seeds = write_jsonl(tmp_path / "seeds.jsonl", arithmetic_records(2))
    done = subprocess.run([sys.executable, "-m", "paratransfer", "sensitivity", "--teacher",
                           str(path), "--seeds", str(seeds), "--out", str(tmp_path / "s.st")],
                          capture_output=True, text=True, env={**_env(), gguf_models.CACHE_ENV:
                                                               str(cache)})
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    assert str(path) in errors[0] and "GGUF" in errors[0]
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == ["digests"]


def _env() -> dict:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_a_recipe_names_a_gguf_file_relative_to_itself(tmp_path):
    from paratransfer.experiment.recipe import _model_ref

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert _model_ref("m.gguf", "r.yaml: teacher", tmp_path) == str(tmp_path / "m.gguf")
    with pytest.raises(UserError, match="does not exist"):  # never taken for a hub id
        _model_ref("absent.gguf", "r.yaml: teacher", tmp_path)
