"""`paratransfer evaluate`: a model (+ a LoRA) on a task's records -> metrics + predictions.

Reads and checks every input (flags, records, worked examples, the reference run) before any
model is loaded, so a bad line fails in a second, not after an hour of generation. Then: the
prompts in the training prompt format, generation or choice scoring in batches, the task's
scores, the judge if asked for, and `metrics.json` + `predictions.jsonl` written atomically.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from paratransfer import __version__
from paratransfer.evaluate import BadExample, Item, ShotPool, Task, get_task, mean

#: What to do with a record whose prompt does not fit the context even without worked
#: examples: stop (the default), leave it out (listed in metrics.json), or cut its instruction.
from paratransfer.evaluate.settings import (
    OVERLONG,  # noqa: E402,F401  (re-exported)
    EvalSettings,
)
from paratransfer.io.errors import UserError
from paratransfer.io.outputs import atomic_dir, check_output_path, write_json
from paratransfer.io.readers import json_line
from paratransfer.io.threads import runtime
from paratransfer.tasks import examples as data
from paratransfer.teacher.gguf import gguf_provenance
from paratransfer.teacher.models import load_model, load_tokenizer, model_label

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"


# --------------------------------------------------------------------------- inputs


def load_items(task: Task, path: str | Path, limit: int | None = None) -> list[Item]:
    """The task's items from a JSONL file; a record lacking what the task needs names FILE:LINE."""
    items = []
    for example in data.read_examples(path, limit=limit):
        try:
            items.append(task.to_item(example))
        except BadExample as e:
            raise UserError(f"{example.source}: {e}") from None
    return items


def shot_pool(task: Task, shots_data: str | Path | None) -> ShotPool:
    """Worked examples from --shots-data, else the task's fixed set."""
    if shots_data is not None:
        return ShotPool(tuple(load_items(task, shots_data)), str(shots_data))
    if task.fixed_shots is None:
        raise UserError(f"task {task.name}: --shots needs --shots-data (the file to take worked "
                        "examples from)")
    return task.fixed_shots()


def apply_shots(task: Task, items: list[Item], shots: int,
                shots_data: str | Path | None) -> list[Item]:
    """The items with `shots` worked examples in front of each question."""
    if shots == 0:
        if shots_data is not None:
            raise UserError(f"--shots-data {shots_data}: given, but --shots is 0 (expected --shots K)")
        return items
    if task.add_shots is None:
        raise UserError(f"task {task.name}: takes no worked examples (expected --shots 0)")
    pool = shot_pool(task, shots_data)
    out = []
    for item in items:
        try:
            out.append(task.add_shots(item, pool, shots))
        except BadExample as e:
            raise UserError(f"{item.source}: {e}") from None
    return out


def predictions_path(results: str | Path) -> Path:
    """`RESULTS_DIR/predictions.jsonl` (a predictions file itself is taken as is)."""
    results = Path(results)
    return results / PREDICTIONS_FILE if results.is_dir() else results


def read_reference(results: str | Path, task: Task, items: list[Item]) -> list[str]:
    """The other run's output for each item, matched by id."""
    path = predictions_path(results)
    if not path.is_file():
        raise UserError(f"{path}: no such file (expected --reference to be a results folder of "
                        "`paratransfer evaluate`)")
    metrics = path.parent / METRICS_FILE
    if metrics.is_file():
        other = json.loads(metrics.read_text(encoding="utf-8")).get("task")
        if other not in (None, task.name):
            raise UserError(f"{metrics}: a run of task {other!r} (expected task {task.name!r})")
    outputs: dict[str, str] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            row = json_line(line, f"{path}:{lineno}", "one prediction per line")
            if not (isinstance(row, dict) and isinstance(row.get("id"), str)
                    and isinstance(row.get("output"), str)):
                raise UserError(f'{path}:{lineno}: expected an object with string "id" and "output"')
            outputs[row["id"]] = row["output"]
    missing = [item for item in items if item.id not in outputs]
    if missing:
        raise UserError(f"{path}: no prediction for id {missing[0].id!r} (of {missing[0].source})"
                        f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}")
    return [outputs[item.id] for item in items]


