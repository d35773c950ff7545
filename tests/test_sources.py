"""Task data from datasets: each task's record rule (checked against the reference records when
the shared data is present), the loaders, and reproducible sampling. Offline: every dataset is
built here from a handful of rows and saved with save_to_disk or as JSON/Parquet files."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import shared_data
from paratransfer.evaluate import get_task
from paratransfer.io.errors import UserError
from paratransfer.sources import DataSettings, build_data
from paratransfer.sources.build import _lowest
from paratransfer.sources.formats import GSM, LIMA, MMLU, SUPER_NI, BadRow, gsm_answer
from paratransfer.tasks.examples import read_examples


def read_jsonl(path: Path) -> list[dict]:
    # split on "\n" only: records may hold U+2028 and other characters `splitlines` breaks at
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def gsm_rows(n: int, start: int = 0) -> list[dict]:
    """GSM8K-shaped rows: a word problem, steps with calculator annotations, "#### N"."""
    rows = []
    for i in range(start, start + n):
        a, b = 3 + i, 4 + 2 * i
        rows.append({"question": f"Tom has {a} apples and buys {b} more. How many now?",
                     "answer": f"He buys {b} more.\nSo he has {a} + {b} = <<{a}+{b}={a + b}>>{a + b}"
                               f"\n#### {a + b}"})
    return rows


def save(tmp_path: Path, name: str, splits: dict[str, list[dict]], features=None) -> Path:
    folder = tmp_path / name
    DatasetDict({k: Dataset.from_list(v, features=features) for k, v in splits.items()}
                ).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def gsm_source(tmp_path_factory) -> Path:
    return save(tmp_path_factory.mktemp("gsm"), "gsm8k",
                {"train": gsm_rows(12), "test": gsm_rows(4, start=100)})


def build(tmp_path, task, source, out="out", **kw) -> tuple[dict, Path]:
    out = tmp_path / out
    cache = kw.pop("cache_dir", tmp_path / "cache")
    info = build_data(DataSettings(task=task, source=str(source), **kw), out, cache_dir=cache)
    return info, out


# --------------------------------------------------------------------------- the record rules


def test_gsm_answer_rule():
    assert gsm_answer("Add 2 and 3: 2+3=<<2+3=5>>5\nDouble it: 5*2=<<5*2=10>>10\n#### 10") == \
        "Answer: Add 2 and 3: 2+3=5 Double it: 5*2=10. So the answer is 10."
    # a sentence already ending with "." gets no second one; the gold keeps its commas
    assert gsm_answer("It costs $1,200.\n#### 1,200") == \
        "Answer: It costs $1,200. So the answer is 1,200."
    assert gsm_answer("  The total is 7.  ") == "Answer: The total is 7."
    with pytest.raises(BadRow, match="no number"):
        gsm_answer("no idea")
    with pytest.raises(BadRow, match='nothing after "####"'):
        gsm_answer("steps\n#### ")


def test_gsm_rule_reproduces_the_reference_records():
    """Every reference GSM record (1,000 training + 32 seeds) from its GSM8K train row."""
    train = read_jsonl(shared_data("gsm8k", "train.jsonl"))
    records = read_jsonl(shared_data("gsm", "gsm_data_1000.jsonl")) + \
        read_jsonl(shared_data("gsm", "sample_gsm.jsonl"))
    for rec in records:
        row = train[int(rec["id"].removeprefix("gsm_"))]
        assert GSM.messages(row) == rec["messages"], rec["id"]


_MMLU_USER = re.compile(r"The following are multiple choice questions \(with answers\) about "
                        r"[^\n]*\.\n\n(?P<q>.*)\nA\. (?P<a>.*?)\nB\. (?P<b>.*?)\n"
                        r"C\. (?P<c>.*?)\nD\. (?P<d>.*?)\nAnswer:", re.S)


def test_mmlu_rule_reproduces_the_reference_layout():
    """Each reference MMLU record, taken apart into its row and rebuilt, is the same record;
    the seeds' bare letter is the training answer cut down."""
    pool = read_jsonl(shared_data("mmlu", "mmlu_data.jsonl"))
    for rec in pool:
        m = _MMLU_USER.fullmatch(rec["messages"][0]["content"])
        assert m, rec["id"]
        row = {"question": m["q"], "choices": [m["a"], m["b"], m["c"], m["d"]],
               "answer": "ABCD".index(rec["messages"][1]["content"][-1]),
               "subject": rec["category"]}
        assert MMLU.messages(row) == rec["messages"], rec["id"]
        assert MMLU.extra(row) == {"category": rec["category"]}
    for rec in read_jsonl(shared_data("mmlu", "sample_mmlu.jsonl")):
        assert MMLU.seed_answer(f"The answer is: {rec['messages'][1]['content']}") == \
            rec["messages"][1]["content"]


