"""`paratransfer data`: seed / train / eval JSONL files from a source, sampled reproducibly.

The sampling rule (`RULE`, also written to data.json): every row of the training split gets the
rank SHA-256("SEED:train:SPLIT:ROW"); the training examples are the `train_count` lowest-ranked
rows, in rank order, and the seeds are the first `seeds_count` of them. So the seeds are always
training examples, as in the paper (its 32 seeds are drawn from its 1,000 training examples, so
what sensitivity sees is what fine-tuning sees), and a larger --train-count keeps the smaller
one's examples. A hash rather than `Dataset.shuffle(seed)` (NumPy's generator) makes the sample a
function of the seed and row numbers alone, whatever the library versions. The eval file is the
eval split in source order, or its `eval_count` lowest-ranked rows ("SEED:eval:SPLIT:ROW") in
source order; eval split "rest" is the training split's rows not drawn for training.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paratransfer.io.errors import UserError
from paratransfer.io.outputs import atomic_dir, check_output_path, write_json
from paratransfer.sources.formats import BadRow, TaskFormat, get_format, parse_columns
from paratransfer.sources.loading import Source, load_source, pick_split
from paratransfer.tasks.examples import example_from_record, file_digest

RULE = ("train = the --train-count rows of the training split with the lowest "
        "SHA-256('SEED:train:SPLIT:ROW'), in that order; seeds = the first --seeds-count of them "
        "(seeds are training examples); eval = the eval split in source order, or its "
        "--eval-count rows with the lowest SHA-256('SEED:eval:SPLIT:ROW'), in source order; "
        "eval split 'rest' = training-split rows not in train")

FILES = ("seeds", "train", "eval")


@dataclass(frozen=True)
class DataSettings:
    """What `paratransfer data` builds; defaults are the paper's (32 seeds, 1,000 examples)."""

    task: str
    source: str
    config: str | None = None
    revision: str | None = None
    columns: str | None = None        # "FIELD=COLUMN,..." over the task's defaults
    train_split: str | None = None    # default: the task's
    eval_split: str | None = None     # default: the task's; "rest": training rows not drawn
    seeds_count: int = 32
    train_count: int = 1000
    eval_count: int | None = None     # None: all of the eval split
    seed: int = 0

    def check(self) -> None:
        """Refuse impossible counts before anything is loaded."""
        for flag, value in (("--seeds-count", self.seeds_count), ("--train-count", self.train_count),
                            ("--eval-count", self.eval_count), ("--seed", self.seed)):
            if value is None and flag == "--eval-count":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"{flag}: must be an integer of at least 0, got {value!r}")
        if self.train_count and self.seeds_count > self.train_count:
            raise UserError(f"--seeds-count {self.seeds_count} is larger than --train-count "
                            f"{self.train_count} (the seeds are drawn from the training examples)")
        if self.train_count == 0 and self.eval_count == 0:
            raise UserError("--seeds-count, --train-count and --eval-count are all 0 (nothing to write)")


class _Pool:
    """The rows of one split spec ("dev+validation" is two parts), numbered 0..n-1."""

    def __init__(self, label: str, parts: list[tuple[str, Any]]):
        self.label = label
        self.parts = parts
        self.starts, n = [], 0
        for _, ds in parts:
            self.starts.append(n)
            n += len(ds)
        self.size = n

    def locate(self, i: int) -> tuple[str, int]:
        """(part name, row in that part) of pool row i."""
        k = max(j for j, s in enumerate(self.starts) if s <= i)
        return self.parts[k][0], i - self.starts[k]

    def rows(self, indices: list[int], columns: dict[str, str | None]) -> list[dict[str, Any]]:
        """Field name -> value for each pool row in `indices` (None for an unmapped field)."""
        wanted = {f: c for f, c in columns.items() if c is not None}
        by_part: dict[int, list[tuple[int, int]]] = {}
        for pos, i in enumerate(indices):
            k = max(j for j, s in enumerate(self.starts) if s <= i)
            by_part.setdefault(k, []).append((pos, i - self.starts[k]))
        out: list[dict[str, Any]] = [{} for _ in indices]
        for k, items in by_part.items():
            ds = self.parts[k][1]
            present = {f: c for f, c in wanted.items() if c in ds.column_names}
            batch = ds.select_columns(sorted(set(present.values())))[[r for _, r in items]]
            for j, (pos, _) in enumerate(items):
                out[pos] = {f: (batch[present[f]][j] if f in present else None) for f in columns}
        return out