def check_unique_ids(items: list[Item]) -> None:
    """Predictions are matched by id across runs, so ids must not repeat."""
    seen: dict[str, str] = {}
    for item in items:
        if item.id in seen:
            raise UserError(f"{item.source}: id {item.id!r} repeats {seen[item.id]} (the judge "
                            "matches predictions by id; expected unique ids)")
        seen[item.id] = item.source


def load_evaluated_model(model_id: str, adapter: str | Path | None, dtype: torch.dtype,
                         device: torch.device | str):
    """The model, with a LoRA from `train` applied when given.

    With an adapter this is exactly the model `paratransfer merge` writes (`merge.merged_model`:
    merged in fp32, a tied head untied first, then cast to `dtype`), so evaluating on the fly
    and evaluating the merged folder give the same metrics, and generation pays nothing for
    separate LoRA matrices. Models that are not causal (BERT) are refused.
    """
    from paratransfer.adapter.merge import merged_model
    from paratransfer.teacher.models import check_causal

    if adapter is None:
        model = load_model(model_id, dtype=dtype, device=device)
    else:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"{adapter}: no adapter_config.json (expected a LoRA adapter folder, "
                            "e.g. the run folder of `paratransfer train`)")
        model, _ = merged_model(model_id, adapter, dtype)
        model.to(device)
    check_causal(model, model_id)
    model.eval()
    return model


# --------------------------------------------------------------------------- the work


def context_length(model_id: str, tokenizer) -> int | None:
    """The most tokens the model reads: its config's max_position_embeddings (n_positions),
    else the tokenizer's model_max_length when that states a real limit; None if neither."""
    from transformers import AutoConfig

    try:
        from paratransfer.teacher.gguf import resolve_model

        config = AutoConfig.from_pretrained(resolve_model(str(model_id)))
    except (OSError, ValueError, KeyError):
        config = None  # loading the model reports what is wrong
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else None


def answer_room(task: Task, item: Item, tokenizer, settings: EvalSettings) -> int:
    """Tokens the answer needs after the prompt: the generation budget, or the longest choice."""
    if task.generates:
        return max_new_tokens(task, settings)
    return max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in item.choices)


@dataclass
class Fitted:
    """What `fit_to_context` kept: the items, their prompts, each one's number of worked
    examples; and, by `--overlong`, the records left out and those whose instruction was cut
    (FILE:LINE -> characters cut from the left)."""

    items: list[Item]
    prompts: list[str]
    shots: list[int]
    skipped: list[str] = field(default_factory=list)
    truncated: dict[str, int] = field(default_factory=dict)

    def record(self) -> dict[str, Any] | None:
        """metrics.json's `overlong`: None when every record fitted as it was."""
        if not (self.skipped or self.truncated):
            return None
        return {"skipped": len(self.skipped), "skipped_records": self.skipped,
                "truncated": len(self.truncated),
                "truncated_records": [{"record": k, "characters_cut": v}
                                      for k, v in self.truncated.items()]}


def _prompt_tokens(tokenizer, prompt: str, context: int) -> int:
    """The prompt's token count, exact up to `context`; beyond it, some number above it (a
    prompt of megabytes is not tokenized in full to learn that it does not fit)."""
    return len(data.leading_tokens(tokenizer, prompt, context))


def _instruction_at(messages: tuple[dict[str, str], ...]) -> int:
    """The index of the last user turn before the answer: the instruction `truncate` cuts."""
    for i in range(len(messages) - 2, -1, -1):
        if messages[i]["role"] == "user":
            return i
    return len(messages) - 2


def _cut_instruction(item: Item, cut: int) -> Item:
    """`item` with the first `cut` characters of its instruction removed."""
    from dataclasses import replace

    messages = list(item.example.messages)
    at = _instruction_at(item.example.messages)
    messages[at] = {**messages[at], "content": messages[at]["content"][cut:]}
    return replace(item, example=replace(item.example, messages=tuple(messages)))