def test_super_ni_rule_reproduces_the_reference_layout():
    """The reference records with a definition and two worked examples, rebuilt from parts."""
    checked = 0
    for rec in read_jsonl(shared_data("super_ni", "super_ni_data_1000.jsonl")):
        user = rec["messages"][0]["content"]
        parts = user.split("\n\nInput:\n")
        if len(parts) != 4 or not user.endswith("\nOutput:\n"):
            continue  # the reference's other templates
        examples = [dict(zip(("input", "output"), p.split("\nOutput:\n"), strict=True))
                    for p in parts[1:3]]
        row = {"definition": parts[0], "input": parts[3].removesuffix("\nOutput:\n"),
               "output": rec["messages"][1]["content"], "examples": examples}
        assert SUPER_NI.messages(row) == rec["messages"], rec["id"]
        checked += 1
    assert checked > 200


def test_super_ni_rule_by_hand():
    row = {"definition": "Say the colour. ", "input": "sky", "output": ["blue", "azure"],
           "examples": [{"input": "grass", "output": "green"}, {"input": "snow", "output": "white"},
                        {"input": "coal", "output": "black"}]}
    assert SUPER_NI.messages(row) == [
        {"role": "user", "content": "Say the colour.\n\nInput:\ngrass\nOutput:\ngreen\n\n"
                                    "Input:\nsnow\nOutput:\nwhite\n\nInput:\nsky\nOutput:\n"},
        {"role": "assistant", "content": "blue"}]
    assert SUPER_NI.messages({**row, "examples": None})[0]["content"] == \
        "Say the colour.\n\nInput:\nsky\nOutput:\n"


def test_lima_rule_matches_the_reference_and_keeps_dialogues():
    raw = read_jsonl(shared_data("lima", "lima_data.jsonl"))
    for rec in read_jsonl(shared_data("lima", "lima_data_1000.jsonl")):
        assert LIMA.messages(raw[int(rec["id"].removeprefix("lima_"))]) == rec["messages"]
    three = LIMA.messages({"conversations": ["q1", "a1", "q2", "a2", "q3 (unanswered)"]})
    assert [m["role"] for m in three] == ["user", "assistant", "user", "assistant"]
    with pytest.raises(BadRow, match="no answered turn"):
        LIMA.messages({"conversations": ["only a question"]})


# --------------------------------------------------------------------------- building files


def test_gsm_files_from_a_saved_dataset(tmp_path, gsm_source):
    info, out = build(tmp_path, "gsm", gsm_source, seeds_count=3, train_count=8)
    seeds, train, test = (read_jsonl(out / f"{n}.jsonl") for n in ("seeds", "train", "eval"))
    assert [len(seeds), len(train), len(test)] == [3, 8, 4] == list(info["counts"].values())
    assert seeds == train[:3]  # the seeds are training examples
    assert len({r["id"] for r in train}) == 8
    # eval is the test split, all of it, in source order
    assert [r["id"] for r in test] == [f"gsm_test_{i}" for i in range(4)]
    assert test[0]["messages"][1]["content"] == \
        "Answer: He buys 204 more. So he has 103 + 204 = 307. So the answer is 307."
    # the project's readers and the evaluation task take every record
    task = get_task("gsm")
    for name in ("seeds", "train", "eval"):
        for ex in read_examples(out / f"{name}.jsonl"):
            assert task.to_item(ex).gold == ex.answer.rsplit(" ", 1)[1].rstrip(".")
    meta = json.loads((out / "data.json").read_text())
    assert meta["source"]["kind"] == "disk" and meta["splits"] == {"train": "train", "eval": "test"}
    assert set(meta["files"]) == {"seeds.jsonl", "train.jsonl", "eval.jsonl"}
    assert meta["source"]["splits"]["train"]["rows"] == 12 and meta["seed"] == 0


