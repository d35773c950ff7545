"""Scale: data-parallel sensitivity (torchrun), device_map teachers, layer streaming, lazy weights.

The in-memory path (`accumulate_sensitivity`, itself checked against a naive reference in
test_sensitivity.py) is the oracle everywhere.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from paratransfer.arch import arch_for
from paratransfer.io.errors import UserError
from paratransfer.sensitivity.accumulate import (
    SensitivityFile,
    SensitivityWriter,
    accumulate_sensitivity,
)
from paratransfer.sensitivity.step import SensitivitySettings, run_sensitivity
from paratransfer.sensitivity.streamed import (
    ActivationStore,
    StreamedTeacher,
    stream_sensitivity,
    streamed_sensitivity,
)
from paratransfer.tasks import examples as data
from paratransfer.teacher.lazy import SafetensorsWeights
from paratransfer.teacher.models import fingerprint, load_model, load_tokenizer
from paratransfer.teacher.weights import TeacherWeights

ROOT = Path(__file__).resolve().parents[1]


def assert_same_sensitivity(got, want, rel: float) -> None:
    """Same names; every tensor within `rel` of the reference, relative to its largest value."""
    assert set(got) == set(want)
    for name in want:
        ref = want[name].double()
        diff = (got[name].double() - ref).abs().max().item()
        assert diff <= rel * max(ref.abs().max().item(), 1e-30), (name, diff)


@pytest.fixture(scope="session")
def sharded_teachers(model_pairs, tmp_path_factory) -> dict[str, Path]:
    """The tiny teachers re-saved as several safetensors shards (with index.json)."""
    root = tmp_path_factory.mktemp("sharded")
    out = {}
    for family, (teacher_dir, _) in model_pairs.items():
        model = load_model(str(teacher_dir))
        folder = root / family
        model.save_pretrained(folder, max_shard_size="40KB")
        load_tokenizer(str(teacher_dir)).save_pretrained(folder)
        assert (folder / "model.safetensors.index.json").is_file()
        out[family] = folder
    return out


def in_memory(teacher_dir, seeds_file):
    samples = data.load_tokenized(seeds_file, load_tokenizer(str(teacher_dir)))
    return accumulate_sensitivity(load_model(str(teacher_dir)), samples), samples


# --------------------------------------------------------------------------- data parallel

# One command per torchrun launch, as users run it (a second process group re-created on the
# same rendezvous port inside one launch can hang). Once the command has returned, no gloo
# thread may be left: threads of a process group that outlived destroy_process_group ran on
# into interpreter shutdown, which aborted a rank under load ("terminate called without an
# active exception").
DDP_SCRIPT = """
import os, sys
from pathlib import Path
from paratransfer.cli.entry import main
teacher, seeds, out, name = sys.argv[1:5]
common = ["sensitivity", "--teacher", teacher, "--seeds", seeds, "--quiet"]
assert main([*common, "--out", out + "/" + name, *sys.argv[5:]]) == 0
if sys.platform.startswith("linux"):
    names = [Path(f"/proc/self/task/{t}/comm").read_text().strip()
             for t in os.listdir("/proc/self/task")]
    left = [n for n in names if "gloo" in n]
    assert not left, f"threads of the destroyed process group still run: {left}"
"""


def test_torchrun_two_processes_match_one(sharded_teachers, seeds_file, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): the same file as one process; 5 samples split 3 + 2."""
    teacher = sharded_teachers["llama"]
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT / "src"))
    torchrun = Path(sys.executable).with_name("torchrun")
    for name, extra in (("ddp.safetensors", []), ("ddp-stream.safetensors", ["--stream"])):
        proc = subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node", "2",
                                 str(script), str(teacher), str(seeds_file), str(tmp_path), name,
                                 *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)  # its own process group, workers included
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail("torchrun did not finish in 300 s")
        assert proc.returncode == 0, stderr[-3000:]
        assert stdout.count("wrote ") == 1, stdout  # rank 0 only

    one = tmp_path / "one.safetensors"
    run_sensitivity(str(teacher), seeds_file, one, SensitivitySettings(), torch.float32,
                    torch.device("cpu"), progress=False)
    want = load_file(str(one))
    for name in ("ddp.safetensors", "ddp-stream.safetensors"):
        f = SensitivityFile(tmp_path / name)
        assert f.metadata["samples"] == 5
        assert f.metadata["teacher_fingerprint"] == SensitivityFile(one).metadata["teacher_fingerprint"]
        assert_same_sensitivity(load_file(str(f.path)), want, rel=1e-6)


