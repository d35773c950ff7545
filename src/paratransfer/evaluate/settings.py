"""How a model is evaluated (`paratransfer evaluate`, and every evaluation of a run). Each
setting is declared once with `setting`: the command's flags and the recipe's evaluation keys
come from these fields. Standard library only, so `--help` reads it without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from paratransfer.evaluate import TASKS, get_task
from paratransfer.io.errors import UserError
from paratransfer.io.settings import from_recipe_keys, setting
from paratransfer.tasks.examples import PROMPT_FORMATS, prompt_formats_help

#: What to do with a record whose prompt cannot fit the context: refuse, skip or truncate.
OVERLONG = ("refuse", "skip", "truncate")
_BUDGETS = ", ".join(f"{t.name} {t.max_new_tokens}" for t in TASKS.values() if t.generates)


@dataclass(frozen=True)
class EvalSettings:
    """How a model is evaluated; recorded in metrics.json."""

    task: str  # `--task`, the recipe's task type
    shots: int = setting(0, "worked examples before each question (gsm: fixed set or "
                         "--shots-data; mmlu: same subject from --shots-data); fewer where the "
                         "context is short", recipe=True)
    limit: int | None = setting(None, "evaluate the first N records only", recipe=True)
    batch_size: int = setting(16, "prompts per forward pass (default {default})", recipe=True,
                              recipe_name="eval_batch_size")  # `batch_size` is training's
    max_new_tokens: int | None = setting(None, f"generation budget (default: {_BUDGETS})",
                                         recipe=True)  # None: the task's default
    #: The recipe's `prompt_format` (declared by the sensitivity step) sets it for every step.
    prompt_format: str = setting("tulu", lambda: prompt_formats_help(", as `train` uses"))
    judge_prompt_format: str = setting("auto", lambda: "auto (the judge's chat template if "
                                       "any, else tulu), " + " or ".join(PROMPT_FORMATS))
    overlong: str = setting("refuse", "a record too long for the context even without worked "
                            "examples: refuse (default), skip (counted and listed by FILE:LINE "
                            "in metrics.json) or truncate (its instruction cut from the left)",
                            recipe=True, choices=list(OVERLONG))

    def __post_init__(self) -> None:
        get_task(self.task)
        for flag, value, least in (("--shots", self.shots, 0), ("--limit", self.limit, 1),
                                   ("--batch-size", self.batch_size, 1),
                                   ("--max-new-tokens", self.max_new_tokens, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < least):
                raise UserError(f"{flag}: must be an integer of at least {least} (got {value!r})")
        formats = ", ".join(PROMPT_FORMATS)
        if self.prompt_format not in PROMPT_FORMATS:
            raise UserError(f"--prompt-format: unknown {self.prompt_format!r} (expected one of: {formats})")
        if self.overlong not in OVERLONG:
            raise UserError(f"--overlong: unknown {self.overlong!r} (expected one of: "
                            f"{', '.join(OVERLONG)})")
        if self.judge_prompt_format != "auto" and self.judge_prompt_format not in PROMPT_FORMATS:
            raise UserError(f"--judge-prompt-format: unknown {self.judge_prompt_format!r} "
                            f"(expected auto or one of: {formats})")

    @classmethod
    def from_recipe(cls, task: str, s: dict[str, Any]) -> EvalSettings:
        """From a recipe's (or arm's) settings; the evaluation batch is `eval_batch_size` (an
        error names that key: `--batch-size` is training's in a recipe)."""
        batch = s.get("eval_batch_size", 16)
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise UserError(f"eval_batch_size: must be an integer of at least 1 (got {batch!r})")
        return from_recipe_keys(cls, s, task=task, prompt_format=s["prompt_format"])