def test_same_seed_same_bytes_other_seed_other_sample(tmp_path, gsm_source):
    _, a = build(tmp_path, "gsm", gsm_source, "a", seeds_count=3, train_count=6, eval_count=2)
    _, b = build(tmp_path, "gsm", gsm_source, "b", seeds_count=3, train_count=6, eval_count=2)
    for name in ("seeds.jsonl", "train.jsonl", "eval.jsonl", "data.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    _, c = build(tmp_path, "gsm", gsm_source, "c", seeds_count=3, train_count=6, eval_count=2, seed=1)
    ids = {d: [r["id"] for r in read_jsonl(d / "train.jsonl")] for d in (a, c)}
    assert ids[a] != ids[c]
    # a larger sample keeps the smaller one's examples, in the same order
    _, d = build(tmp_path, "gsm", gsm_source, "d", seeds_count=3, train_count=10, eval_count=2)
    assert [r["id"] for r in read_jsonl(d / "train.jsonl")][:6] == ids[a]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), k=st.integers(0, 60), seed=st.integers(0, 2**31))
def test_sampling_is_the_lowest_hashes_and_nested(n, k, seed):
    k = min(k, n)
    order = _lowest(k, range(n), seed, "train", "train")
    brute = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:train:train:{i}".encode()).digest())
    assert order == brute[:k]
    assert _lowest(max(k - 1, 0), range(n), seed, "train", "train") == order[: max(k - 1, 0)]


def test_mmlu_pool_from_dev_and_validation(tmp_path):
    features = Features({"question": Value("string"), "subject": Value("string"),
                         "choices": Sequence(Value("string")),
                         "answer": ClassLabel(names=["A", "B", "C", "D"])})

    def rows(n, subject, shift):
        return [{"question": f"Q{i} on {subject}?", "subject": subject,
                 "choices": [f"w{i}", f"x{i}", f"y{i}", f"z{i}"], "answer": (i + shift) % 4}
                for i in range(n)]

    src = save(tmp_path, "mmlu", {"dev": rows(3, "anatomy", 0), "validation": rows(5, "virology", 1),
                                  "test": rows(4, "college_biology", 2)}, features)
    info, out = build(tmp_path, "mmlu", src, seeds_count=2, train_count=8)
    seeds, train, test = (read_jsonl(out / f"{n}.jsonl") for n in ("seeds", "train", "eval"))
    assert sorted(r["id"] for r in train) == sorted(
        [f"mmlu_dev_{i}" for i in range(3)] + [f"mmlu_validation_{i}" for i in range(5)])
    assert info["source"]["splits"].keys() == {"dev", "validation", "test"}
    first = test[0]
    assert list(first) == ["dataset", "category", "id", "messages"]
    assert first["category"] == "college_biology"
    assert first["messages"][0]["content"] == (
        "The following are multiple choice questions (with answers) about college biology.\n\n"
        "Q0 on college_biology?\nA. w0\nB. x0\nC. y0\nD. z0\nAnswer:")
    assert first["messages"][1]["content"] == "The answer is: C"
    assert [s["messages"][1]["content"] for s in seeds] == \
        [t["messages"][1]["content"].removeprefix("The answer is: ") for t in train[:2]]
    task = get_task("mmlu")
    item = task.to_item(read_examples(out / "eval.jsonl")[0])
    assert (item.gold, item.answer_prefix, item.category) == ("C", "The answer is:", "college_biology")
    assert task.to_item(read_examples(out / "seeds.jsonl")[0]).answer_prefix == ""


def test_super_ni_from_json_files_with_examples_and_ids(tmp_path):
    folder = tmp_path / "ni"
    folder.mkdir()
    for split, n in (("train", 6), ("test", 3)):
        with (folder / f"{split}.jsonl").open("w") as fh:
            for i in range(n):
                fh.write(json.dumps({
                    "task_name": "task001_colours", "id": f"task001-{split}{i}",
                    "definition": "Name the colour.", "inputs": f"thing {i}", "targets": f"c{i}",
                    "pos": [{"input": "sky", "output": "blue"}]}) + "\n")
    info, out = build(tmp_path, "super_ni", folder, seeds_count=2, train_count=4,
                      columns="examples=pos")
    train = read_jsonl(out / "train.jsonl")
    assert info["source"]["kind"] == "files"
    assert all(r["id"].startswith("super_ni_task001-train") for r in train)
    assert train[0]["messages"][0]["content"].startswith(
        "Name the colour.\n\nInput:\nsky\nOutput:\nblue\n\nInput:\nthing ")
    assert info["columns"]["examples"] == "pos"