# --------------------------------------------------------------------------- device_map


def test_device_map_auto_matches_and_keeps_fp32_sums_beside_weights(model_pairs, seeds_file, tmp_path):
    teacher_dir = str(model_pairs["llama"][0])
    plain = tmp_path / "plain.safetensors"
    mapped = tmp_path / "mapped.safetensors"
    settings = SensitivitySettings(max_samples=2)
    run_sensitivity(teacher_dir, seeds_file, plain, settings, torch.float32, torch.device("cpu"),
                    progress=False)
    run_sensitivity(teacher_dir, seeds_file, mapped, settings, torch.float32, torch.device("cpu"),
                    progress=False, device_map="auto")
    assert_same_sensitivity(load_file(str(mapped)), load_file(str(plain)), rel=1e-6)

    half = load_model(teacher_dir, dtype=torch.bfloat16, device_map="auto")
    samples = data.load_tokenized(seeds_file, load_tokenizer(teacher_dir), limit=2)
    sens, used = accumulate_sensitivity(half, samples)
    params = dict(half.named_parameters())
    assert used == 2
    for name, acc in sens.items():
        assert acc.dtype == torch.float32 and params[name].dtype == torch.bfloat16
        assert acc.device == params[name].device
    assert all(v.sum() > 0 for v in sens.values())


def test_device_map_refuses_disk_offload(model_pairs):
    with pytest.raises(UserError, match="no gradient"):
        load_model(str(model_pairs["llama"][0]), device_map={"model.embed_tokens": "cpu",
                                                             "model.layers": "disk",
                                                             "model.norm": "cpu",
                                                             "model.rotary_emb": "cpu",
                                                             "lm_head": "cpu"})


# --------------------------------------------------------------------------- streaming


def test_stream_file_matches_in_memory_llama(sharded_teachers, seeds_file, tmp_path):
    """The whole --stream pipeline (sharded files, writer, metadata) against the in-memory path."""
    teacher = str(sharded_teachers["llama"])
    streamed, plain = tmp_path / "streamed.safetensors", tmp_path / "plain.safetensors"
    meta = run_sensitivity(teacher, seeds_file, streamed, SensitivitySettings(), torch.float32,
                           torch.device("cpu"), progress=False, stream=True,
                           offload_dir=tmp_path / "act")
    want_meta = run_sensitivity(teacher, seeds_file, plain, SensitivitySettings(), torch.float32,
                                torch.device("cpu"), progress=False)
    assert meta == want_meta  # fingerprint, sample count, dtype...
    assert_same_sensitivity(load_file(str(streamed)), load_file(str(plain)), rel=1e-5)
    assert not list(tmp_path.glob("act/*")), "kept activations left behind"


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_streamed_matches_in_memory(family, sharded_teachers, seeds_file, tmp_path):
    """Qwen2 (q/k/v biases) with every kept activation spilled to disk; GPT-2 (tied head)."""
    (want, used), samples = in_memory(sharded_teachers[family], seeds_file)
    with ActivationStore(tmp_path, budget=0) as store:
        got, got_used = streamed_sensitivity(SafetensorsWeights(sharded_teachers[family]),
                                             samples, store=store)
        assert store.bytes_written > 0 and store.peak_bytes_in_memory == 0
    assert got_used == used == len(samples)
    assert_same_sensitivity(got, want, rel=1e-5)
    assert not list(tmp_path.glob("paratransfer-activations-*")), "spill folder not removed"


def test_streamed_gpt_neox_reads_renamed_head(seeds_file, tokenizer, tmp_path):
    """GPT-NeoX checkpoints store the head as `embed_out`; transformers 5.x renames it."""
    from paratransfer.demo.tiny import tiny_model

    model = tiny_model("gpt_neox", vocab=len(tokenizer), hidden=48, layers=2, heads=6, mlp=96,
                       seed=5)
    model.save_pretrained(tmp_path / "neox", max_shard_size="40KB")
    weights = SafetensorsWeights(tmp_path / "neox")
    assert weights.checkpoint_key("lm_head.weight") == "embed_out.weight"
    samples = data.load_tokenized(seeds_file, tokenizer, limit=3)
    want, _ = accumulate_sensitivity(load_model(str(tmp_path / "neox")), samples)
    got, _ = streamed_sensitivity(weights, samples)
    assert_same_sensitivity(got, want, rel=1e-5)