def _truncated(task: Task, bare: Item, tokenizer, settings: EvalSettings,
               context: int) -> tuple[Item, str, int]:
    """The item with the fewest characters cut from the left of its instruction for its
    prompt and answer to fit (binary search: a shorter instruction never gives a longer
    prompt); a UserError when even an empty instruction does not fit."""
    text = bare.example.messages[_instruction_at(bare.example.messages)]["content"]
    room = answer_room(task, bare, tokenizer, settings)

    def fits(cut: int) -> tuple[bool, Item, str]:
        item = _cut_instruction(bare, cut)
        prompt = prompts_for([item], tokenizer, settings.prompt_format)[0]
        return _prompt_tokens(tokenizer, prompt, context) + room <= context, item, prompt

    ok, item, prompt = fits(len(text))
    if not ok:
        raise UserError(f"{bare.source}: does not fit the model's context of {context} tokens "
                        f"even with its instruction removed (--overlong truncate; use --overlong "
                        f"skip to leave it out)")
    lo, hi = 0, len(text)  # fits(hi) holds; find the least cut that fits
    while lo < hi:
        mid = (lo + hi) // 2
        ok_mid, item_mid, prompt_mid = fits(mid)
        if ok_mid:
            hi, item, prompt = mid, item_mid, prompt_mid
        else:
            lo = mid + 1
    return item, prompt, hi


def fit_to_context(task: Task, plain: list[Item], items: list[Item], settings: EvalSettings,
                   shots_data: str | Path | None, tokenizer, context: int | None,
                   say: bool = True) -> Fitted:
    """The items, their prompts and each one's number of worked examples, by the stated rule.

    A prompt and its answer must fit the model's context: prompt tokens + the answer's room
    (`answer_room`) <= `context`. A few-shot prompt that does not fit gets fewer worked
    examples, the last ones dropped first; a prompt that does not fit even without any is, by
    `settings.overlong`, refused with its record's FILE:LINE before the model is loaded
    (`refuse`), left out and listed (`skip`), or given with its instruction cut from the left
    until it fits (`truncate`). No context known: no limit.
    """
    pool = shot_pool(task, shots_data) if settings.shots else None
    out = Fitted([], [], [])
    for bare, item in zip(plain, items, strict=True):
        k = settings.shots
        while True:
            prompt = prompts_for([item], tokenizer, settings.prompt_format)[0]
            if context is None:
                break
            n = _prompt_tokens(tokenizer, prompt, context)
            room = answer_room(task, item, tokenizer, settings)
            if n + room <= context:
                break
            if k == 0:
                break
            k -= 1
            try:
                item = task.add_shots(bare, pool, k) if k else bare
            except BadExample as e:
                raise UserError(f"{bare.source}: {e}") from None
        if context is not None and n + room > context:
            if settings.overlong == "skip":
                out.skipped.append(bare.source)
                continue
            if settings.overlong == "truncate":
                item, prompt, cut = _truncated(task, bare, tokenizer, settings, context)
                out.truncated[bare.source] = cut
            else:
                lower = ", or lower --max-new-tokens" if task.generates else ""
                exact = len(prompt) <= data.text_cap(tokenizer, context)  # counted in full
                size = f"{n} tokens" if exact else f"over {n - 1} tokens"
                raise UserError(f"{bare.source}: the prompt is {size}; with {room} for the "
                                f"answer it exceeds the model's context of {context} tokens "
                                f"(shorten the record{lower}, or pass --overlong skip|truncate)")
        out.items.append(item)
        out.prompts.append(prompt)
        out.shots.append(k)
    if not out.items:
        raise UserError(f"{plain[0].source.rsplit(':', 1)[0]}: no record fits the model's "
                        f"context of {context} tokens (--overlong {settings.overlong})")
    trimmed = sum(k < settings.shots for k in out.shots)
    if say:
        from paratransfer.io.console import notice

        if trimmed:
            notice(f"{trimmed} of {len(out.shots)} prompts got fewer than --shots "
                   f"{settings.shots} worked examples to fit the model's context of {context} "
                   "tokens (predictions.jsonl: shots)")
        if out.skipped:
            notice(f"--overlong skip: left out {len(out.skipped)} of {len(plain)} records that "
                   f"do not fit the model's context of {context} tokens, e.g. "
                   f"{out.skipped[0]} (all listed in metrics.json: overlong)")
        if out.truncated:
            first = next(iter(out.truncated))
            notice(f"--overlong truncate: cut the instruction of {len(out.truncated)} of "
                   f"{len(plain)} records from the left to fit the model's context of {context} "
                   f"tokens, e.g. {first} by {out.truncated[first]} characters "
                   "(metrics.json: overlong; predictions.jsonl: truncated)")
    return out


