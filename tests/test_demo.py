"""The demo's task family and recipe (the world itself is built by `make demo`, not here)."""

from __future__ import annotations

import json
import random
import re

from paratransfer.demo.world import (
    DEMO_RECIPE,
    arithmetic_records,
    demo_recipe,
    one_step,
    two_step,
    write_jsonl,
)
from paratransfer.experiment.recipe import load_recipe


def test_two_step_answers_are_correct_and_deterministic():
    assert arithmetic_records(20, seed=3) == arithmetic_records(20, seed=3)
    assert arithmetic_records(20, seed=3) != arithmetic_records(20, seed=4)
    rng = random.Random(0)
    for _ in range(200):
        q, a = two_step(rng)
        x, y, z = map(int, re.findall(r"\d+", q))
        assert a.endswith(f"So the answer is {x + y - z}.")
        assert x + y - z > 0


def test_student_family_is_related_but_weaker():
    rng = random.Random(0)
    q, a = one_step(rng)
    x, y = map(int, re.findall(r"\d+", q))
    assert a == f"{x} + {y} = {x + y}. So the answer is {x + y}."
    assert "-" not in a


def test_demo_recipe_validates(tmp_path):
    for name in ("teacher", "student"):
        (tmp_path / name).mkdir()
    for name in ("seeds", "train", "test", "heldout"):
        write_jsonl(tmp_path / f"{name}.jsonl", arithmetic_records(3))
    recipe = load_recipe(demo_recipe(tmp_path))
    assert set(recipe.arms) == set(DEMO_RECIPE["arms"])
    assert recipe.seeds == [1, 2, 3]
    assert {"transfer", "lora", "pissa", "spectrum"} <= set(recipe.arms)
    assert recipe.task.heldout is not None
    assert (tmp_path / "demo.yaml").read_text().startswith("# paratransfer run ")


