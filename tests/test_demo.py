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