def prompts_for(items: list[Item], tokenizer, prompt_format: str) -> list[str]:
    """Each item's prompt in the training prompt format, continued by its answer's lead-in."""
    return [data.render(item.example, tokenizer, prompt_format)[0] + item.answer_prefix
            for item in items]


def answer(task: Task, model, tokenizer, items: list[Item], prompts: list[str],
           settings: EvalSettings, progress: bool) -> tuple[list[str], list[dict[str, Any]]]:
    """The model's output per item (generated text, or the likeliest choice) and extra fields."""
    from paratransfer.evaluate.generation import choice_logprobs, generate_greedy

    if task.generates:
        outputs = generate_greedy(model, tokenizer, prompts, batch_size=settings.batch_size,
                                  max_new_tokens=max_new_tokens(task, settings),
                                  progress=progress, desc=task.name)
        return outputs, [{} for _ in items]
    scores = choice_logprobs(model, tokenizer, prompts, [item.choices for item in items],
                             batch_size=settings.batch_size, progress=progress, desc=task.name)
    outputs, extras = [], []
    for item, logprobs in zip(items, scores, strict=True):
        best = max(range(len(logprobs)), key=logprobs.__getitem__)  # ties: the first
        outputs.append(item.choices[best].strip())
        extras.append({"choice_logprobs": {c.strip(): lp for c, lp in
                                           zip(item.choices, logprobs, strict=True)}})
    return outputs, extras


def max_new_tokens(task: Task, settings: EvalSettings) -> int | None:
    """The generation budget: --max-new-tokens, else the task's default; None without generation."""
    if not task.generates:
        return None
    return settings.max_new_tokens or task.max_new_tokens