def test_demo_never_empties_a_folder_that_is_not_a_demo_run(tmp_path, monkeypatch, capsys):
    """`demo --out DIR` on someone's folder is refused before any work (it used to empty it)."""
    import paratransfer.demo.world as demo
    from paratransfer.cli.entry import main

    def no_work(*args, **kwargs):
        raise AssertionError("the demo started working on a folder it must refuse")

    monkeypatch.setattr(demo, "ensure_world", no_work)
    mine = tmp_path / "d"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["demo", "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "is not a demo run" in err and "--overwrite" in err
    assert (mine / "notes.txt").read_text() == "keep"
    # An empty folder or a demo run there is the demo's to (re)use.
    (tmp_path / "empty").mkdir()
    assert demo.demo_out(tmp_path / "empty") == (tmp_path / "empty", False)
    (tmp_path / "earlier" / "recipe.json").parent.mkdir()
    (tmp_path / "earlier" / "recipe.json").write_text("{}")
    assert demo.demo_out(tmp_path / "earlier") == (tmp_path / "earlier", True)
    assert demo.demo_out(mine, overwrite=True) == (mine, False)


def test_world_is_the_same_on_every_build_and_thread_count(tmp_path):
    """A reduced world built twice, under 1 and 2 threads: the same files, byte for byte."""
    import torch

    from paratransfer.demo.world import WorldSpec, build_world

    spec = WorldSpec(teacher=dict(hidden=16, layers=2, heads=2, kv_heads=1, mlp=32, seed=1),
                     student=dict(hidden=8, layers=1, heads=2, kv_heads=1, mlp=16, seed=2),
                     teacher_steps=3, student_steps=2, pretrain_records=64, seeds=4, train=8,
                     heldout=4, test=4)
    before = torch.get_num_threads()
    infos = []
    for threads, name in ((1, "a"), (2, "b")):
        torch.set_num_threads(threads)
        (tmp_path / name).mkdir()
        infos.append(build_world(tmp_path / name, spec, say=lambda line: None))
    torch.set_num_threads(before)
    a, b = (info["checksums"] for info in infos)
    assert a == b and "teacher/model.safetensors" in a and "heldout.jsonl" in a
    assert a == {k: v for k, v in
                 json.loads((tmp_path / "a" / "world.json").read_text())["checksums"].items()}
    assert torch.get_num_threads() == before


def test_distill_demo_recipe_validates(tmp_path):
    for name in ("teacher", "student"):
        (tmp_path / name).mkdir()
    for name in ("seeds", "train", "test", "heldout"):
        write_jsonl(tmp_path / f"{name}.jsonl", arithmetic_records(3))
    recipe = load_recipe(demo_recipe(tmp_path, distill=True))
    assert set(recipe.arms) == {"transfer", "lora", "distill"}
    assert recipe.arms["distill"] == {"init": "standard", "distill": True}
    assert (tmp_path / "demo-distill.yaml").read_text().startswith(
        f"# paratransfer run {tmp_path / 'demo-distill.yaml'} --out out/demo-distill")


TINY_WORLD = dict(teacher=dict(hidden=16, layers=2, heads=2, kv_heads=1, mlp=32, seed=1),
                  student=dict(hidden=8, layers=1, heads=2, kv_heads=1, mlp=16, seed=2),
                  teacher_steps=3, student_steps=2, pretrain_records=64, seeds=4, train=8,
                  heldout=4, test=4)
#: The demo's budget, cut to a few seconds per chain (the mechanism, not the numbers).
TINY_BUDGET = dict(rank=2, alpha=4, max_steps=2, batch_size=4, micro_batch_size=4,
                   eval_every=1, checkpoint_every=1, eval_batch_size=4, max_new_tokens=4,
                   max_samples=4)


def test_study_mode_runs_its_arms_and_seeds_resumably_into_its_own_folder(tmp_path, monkeypatch,
                                                                          capsys):
    """`demo --seeds N --arms ...` on a tiny world: its own folder (out/demo-study), seeds
    1..N, the named arms with their contrasts on both measures; a second call resumes and
    recomputes nothing."""
    from paratransfer.demo import WorldSpec, run_demo

    monkeypatch.chdir(tmp_path)
    spec = WorldSpec(**TINY_WORLD)
    kwargs = dict(cache=tmp_path / "cache", seeds=2, arms="transfer,lora,eva,random", jobs=1,
                  spec=spec, changes=TINY_BUDGET)
    result = run_demo(**kwargs)
    out = tmp_path / "out" / "demo-study"
    assert (out / "results.md").is_file() and not (tmp_path / "out" / "demo").exists()
    assert result["seeds"] == [1, 2] and result["name"] == "demo-study"
    assert {row["arm"] for row in result["arms"]} == {"transfer", "lora", "eva", "random"}
    said = {c["contrast"]: c for c in result["contrasts"]}
    assert {"transfer − lora", "transfer − eva"} <= set(said)
    assert all(c["heldout"]["final"]["n"] == 2 for c in said.values())
    # The random arm extracts once per seed (a random window of the teacher each time).
    assert {p.name for p in (out / "arms" / "random").iterdir()} >= {"adapter-seed1",
                                                                     "adapter-seed2"}
    printed = capsys.readouterr().out
    assert "## Held-out answer-only loss (lower is better)" in printed
    assert "Seeds that would decide" in printed
    again = run_demo(**kwargs)
    assert again["steps"]["ran"] == 0 and again["steps"]["reused"] == result["steps"]["ran"]
    assert again["arms"] == result["arms"]


def test_study_arms_are_checked_before_any_work(monkeypatch, capsys):
    import paratransfer.demo as demo
    from paratransfer.cli import main
    from paratransfer.demo.study import DEFAULT_STUDY_ARMS, study_recipe

    def no_work(*args, **kwargs):
        raise AssertionError("the demo started working on bad arguments")

    monkeypatch.setattr(demo, "ensure_world", no_work)
    assert main(["demo", "--seeds", "4", "--arms", "transfer,nope,lora"]) == 2
    assert "'nope' is not a demo arm" in capsys.readouterr().err
    assert main(["demo", "--arms", "transfer,eva"]) == 2
    assert "baseline arm lora is missing" in capsys.readouterr().err
    assert main(["demo", "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["demo", "--seeds", "5", "--distill"]) == 2
    recipe = study_recipe(DEMO_RECIPE, 10, None)
    assert recipe["seeds"] == list(range(1, 11)) and tuple(recipe["arms"]) == DEFAULT_STUDY_ARMS
    assert recipe["arms"]["random"] == {"reduce": "random"}
    assert {k: v for k, v in recipe.items() if k not in ("name", "seeds", "arms")} == \
        {k: v for k, v in DEMO_RECIPE.items() if k not in ("name", "seeds", "arms")}
    # The default demo is what it was: three seeds, four arms.
    assert DEMO_RECIPE["seeds"] == [1, 2, 3] and set(DEMO_RECIPE["arms"]) == {
        "transfer", "lora", "pissa", "spectrum"}