def _tensors_from(layer_of_ptr: dict[int, int]) -> set[int]:
    """Decoder layers (by index) whose loaded storage some live tensor still points at."""
    gc.collect()
    return {layer_of_ptr[obj.data_ptr()] for obj in gc.get_objects()
            if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type == "cpu"
            and obj.data_ptr() in layer_of_ptr}


def test_stream_holds_at_most_two_layers(sharded_teachers, seeds_file):
    """Counted from outside: at every layer load, how many layers' parameters are still alive."""
    folder = sharded_teachers["llama"]
    samples = data.load_tokenized(seeds_file, load_tokenizer(str(folder)), limit=2)
    layer_of_ptr: dict[int, int] = {}

    class Watched(SafetensorsWeights):
        def __getitem__(self, name):
            tensor = super().__getitem__(name)
            layer = self.arch.layer_of(name)
            if layer is not None:
                layer_of_ptr[tensor.data_ptr()] = layer
            return tensor

    def watch_loads(teacher: StreamedTeacher, seen: list[int]) -> None:
        """Before each layer load: the layers whose Parameters are alive (weakly referenced)."""
        refs: list[tuple[int, weakref.ref]] = []
        real_load = teacher.load

        def load(names, requires_grad=False):
            layers = {teacher.arch.layer_of(n) for n in names} - {None}
            if layers:
                seen.append(len({layer for layer, ref in refs if ref() is not None}))
            params = real_load(names, requires_grad)
            refs.extend((teacher.arch.layer_of(n), weakref.ref(p)) for n, p in params.items()
                        if teacher.arch.layer_of(n) is not None)
            return params

        teacher.load = load
        teacher.seen_now = lambda: len({layer for layer, ref in refs if ref() is not None})

    weights = Watched(folder)
    weights.arch = arch_for(weights.config)
    teacher, seen = StreamedTeacher(weights), []
    watch_loads(teacher, seen)
    stream_sensitivity(weights, samples, lambda name, tensor: None, teacher=teacher)
    assert len(seen) == 2 * teacher.num_layers  # each layer loaded for forward and backward
    assert max(seen) <= 1, seen  # while a layer loads, at most the one before is still alive
    assert teacher.max_live_layers == 1
    assert teacher.seen_now() == 0 and not _tensors_from(layer_of_ptr)  # nothing leaked

    # The counters do see loaded layers: all four of a teacher loaded whole.
    whole, seen = StreamedTeacher(weights), []
    watch_loads(whole, seen)
    for names in whole.layer_names:
        whole.load(names)
    assert seen == [0, 1, 2, 3] and whole.seen_now() == 4
    assert _tensors_from(layer_of_ptr) == {0, 1, 2, 3}


# --------------------------------------------------------------------------- lazy weights


def test_lazy_weights_match_the_model(sharded_teachers, model_pairs):
    for family, folder in sharded_teachers.items():
        model = load_model(str(model_pairs[family][0]))
        weights = SafetensorsWeights(folder)
        params = dict(model.named_parameters(remove_duplicate=False))
        assert weights.keys() == [n for n, _ in model.named_parameters()]
        assert isinstance(weights, TeacherWeights)
        for name, p in params.items():
            assert name in weights
            assert torch.equal(weights[name], p.detach()), name
        assert fingerprint(weights) == fingerprint(model)
        assert fingerprint(weights) == fingerprint(load_model(str(folder), dtype=torch.bfloat16))
    gpt2 = SafetensorsWeights(sharded_teachers["gpt2"])
    assert gpt2.checkpoint_key("lm_head.weight") == "transformer.wte.weight"  # tied head


def test_lazy_weights_apply_transformers_renames(model_pairs, tmp_path):
    """Old GPT-2 checkpoints store keys without the `transformer.` prefix; LayerNorm gamma/beta."""
    teacher_dir = model_pairs["gpt2"][0]
    model = load_model(str(teacher_dir))
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    folder = tmp_path / "old"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text((teacher_dir / "config.json").read_text())
    weights = SafetensorsWeights(folder)
    assert weights.checkpoint_key("transformer.h.0.attn.c_attn.weight") == "h.0.attn.c_attn.weight"
    assert torch.equal(weights["lm_head.weight"], model.lm_head.weight.detach())
    assert fingerprint(weights) == fingerprint(model)

    state["h.0.attn.c_attn.weight_renamed"] = state.pop("h.0.attn.c_attn.weight")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"cannot match 1 parameters.*c_attn.weight_renamed"):
        SafetensorsWeights(folder)