def _rank(seed: int, role: str, label: str, i: int) -> bytes:
    return hashlib.sha256(f"{seed}:{role}:{label}:{i}".encode()).digest()


def _lowest(k: int, candidates: Iterable[int], seed: int, role: str, label: str) -> list[int]:
    """The k candidates with the lowest rank, in rank order."""
    return heapq.nsmallest(k, candidates, key=lambda i: _rank(seed, role, label, i))


def _check_columns(fmt: TaskFormat, pool: _Pool, columns: dict[str, str | None], where: str) -> None:
    """Every required field's column is in every part of the pool."""
    for part, ds in pool.parts:
        for f in fmt.all_fields:
            col = columns[f.name]
            if f.required and col not in ds.column_names:
                raise UserError(
                    f"{where}: split {part!r} has no column {col!r} for field {f.name} "
                    f"(columns: {', '.join(ds.column_names)}; map one with --columns {f.name}=COLUMN)")


def _records(fmt: TaskFormat, pool: _Pool, indices: list[int], columns: dict[str, str | None],
             where: str) -> list[dict[str, Any]]:
    """The project's records for pool rows `indices`, each checked by the readers and the task."""
    from paratransfer.evaluate import BadExample, get_task

    task = get_task(fmt.evaluate_task)
    records = []
    for i, row in zip(indices, pool.rows(indices, columns), strict=True):
        part, r = pool.locate(i)
        at = f"{where}: split {part!r} row {r}"
        try:
            messages = fmt.messages(row)
            rid = row.get("id")
            if isinstance(rid, bool) or rid is not None and not isinstance(rid, (str, int)):
                raise BadRow(f"id is {type(rid).__name__} (expected text or an integer)")
        except BadRow as e:
            raise UserError(f"{at}: {e} (columns: {_shown(columns)})") from None
        record = {"dataset": fmt.name, **fmt.extra(row),
                  "id": f"{fmt.name}_{rid}" if rid is not None else f"{fmt.name}_{part}_{r}",
                  "messages": messages}
        try:
            task.to_item(example_from_record(record, source=at, default_id=record["id"]))
        except BadExample as e:
            raise UserError(f"{at}: {e}") from None
        records.append(record)
    return records


def _shown(columns: dict[str, str | None]) -> str:
    return ",".join(f"{f}={c}" for f, c in columns.items() if c is not None)


def _as_seed(fmt: TaskFormat, record: dict[str, Any]) -> dict[str, Any]:
    if fmt.seed_answer is None:
        return record
    messages = [*record["messages"][:-1],
                {"role": "assistant", "content": fmt.seed_answer(record["messages"][-1]["content"])}]
    return {**record, "messages": messages}


def _unique_ids(records: list[dict[str, Any]], name: str) -> None:
    seen: set[str] = set()
    for rec in records:
        if rec["id"] in seen:
            raise UserError(f"{name}: id {rec['id']!r} occurs twice (expected unique ids; "
                            "map another column with --columns id=COLUMN)")
        seen.add(rec["id"])


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _fingerprint(ds: Any) -> str | None:
    return getattr(ds, "_fingerprint", None)  # the library's content/operation hash


