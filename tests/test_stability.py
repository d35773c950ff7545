"""The stability report: a subset's sensitivity is the sum of its samples', a draw chooses what
`extract` would choose from those seeds, identical samples agree everywhere, the figures are
what brute force says, and the command behaves like the others (atomic outputs, one-line errors)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import shared_data
from paratransfer.cli.entry import main
from paratransfer.demo.world import arithmetic_records, write_jsonl
from paratransfer.extract.plan import ExtractSettings
from paratransfer.extract.step import run_extract
from paratransfer.io.errors import UserError
from paratransfer.sensitivity.accumulate import SensitivityFile
from paratransfer.sensitivity.step import SensitivitySettings, run_sensitivity
from paratransfer.stability.figures import (
    chance_window_iou,
    jaccard,
    orthonormal_basis,
    subspace_similarity,
    window_iou,
)
from paratransfer.stability.pool import StabilitySettings, compute_pool, draw_subsets, run_stability
from paratransfer.teacher.models import load_model
from tolerances import tolerance

FAMILIES = ("embed", "q", "k", "v", "o", "gate", "up", "down", "head")


def stability(pair, seeds: Path, out: Path, sizes=(2, 3), draws=2, seed=0, rank=4, **kw) -> dict:
    teacher, student = pair
    return run_stability(str(teacher), str(student), seeds, out,
                         StabilitySettings(sizes, draws, seed), ExtractSettings(rank=rank),
                         SensitivitySettings(**kw), progress=False)


def every_draw(report: dict):
    for s in report["sizes"]:
        yield from s["draws"]


# --------------------------------------------------------------------------- the sums


def test_subset_sensitivity_is_the_directly_computed_sensitivity(model_pairs, tmp_path):
    """Σ of per-sample files over a subset = `paratransfer sensitivity` on that subset's seeds;
    a sample whose answer is truncated away is left out of the pool, as sensitivity leaves it."""
    teacher_dir = str(model_pairs["llama"][0])
    records = arithmetic_records(5, seed=3)
    long = {"messages": [{"role": "user", "content": "x" * 300},
                         {"role": "assistant", "content": "Answer: 1."}]}
    pool_file = write_jsonl(tmp_path / "pool.jsonl", records[:2] + [long] + records[2:])
    settings = SensitivitySettings(max_length=200)
    from paratransfer.stability.pool import _pool_samples

    samples = _pool_samples(teacher_dir, pool_file, settings)
    (tmp_path / "work").mkdir()
    pool = compute_pool(load_model(teacher_dir), samples, tmp_path / "work", {}, progress=False)
    assert pool.indices == [0, 1, 3, 4, 5] and pool.considered == 6
    first = SensitivityFile(pool.files[0].path)  # each per-sample file is a sensitivity file
    assert set(first) == set(pool.files[0])
    assert all(torch.equal(first[n], pool.files[0][n]) for n in first)

    members = [0, 2, 4]  # pool positions: records 0, 2 and 4
    direct = tmp_path / "direct.safetensors"
    run_sensitivity(teacher_dir, write_jsonl(tmp_path / "subset.jsonl",
                                             [records[i] for i in members]),
                    direct, settings, torch.float32, torch.device("cpu"), progress=False)
    want = SensitivityFile(direct)
    got = pool.subset(members)
    assert set(got) == set(want)
    # Sums of non-negative terms: a few roundings of relative size eps each, elementwise.
    rtol = tolerance(torch.float32)["rtol"]
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=0, msg=name)
    other = pool.subset([0, 1, 3])  # the test can tell subsets apart
    assert any(not torch.allclose(other[n], want[n], rtol=1e-3) for n in want)


# --------------------------------------------------------------------------- whole runs


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_identical_samples_agree_at_every_size(family, model_pairs, tmp_path):
    """A pool of one sample repeated: every subset's sensitivity is a multiple of the pool's.
    Sizes are powers of two so the multiples are exact in float32, and nothing can tip a
    near-tie one way in a draw and the other way in the pool."""
    record = arithmetic_records(1, seed=11)[0]
    pool = write_jsonl(tmp_path / "same.jsonl", [dict(record, id=f"s{i}") for i in range(8)])
    report = stability(model_pairs[family], pool, tmp_path / "out", sizes=(1, 2, 4, 8), draws=3)
    t = tolerance(torch.float64)
    one = pytest.approx(1.0, rel=t["rtol"], abs=t["atol"])
    assert [s["size"] for s in report["sizes"]] == [1, 2, 4, 8]
    for s in report["sizes"]:
        assert s["layers_exact"] == 1.0
        assert s["layer_frequency"] == [float(i in report["full_pool"]["selected_layers"])
                                        for i in range(len(s["layer_frequency"]))]
    windows, spaces = set(), set()
    for d in every_draw(report):
        assert d["layers"] == 1.0
        assert d["windows"] == report["full_pool"]["windows"]
        for fam, v in d["window_iou"].items():
            windows.add(fam)
            assert v == 1.0, fam
        for key in ("subspace", "subspace_out", "subspace_in"):
            for fam, v in d[key].items():
                spaces.add(fam)
                assert v == one, (key, fam)
    # GPT-2 has no gate, and its head is tied to the embedding (covered by embed's adapter).
    assert windows == set(FAMILIES) - ({"gate", "head"} if family == "gpt2" else set())
    # GPT-2's fused c_attn is one student module: one subspace family for q, k and v.
    assert ("q+k+v" in spaces) == (family == "gpt2")


def decisive(values: list[float], k: int = 1) -> bool:
    """Whether the k-th best value beats the next by far more than float32 rounding could
    move them (the choice then cannot depend on how the sums were ordered)."""
    top = sorted(values, reverse=True)
    if len(top) <= k:
        return True
    # Relative only: sums of non-negative terms are off by a few roundings of their own size,
    # whatever the scale of the sensitivity (an absolute tolerance would not be).
    return top[k - 1] - top[k] > 10 * tolerance(torch.float32)["rtol"] * abs(top[0])


def test_a_draw_chooses_what_extract_chooses_from_those_seeds(model_pairs, seeds_file, tmp_path):
    """The oracle: `paratransfer extract` run on a draw's seeds (its own sensitivity, computed
    directly) selects the same layers and the same windows as the draw, wherever the direct
    choice is clear of rounding."""
    from paratransfer.arch import arch_for
    from paratransfer.extract.strategies import window_sums

    teacher, student = model_pairs["llama"]
    spec_of = {m.path: m for m in arch_for(load_model(str(teacher))).modules()}
    report = stability(model_pairs["llama"], seeds_file, tmp_path / "stab", sizes=(3,), draws=2)
    records = [json.loads(line) for line in seeds_file.read_text().splitlines()]
    checked = 0
    for n, draw in enumerate(report["sizes"][0]["draws"]):
        subset = write_jsonl(tmp_path / f"draw{n}.jsonl", [records[i] for i in draw["samples"]])
        sens = tmp_path / f"sens{n}.safetensors"
        run_sensitivity(str(teacher), subset, sens, SensitivitySettings(), torch.float32,
                        torch.device("cpu"), progress=False)
        folder = tmp_path / f"adapter{n}"
        run_extract(str(teacher), str(student), folder, ExtractSettings(rank=4), seeds=subset,
                    sensitivity_path=sens, progress=False)
        direct = json.loads((folder / "transfer.json").read_text())
        if decisive(direct["layer_scores"], k=len(direct["selected_layers"])):
            assert direct["selected_layers"] == draw["selected_layers"]
            checked += 1
        values = SensitivityFile(sens)
        for e in direct["modules"]:
            key = f"{e['teacher_name']} ({e['role']})"
            path = next(p for p in spec_of if e["teacher_name"].endswith(f"{p}.weight"))
            part = spec_of[path].to_linear(values[e["teacher_name"]])
            if decisive(window_sums(part, *e["student_shape"]).flatten().tolist()):
                assert draw["windows"][key] == e["window"], key
                checked += 1
    assert checked >= 0.9 * 2 * (1 + len(draw["windows"]))  # nearly every choice was clear


def test_reproducible_for_a_seed(model_pairs, seeds_file, tmp_path):
    runs = [stability(model_pairs["qwen2"], seeds_file, tmp_path / name, seed=seed)
            for name, seed in (("a", 7), ("b", 7), ("c", 8))]
    assert all(r["timing"]["seconds"] >= 0 and "seconds" not in r for r in runs)
    for r in runs:
        r.pop("timing")
    a, b, c = (json.loads(json.dumps(r)) for r in runs)
    assert a == b
    assert [d["samples"] for d in every_draw(a)] != [d["samples"] for d in every_draw(c)]
    saved = json.loads((tmp_path / "a" / "stability.json").read_text())
    saved.pop("timing")  # wall-clock time sits under timing, apart from everything else
    assert saved == a


def test_draws_are_subsets_of_their_size_independent_of_the_other_sizes():
    both = draw_subsets(10, [3, 6], draws=4, seed=5)
    assert both[6] == draw_subsets(10, [6], draws=4, seed=5)[6]
    for k, subsets in both.items():
        for s in subsets:
            assert len(s) == k == len(set(s)) and s == sorted(s) and 0 <= s[0] and s[-1] < 10
    assert draw_subsets(10, [3], 4, seed=6) != draw_subsets(10, [3], 4, seed=5)


def test_real_gsm_seed_file(model_pairs, tmp_path):
    """The project's 32 GSM seed examples, on a tiny random pair: every figure a fraction."""
    seeds = shared_data("gsm", "sample_gsm.jsonl")
    report = stability(model_pairs["llama"], seeds, tmp_path / "gsm", sizes=(8, 16), draws=3)
    assert report["pool"]["samples"] == 32
    for d in every_draw(report):
        assert len(d["samples"]) in (8, 16)
        for key in ("window_iou", "subspace", "subspace_out", "subspace_in"):
            assert all(0.0 <= v <= 1.0 + 1e-12 for v in d[key].values())
    for name in ("stability.json", "stability.md", "stability.png"):
        assert (tmp_path / "gsm" / name).stat().st_size > 0