def score_rows(task: Task, items: list[Item], prompts: list[str], outputs: list[str],
               extras: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One predictions.jsonl row per item: what was asked, said, parsed, expected and scored."""
    rows = []
    for item, prompt, output, extra in zip(items, prompts, outputs, extras, strict=True):
        scores = task.score(output, item)
        row = {"id": item.id, "source": item.source}
        if item.category is not None:
            row["category"] = item.category
        row.update(prompt=prompt, output=output, parsed=scores.pop("parsed"), gold=item.gold)
        rows.append({**row, **scores, **extra})
    return rows


def summarize(task: Task, rows: list[dict[str, Any]], judged: bool) -> dict[str, Any]:
    """Headline metric, every metric, and per-category headline values when records have one."""
    names = dict(task.metrics)
    if judged:
        names = {"win_rate": "win", **names}  # the paper reports the judged win rate
    headline = next(iter(names))
    summary: dict[str, Any] = {
        "metric": headline,
        "value": mean([row[names[headline]] for row in rows]),
        "n": len(rows),
        "metrics": {name: mean([row[key] for row in rows]) for name, key in names.items()},
    }
    by_category: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if "category" in row:
            by_category.setdefault(row["category"], []).append(row)
    if by_category:
        summary["per_category"] = {
            cat: {"n": len(r), headline: mean([x[names[headline]] for x in r])}
            for cat, r in sorted(by_category.items())}
    return summary


def judge_rows(task: Task, judge: str, items: list[Item], outputs: list[str],
               reference_outputs: list[str], settings: EvalSettings, dtype: torch.dtype,
               device: torch.device | str, progress: bool) -> list[dict[str, Any]]:
    """The judge's verdicts per item (see the task's `compare`)."""
    from paratransfer.teacher.models import check_causal

    judge_model = load_model(judge, dtype=dtype, device=device)
    check_causal(judge_model, judge)
    judge_tokenizer = load_tokenizer(judge)
    return task.compare(judge_model, judge_tokenizer, items, outputs, reference_outputs,
                        prompt_format=settings.judge_prompt_format,
                        batch_size=settings.batch_size, progress=progress)


def run_evaluate(model_id: str, data_path: str | Path, out: str | Path, settings: EvalSettings, *,
                 adapter: str | Path | None = None, shots_data: str | Path | None = None,
                 judge: str | None = None, reference: str | Path | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """`paratransfer evaluate`: write RESULTS_DIR/metrics.json + predictions.jsonl; returns the metrics."""
    started = time.time()
    task = get_task(settings.task)
    out = check_output_path(out, overwrite, [model_id, adapter, data_path, shots_data, judge,
                                             reference])
    if (judge is None) != (reference is None):
        raise UserError("--judge and --reference go together (the judge compares this run's "
                        "outputs with the reference run's)")
    if judge is not None and task.compare is None:
        raise UserError(f"task {task.name}: no pairwise judging (expected --task open)")
    plain = load_items(task, data_path, settings.limit)
    items = apply_shots(task, plain, settings.shots, shots_data)
    reference_outputs = None
    if reference is not None:
        check_unique_ids(items)
        reference_outputs = read_reference(reference, task, items)

    tokenizer = load_tokenizer(model_id)
    fitted = fit_to_context(task, plain, items, settings, shots_data, tokenizer,
                            context_length(model_id, tokenizer))
    if reference_outputs is not None and fitted.skipped:  # keep the reference run's pairing
        kept = {item.id for item in fitted.items}
        reference_outputs = [o for item, o in zip(items, reference_outputs, strict=True)
                             if item.id in kept]
    items, prompts, shots_used = fitted.items, fitted.prompts, fitted.shots
    model = load_evaluated_model(model_id, adapter, dtype, device)
    outputs, extras = answer(task, model, tokenizer, items, prompts, settings, progress)
    del model
    gc.collect()
    rows = score_rows(task, items, prompts, outputs, extras)
    if settings.shots:
        rows = [{**row, "shots": k} for row, k in zip(rows, shots_used, strict=True)]
    if fitted.truncated:
        rows = [{**row, "truncated": fitted.truncated.get(row["source"], 0)} for row in rows]
    if judge is not None:
        verdicts = judge_rows(task, judge, items, outputs, reference_outputs, settings, dtype,
                              device, progress)
        rows = [{**row, **verdict} for row, verdict in zip(rows, verdicts, strict=True)]

    metrics = {
        "task": task.name,
        **summarize(task, rows, judged=judge is not None),
        **({"shots_trimmed": sum(k < settings.shots for k in shots_used)} if settings.shots else {}),
        **({"overlong": fitted.record()} if fitted.record() else {}),
        "model": model_label(model_id),
        **gguf_provenance("model", model_id),
        **gguf_provenance("judge", judge),
        "adapter": model_label(str(adapter)) if adapter is not None else None,
        "data": str(Path(data_path).resolve()),
        "data_sha256": data.file_digest(data_path),
        "settings": {**asdict(settings), "max_new_tokens": max_new_tokens(task, settings),
                     "shots_data": str(shots_data) if shots_data is not None else None,
                     "judge": model_label(judge) if judge is not None else None,
                     "reference": str(predictions_path(reference)) if reference else None,
                     "dtype": str(dtype).removeprefix("torch."), "device": str(device)},
        "paratransfer_version": __version__,
        "runtime": runtime(),
        "timing": {"seconds": round(time.time() - started, 3)},  # apart: differs between runs
    }
    with atomic_dir(out, overwrite) as tmp:
        write_json(tmp / METRICS_FILE, metrics)
        with (tmp / PREDICTIONS_FILE).open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return metrics