def build_data(settings: DataSettings, out: str | Path, *, overwrite: bool = False,
               cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Write OUT/seeds.jsonl, train.jsonl, eval.jsonl and data.json; return data.json's content."""
    import datasets

    fmt = get_format(settings.task)
    settings.check()
    columns = parse_columns(fmt, settings.columns)
    out = check_output_path(out, overwrite, [settings.source, cache_dir])
    config = settings.config
    if config is None and settings.source == fmt.hub_id:
        config = fmt.hub_config
    source: Source = load_source(settings.source, config=config, revision=settings.revision,
                                 cache_dir=cache_dir)
    where = settings.source
    train_spec = settings.train_split or fmt.train_split
    eval_spec = settings.eval_split or fmt.eval_split
    if settings.train_count and eval_spec == train_spec:
        raise UserError(f"--eval-split {eval_spec!r} is the training split (expected another "
                        "split, or 'rest' for the training split's rows not drawn for training)")

    records: dict[str, list[dict[str, Any]]] = {}
    used: dict[str, Any] = {}
    train_order: list[int] = []
    if settings.train_count:
        train_order = _draw_train(fmt, source, settings, columns, where, train_spec, records, used)
    if settings.eval_count != 0:
        _draw_eval(fmt, source, settings, columns, where, train_spec, eval_spec, train_order,
                   records, used)
    for name, recs in records.items():
        if recs:
            _unique_ids(recs, f"{name}.jsonl")

    info: dict[str, Any] = {
        "task": fmt.name,
        "evaluate_task": fmt.evaluate_task,
        "source": {
            "from": settings.source, "kind": source.kind, "config": source.config,
            "revision": source.revision, "sha256": source.sha256,
            "splits": {name: {"rows": len(ds), "fingerprint": _fingerprint(ds)}
                       for name, ds in sorted(used.items())},
        },
        "columns": {f: c for f, c in columns.items() if c is not None},
        "splits": {"train": train_spec if settings.train_count else None,
                   "eval": eval_spec if settings.eval_count != 0 else None},
        "seed": settings.seed,
        "counts": {name: len(records.get(name, [])) for name in FILES},
        "rule": RULE,
        "files": {},
        "datasets_version": datasets.__version__,
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for name in FILES:
            if records.get(name):
                _write_jsonl(tmp / f"{name}.jsonl", records[name])
                info["files"][f"{name}.jsonl"] = file_digest(tmp / f"{name}.jsonl")
        write_json(tmp / "data.json", info)
    return info


def _draw_train(fmt: TaskFormat, source: Source, settings: DataSettings, columns: dict, where: str,
                train_spec: str, records: dict[str, list[dict[str, Any]]],
                used: dict[str, Any]) -> list[int]:
    """Draw the training rows (and the seeds, their first ones) into `records`; the rows' order."""
    pool = _Pool(train_spec, pick_split(source, train_spec, where))
    _check_columns(fmt, pool, columns, where)
    if settings.train_count > pool.size:
        raise UserError(f"--train-count {settings.train_count}: split {train_spec!r} of {where} "
                        f"has only {pool.size} rows")
    train_order = _lowest(settings.train_count, range(pool.size), settings.seed, "train",
                          train_spec)
    records["train"] = _records(fmt, pool, train_order, columns, where)
    records["seeds"] = [_as_seed(fmt, r) for r in records["train"][: settings.seeds_count]]
    used.update({name: ds for name, ds in pool.parts})
    return train_order


def _draw_eval(fmt: TaskFormat, source: Source, settings: DataSettings, columns: dict, where: str,
               train_spec: str, eval_spec: str, train_order: list[int],
               records: dict[str, list[dict[str, Any]]], used: dict[str, Any]) -> None:
    """Draw the evaluation rows into `records` (from the rest of the training split with
    `rest`)."""
    if eval_spec == "rest":
        pool = _Pool(train_spec, pick_split(source, train_spec, where))
        drawn = set(train_order)
        candidates = [i for i in range(pool.size) if i not in drawn]
    else:
        pool = _Pool(eval_spec, pick_split(source, eval_spec, where))
        candidates = list(range(pool.size))
    _check_columns(fmt, pool, columns, where)
    count = len(candidates) if settings.eval_count is None else settings.eval_count
    if count > len(candidates) or count == 0:
        raise UserError(f"--eval-count {count}: split {eval_spec!r} of {where} has "
                        f"{len(candidates)} rows to evaluate on (expected 1 to {len(candidates)})")
    chosen = candidates if count == len(candidates) else sorted(
        _lowest(count, candidates, settings.seed, "eval", pool.label))
    records["eval"] = _records(fmt, pool, chosen, columns, where)
    used.update({name: ds for name, ds in pool.parts})