def test_lima_dialogues_and_held_out_rest(tmp_path):
    convs = [[f"q{i}", f"a{i}"] for i in range(6)] + [["q6", "a6", "q6b", "a6b"], ["q7", "a7", "x"]]
    path = tmp_path / "lima.parquet"
    Dataset.from_list([{"conversations": c, "source": "s"} for c in convs]).to_parquet(str(path))
    info, out = build(tmp_path, "lima", path, seeds_count=2, train_count=5)
    train, rest = read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")
    assert info["splits"] == {"train": "train", "eval": "rest"}
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in rest)
    assert len(train) + len(rest) == len(convs)
    assert [r["id"] for r in rest] == sorted((r["id"] for r in rest), key=lambda s: int(s.rsplit("_", 1)[1]))
    by_id = {r["id"]: r for r in train + rest}
    assert len(by_id["lima_train_6"]["messages"]) == 4
    assert [m["content"] for m in by_id["lima_train_7"]["messages"]] == ["q7", "a7"]
    read_examples(out / "eval.jsonl")


def test_any_dataset_through_a_column_mapping(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say {i}.", "ctx": "" if i % 2 else f"c{i}",
                                        "response": f"{i}"}) + "\n" for i in range(7)))
    info, out = build(tmp_path, "open", path, seeds_count=1, train_count=4, eval_split="rest",
                      columns="user=prompt,assistant=response,input=ctx")
    recs = read_jsonl(out / "train.jsonl") + read_jsonl(out / "eval.jsonl")
    by_id = {r["id"]: r["messages"] for r in recs}
    assert by_id["open_train_0"][0]["content"] == "Say 0.\n\nc0"
    assert by_id["open_train_1"] == [{"role": "user", "content": "Say 1."},
                                     {"role": "assistant", "content": "1"}]
    assert info["columns"] == {"user": "prompt", "assistant": "response", "input": "ctx"}


def test_eval_only_from_any_split(tmp_path, gsm_source):
    """--train-count 0: no seeds or training file, the eval file from any split."""
    info, out = build(tmp_path, "gsm", gsm_source, seeds_count=0, train_count=0, eval_split="train",
                      eval_count=5)
    assert sorted(p.name for p in out.iterdir()) == ["data.json", "eval.jsonl"]
    assert info["counts"] == {"seeds": 0, "train": 0, "eval": 5}
    assert info["splits"] == {"train": None, "eval": "train"}
    ids = [r["id"] for r in read_jsonl(out / "eval.jsonl")]
    assert ids == sorted(ids, key=lambda s: int(s.rsplit("_", 1)[1])) and len(set(ids)) == 5


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("kw, needle", [
    (dict(task="gsm9k"), "unknown task 'gsm9k' (expected one of: gsm, mmlu"),
    (dict(columns="question"), "--columns: 'question' is not FIELD=COLUMN"),
    (dict(columns="prompt=q"), "--columns: task gsm has no field 'prompt'"),
    (dict(columns="question=prompt"), "split 'train' has no column 'prompt' for field question"),
    (dict(train_count=13), "--train-count 13: split 'train' of {src} has only 12 rows"),
    (dict(eval_count=5), "--eval-count 5: split 'test' of {src} has 4 rows"),
    (dict(seeds_count=9, train_count=8), "--seeds-count 9 is larger than --train-count 8"),
    (dict(train_count=-1), "--train-count: must be an integer of at least 0"),
    (dict(train_split="dev"), "{src}: no split 'dev' (splits: train, test)"),
    (dict(eval_split="train"), "--eval-split 'train' is the training split"),
    (dict(config="main"), "--config: only for hub dataset ids"),
])
def test_bad_requests_are_one_line_and_write_nothing(tmp_path, gsm_source, kw, needle):
    kw = {"task": "gsm", "seeds_count": 3, "train_count": 8, **kw}
    task = kw.pop("task")
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        build_data(DataSettings(task=task, source=str(gsm_source), **kw), out)
    message = str(e.value)
    assert needle.format(src=gsm_source) in message and "\n" not in message
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_a_bad_row_is_named(tmp_path):
    rows = gsm_rows(3) + [{"question": "What?", "answer": "I cannot say.\n#### "}]
    src = save(tmp_path, "bad", {"train": rows, "test": gsm_rows(1)})
    with pytest.raises(UserError, match=r"bad: split 'train' row 3: answer has nothing after"):
        build(tmp_path, "gsm", src, seeds_count=1, train_count=4)