def test_lazy_weights_refuse_non_safetensors(tmp_path, model_pairs):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((model_pairs["llama"][0] / "config.json").read_text())
    with pytest.raises(UserError, match="model.safetensors"):
        SafetensorsWeights(folder)
    with pytest.raises(UserError, match="not a local model folder"):
        SafetensorsWeights(tmp_path / "absent")


# --------------------------------------------------------------------------- file writer


def test_sensitivity_writer_in_any_order(tmp_path):
    tensors = {"b.weight": torch.rand(3, 5), "a.weight": torch.rand(7), "c.bias": torch.rand(2, 2, 2)}
    path = tmp_path / "s.safetensors"
    with SensitivityWriter(path, {k: v.shape for k, v in tensors.items()}, {"samples": 3}) as w:
        for name in ("c.bias", "a.weight", "b.weight"):
            w.write(name, tensors[name])
    f = SensitivityFile(path)
    assert f.metadata["samples"] == 3 and set(f) == set(tensors)
    for name, value in tensors.items():
        assert torch.equal(f[name], value)
    assert json.loads(json.dumps(f.metadata))  # plain JSON values

    with pytest.raises(RuntimeError, match="never written"):
        with SensitivityWriter(tmp_path / "t.safetensors", {"x": (2,), "y": (3,)}, {}) as w:
            w.write("x", torch.ones(2))
    with SensitivityWriter(tmp_path / "u.safetensors", {"x": (2,)}, {}) as w:
        with pytest.raises(ValueError, match="shape"):
            w.write("x", torch.ones(3))
        w.write("x", torch.ones(2))


def test_cli_refuses_conflicting_flags(model_pairs, seeds_file, tmp_path, capsys):
    from paratransfer.cli.entry import main

    base = ["sensitivity", "--teacher", str(model_pairs["llama"][0]), "--seeds", str(seeds_file),
            "--out", str(tmp_path / "s.safetensors"), "--quiet"]
    assert main([*base, "--stream", "--device-map", "auto"]) == 2
    assert main([*base, "--offload-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--stream and --device-map" in err and "--offload-dir" in err
    assert not (tmp_path / "s.safetensors").exists()


# --------------------------------------------------------------------------- lazy extraction


def test_extract_reads_a_local_teacher_lazily(sharded_teachers, model_pairs, seeds_file,
                                              tmp_path, monkeypatch):
    """With a sensitivity file, run_extract reads the teacher from its files, same adapter."""
    from paratransfer.extract import step as pipeline
    from paratransfer.extract.plan import ExtractSettings

    teacher = str(sharded_teachers["llama"])
    student = str(model_pairs["llama"][1])
    sens = tmp_path / "sens.safetensors"
    run_sensitivity(teacher, seeds_file, sens, SensitivitySettings(max_samples=2), torch.float32,
                    torch.device("cpu"), progress=False)
    settings = ExtractSettings(rank=4)
    assert isinstance(pipeline.extraction_teacher(teacher, sens, torch.float32, "cpu"),
                      SafetensorsWeights)

    loaded = []
    real_load = pipeline.load_model

    def watch(name, *args, **kwargs):
        loaded.append(str(name))
        return real_load(name, *args, **kwargs)

    monkeypatch.setattr(pipeline, "load_model", watch)
    lazy = pipeline.run_extract(teacher, student, tmp_path / "lazy", settings,
                                sensitivity_path=sens, progress=False)
    assert loaded == [student]  # the teacher was never loaded whole
    monkeypatch.setattr("paratransfer.teacher.lazy.has_safetensors", lambda _: False)
    whole = pipeline.run_extract(teacher, student, tmp_path / "whole", settings,
                                 sensitivity_path=sens, progress=False)
    assert loaded == [student, teacher, student]
    assert lazy["selected_layers"] == whole["selected_layers"]
    a = load_file(str(tmp_path / "lazy" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
