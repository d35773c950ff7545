"""What the commands print: progress bars that close, narrowly silenced library warnings, and
the one-line-per-step log of a run.

Progress bars are drawn only on a terminal and removed when done (`leave=False`), so a log
captured to a file or a pipe holds the steps' lines and nothing half-drawn.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable

#: Warnings one library raises about another's use of it, which a user can do nothing about:
#: (message regex, category, issuing module regex).
LIBRARY_NOISE: tuple[tuple[str, type[Warning], str], ...] = (
    # PEFT reads `model.is_gradient_checkpointing`, which transformers 5.x deprecates.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\."),
    # PEFT's advice for EVA on models too large to hold twice; `--init eva` holds one.
    (r"lora with eva initialization used with low_cpu_mem_usage=False", UserWarning, r"peft\."),
    # PEFT warns when a tied model's embedding is targeted without `ensure_weight_tying`; here a
    # tied head never gets LoRA and is untied before the embedding's base weight changes
    # (inject.untie_head), which is the complication the warning is about.
    (r"Model has `tie_word_embeddings=True` and a tied layer is part of the adapter",
     UserWarning, r"peft\."),
)


def quiet_libraries() -> None:
    """Ignore exactly the warnings in LIBRARY_NOISE (matched by message, category and module),
    and turn off transformers' own progress bars where they cannot be redrawn (no terminal)."""
    for message, category, module in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", enabled: bool = True, initial: int = 0):
    """A tqdm bar: on a terminal only (None = tqdm's own TTY test), gone once closed."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial,
                disable=None if enabled else True, leave=False, dynamic_ncols=True)


def notice(message: str) -> None:
    """One line on stderr about something the user should know but that is not an error
    (records dropped, a damaged checkpoint skipped); printed by the writing process only."""
    import os

    if os.environ.get("RANK", "0") == "0":
        print(f"note: {message}", file=sys.stderr, flush=True)