# --------------------------------------------------------------------------- the figures


def test_jaccard():
    assert jaccard([1, 2, 3], [2, 3, 4]) == 0.5
    assert jaccard([0, 5], [0, 5]) == 1.0 and jaccard([1], [2]) == 0.0 and jaccard([], []) == 1.0


windows_in = st.tuples(st.integers(0, 8), st.integers(0, 8), st.integers(1, 6), st.integers(1, 6))


def cells(w) -> set[tuple[int, int]]:
    r, c, h, wd = w
    return {(i, j) for i in range(r, r + h) for j in range(c, c + wd)}


@settings(max_examples=200, deadline=None)
@given(windows_in, windows_in)
def test_window_iou_is_brute_force_iou_of_cells(a, b):
    ca, cb = cells(a), cells(b)
    assert window_iou(a, b) == pytest.approx(len(ca & cb) / len(ca | cb), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.data())
def test_chance_window_iou_averages_every_position(m, n, data):
    h, w = data.draw(st.integers(1, m)), data.draw(st.integers(1, n))
    r, c = data.draw(st.integers(0, m - h)), data.draw(st.integers(0, n - w))
    every = [window_iou((r, c, h, w), (i, j, h, w))
             for i in range(m - h + 1) for j in range(n - w + 1)]
    assert chance_window_iou((m, n), (r, c, h, w)) == pytest.approx(sum(every) / len(every),
                                                                   rel=1e-12)