def test_sources_that_cannot_load(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"nope\.jsonl: no such file or folder"):
        build(tmp_path, "gsm", "nope.jsonl")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(UserError, match=r"unknown file type '\.txt'"):
        build(tmp_path, "gsm", tmp_path / "data.txt")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(UserError, match=r"broken\.jsonl:2: invalid JSON"):
        build(tmp_path, "gsm", broken)
    # a hub id without a network: one line naming it (offline, nothing is fetched)
    with pytest.raises(UserError, match=r"^openai/gsm8k: could not load it: "):
        build(tmp_path, "gsm", "openai/gsm8k")


# --------------------------------------------------------------------------- local files


def test_changed_rows_with_the_same_mtime_are_read_again(tmp_path):
    """The datasets cache is keyed on a local file's path and mtime: rows that changed under a
    restored mtime must still reach a new --out (issue 23, item 3), and data.json records the
    source's SHA-256."""
    import os

    src = tmp_path / "qa.jsonl"

    def write(rows):
        src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.utime(src, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))

    first = gsm_rows(6)
    write(first)
    info1, out1 = build(tmp_path, "gsm", src, out="one", seeds_count=1, train_count=5,
                        eval_split="rest")
    second = [dict(r, question=r["question"].replace("Tom", "Ann")) for r in first]
    write(second)  # same length, same mtime, other rows
    assert src.stat().st_size == sum(len(json.dumps(r)) + 1 for r in first)
    info2, out2 = build(tmp_path, "gsm", src, out="two", seeds_count=1, train_count=5,
                        eval_split="rest")
    assert all("Ann" in r["messages"][0]["content"] for r in read_jsonl(out2 / "train.jsonl"))
    assert all("Tom" in r["messages"][0]["content"] for r in read_jsonl(out1 / "train.jsonl"))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert info2["source"]["sha256"] == {"qa.jsonl": digest} != info1["source"]["sha256"]


@pytest.mark.parametrize("name, text, needle", [
    ("bad.jsonl", '{"question": "a", "answer": "1"}\n{oops\n',
     r"bad\.jsonl:2: invalid JSON: Expecting property name"),
    ("bad.jsonl", '{"question": "a", "answer": "1"}\n[1, 2]\n',
     r"bad\.jsonl:2: a JSON list \(expected one JSON object per line\)"),
    ("bad.jsonl", '{"question": "\\ud800", "answer": "1"}\n', r"bad\.jsonl:1: .*lone surrogate"),
    ("empty.jsonl", "", r"empty\.jsonl: empty \(expected rows of data\)"),
    ("blank.csv", "\n\n", r"blank\.csv: empty"),
    ("bad.csv", 'question,answer\n"q1","a1"\n"q2","a2",extra\n',
     r"bad\.csv:3: 3 fields, the header has 2"),
    ("bad.json", '[{"question": "a"}, 3]', r"bad\.json: item 1 is int"),
])
def test_malformed_local_files_are_named_with_their_line(tmp_path, name, text, needle):
    """`data` on a malformed local JSONL/CSV (issue 23, item 15): FILE:LINE, not the library's
    "An error occurred while generating the dataset" or a StopIteration."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=needle) as e:
        build(tmp_path, "gsm", path, seeds_count=1, train_count=1)
    assert "\n" not in str(e.value) and "generating the dataset" not in str(e.value)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / f"train{path.suffix}").write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=r"folder/train"):
        build(tmp_path, "gsm", folder, seeds_count=1, train_count=1)


def test_train_count_zero_means_no_seeds_either(tmp_path, gsm_source):
    """`--train-count 0` alone (help: "0: no seeds or train file") is not refused for the
    default --seeds-count (issue 23, item 19)."""
    info, out = build(tmp_path, "gsm", gsm_source, train_count=0, eval_split="train",
                      eval_count=3)
    assert info["counts"] == {"seeds": 0, "train": 0, "eval": 3}
    assert sorted(p.name for p in out.iterdir()) == ["data.json", "eval.jsonl"]
