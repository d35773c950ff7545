"""`paratransfer demo --seeds N --arms ...`: the demo's world and training budget with more seeds
and any of the named arms, into its own output folder (out/demo-study), resumable like any run.

Three seeds give a paired t-interval of ±4.3 standard errors: they cannot decide effects of the
size the demo shows against its spread. A study takes more seeds than the default demo's 15
minutes hold, so it is a separate mode; the default `make demo` is unchanged.
"""

from __future__ import annotations

from typing import Any

from paratransfer.io.errors import UserError

#: The arms a study may run, each as a recipe arm (the one setting it changes).
STUDY_ARMS: dict[str, dict[str, Any]] = {
    "transfer": {},
    "lora": {"init": "standard"},
    "pissa": {"init": "pissa"},
    "spectrum": {"init": "spectrum"},
    "eva": {"init": "eva"},
    "corda": {"init": "corda"},
    "random": {"reduce": "random"},  # a random window of the teacher's selected layers
    "distill": {"init": "standard", "distill": True},
}
#: The arms of `demo --seeds N` without `--arms`.
DEFAULT_STUDY_ARMS = ("transfer", "lora", "pissa", "spectrum", "eva", "corda", "random")
STUDY_NAME = "demo-study"


def parse_arms(text: str | None) -> tuple[str, ...]:
    """`--arms a,b,c` -> the names, checked (lora, the baseline, must be among them)."""
    if text is None:
        return DEFAULT_STUDY_ARMS
    names = tuple(dict.fromkeys(a.strip() for a in text.split(",") if a.strip()))
    unknown = [a for a in names if a not in STUDY_ARMS]
    if unknown:
        raise UserError(f"--arms: {unknown[0]!r} is not a demo arm (expected some of: "
                        f"{', '.join(STUDY_ARMS)})")
    if "lora" not in names:
        raise UserError("--arms: the baseline arm lora is missing (every contrast is paired with "
                        "it or with transfer)")
    return names


def study_recipe(base: dict[str, Any], seeds: int | None, arms: str | None) -> dict[str, Any]:
    """The demo recipe `base` with seeds 1..N and the named arms (same budget, same world)."""
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise UserError(f"--seeds: expected a whole number of at least 1 (got {seeds!r})")
    names = parse_arms(arms)
    return {**base, "name": STUDY_NAME,
            "seeds": list(range(1, (seeds or len(base["seeds"])) + 1)),
            "arms": {name: dict(STUDY_ARMS[name]) for name in names}}