def test_subspace_similarity_known_angles():
    e = torch.eye(6, dtype=torch.float64)
    a, b = 0.3, 1.1
    q1 = e[:, :2]
    q2 = torch.stack([math.cos(a) * e[0] + math.sin(a) * e[2],
                      math.cos(b) * e[1] + math.sin(b) * e[3]], dim=1)
    assert subspace_similarity(q1, q2) == pytest.approx((math.cos(a) ** 2 + math.cos(b) ** 2) / 2)
    assert subspace_similarity(q1, q1) == pytest.approx(1.0)
    assert subspace_similarity(q1, e[:, 2:4]) == pytest.approx(0.0)
    assert subspace_similarity(q1, e[:, 2:2]) == 0.0  # one side empty: nothing shared
    assert subspace_similarity(e[:, :0], e[:, :0]) is None


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(5, 9))
def test_subspace_similarity_sees_spans_not_bases(seed, r, m):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, r, generator=g, dtype=torch.float64)
    y = torch.randn(m, r, generator=g, dtype=torch.float64)
    mix = torch.randn(r, r, generator=g, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
    bx, by = orthonormal_basis(x), orthonormal_basis(y)
    assert subspace_similarity(bx, orthonormal_basis(x @ mix)) == pytest.approx(1.0)
    s = subspace_similarity(bx, by)
    assert 0.0 <= s <= 1.0 + 1e-12 and s == pytest.approx(subspace_similarity(by, bx))


def test_orthonormal_basis_has_the_rank_of_the_factors():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(7, 2, generator=g) @ torch.randn(2, 4, generator=g)  # rank 2 in float32
    q = orthonormal_basis(low)
    assert q.shape == (7, 2)
    torch.testing.assert_close(q.mT @ q, torch.eye(2, dtype=torch.float64))
    assert orthonormal_basis(torch.zeros(5, 3)).shape == (5, 0)


# --------------------------------------------------------------------------- the command


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line_error(code: int, err: str, *needles: str) -> None:
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in errors[0], errors[0]


def test_cli_writes_the_report_atomically(capsys, model_pairs, seeds_file, tmp_path):
    teacher, student = model_pairs["llama"]
    out, work = tmp_path / "report", tmp_path / "scratch"
    argv = ["stability", "--teacher", teacher, "--student", student, "--seeds", seeds_file,
            "--out", out, "--sizes", "2,4", "--draws", "2", "--rank", "4", "--quiet",
            "--work-dir", work]
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "2 seeds: layers Jaccard" in printed and "4 seeds" in printed
    assert sorted(p.name for p in out.iterdir()) == ["stability.json", "stability.md",
                                                     "stability.png"]
    assert list(work.iterdir()) == []  # the per-sample files are gone
    assert not list(tmp_path.glob(".report.partial-*"))
    md = (out / "stability.md").read_text()
    assert "| *chance* |" in md and "| 4 |" in md
    code, err = run_cli(capsys, *argv)
    one_line_error(code, err, "already exists", "--overwrite")


@pytest.mark.parametrize("flags,needles", [
    (["--sizes", "2,9"], ["--sizes", "9", "larger than the pool (5"]),
    (["--sizes", "2,x"], ["--sizes", "comma-separated"]),
    (["--sizes", "2,2"], ["--sizes", "repeated"]),
    (["--draws", "0"], ["--draws", "at least 1"]),
    (["--reduce", "rows-cols"], ["reduce", "window"]),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(capsys, model_pairs, seeds_file, tmp_path,
                                                      flags, needles):
    teacher, student = model_pairs["llama"]
    out = tmp_path / "report"
    code, err = run_cli(capsys, "stability", "--teacher", teacher, "--student", student,
                        "--seeds", seeds_file, "--out", out, "--quiet", *flags)
    one_line_error(code, err, *needles)
    assert not out.exists() and not list(tmp_path.glob(".report.partial-*"))


def test_default_sizes_stay_below_the_pool():
    assert StabilitySettings().sizes_for(40) == (8, 16, 32)
    assert StabilitySettings().sizes_for(5) == (2,)
    with pytest.raises(UserError, match="larger than the pool"):
        StabilitySettings((4, 64)).sizes_for(32)


# --------------------------------------------------------------------------- recipes


def recipe_file(tmp_path: Path, pair, seeds: Path, **extra) -> Path:
    teacher, student = pair
    raw = {"teacher": str(teacher), "student": str(student),
           "task": {"type": "gsm", "seeds": str(seeds),
                    "train": str(write_jsonl(tmp_path / "train.jsonl", arithmetic_records(4, 5))),
                    "eval": str(write_jsonl(tmp_path / "test.jsonl", arithmetic_records(2, 6)))},
           "seeds": [1], "references": [], "rank": 4, "alpha": 8, "max_length": 160, "max_steps": 1,
           "batch_size": 2, "micro_batch_size": 2, "limit": 2, "max_new_tokens": 4,
           "eval_batch_size": 2, "dtype": "float32", "device": "cpu", **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("value,needle", [
    ({"sizes": [2], "draw": 3}, "stability.draw: unknown key"),
    ({"sizes": 2}, "stability.sizes: expected a list"),
    ({"sizes": [2, 6]}, "stability.sizes: 6 is larger than the pool (5 records"),
    ({"draws": -1}, "stability: --draws: must be at least 1"),
])
def test_recipe_stability_is_checked_before_work(model_pairs, seeds_file, tmp_path, value, needle):
    from paratransfer.experiment.recipe import load_recipe

    with pytest.raises(UserError, match=f"recipe.yaml: {needle}".replace("(", r"\(")):
        load_recipe(recipe_file(tmp_path, model_pairs["llama"], seeds_file, stability=value))
    with pytest.raises(UserError, match="reduce must be one of window"):
        load_recipe(recipe_file(tmp_path, model_pairs["llama"], seeds_file, reduce="rows-cols",
                                stability={"sizes": [2]}))


def test_run_writes_the_report_beside_the_results(model_pairs, seeds_file, tmp_path):
    from paratransfer.experiment.recipe import load_recipe
    from paratransfer.experiment.runner import run_experiment

    recipe = load_recipe(recipe_file(tmp_path, model_pairs["llama"], seeds_file,
                                     stability={"sizes": [2, 4], "draws": 2, "seed": 3}))
    out = tmp_path / "run"
    run_experiment(recipe, out, progress=False, on_step=lambda m: None)
    report = json.loads((out / "stability" / "stability.json").read_text())
    assert [s["size"] for s in report["sizes"]] == [2, 4]
    assert report["settings"]["seed"] == 3 and report["settings"]["extract"]["rank"] == 4
    assert (out / "results.json").is_file()
    assert json.loads((out / "recipe.json").read_text())["stability"]["sizes"] == [2, 4]
    log: list[str] = []
    run_experiment(recipe, out, resume=True, progress=False, on_step=log.append)
    assert "[done] stability over seed subsets" in log
