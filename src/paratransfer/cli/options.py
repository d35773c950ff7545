"""Command-line options that several commands share: one home, imported by each command's
module (it imports none of them). The step settings' flags come from their fields
(`io.settings`)."""

from __future__ import annotations

import argparse
import re

from paratransfer.extract.settings import ExtractSettings
from paratransfer.io.settings import add_setting_flags
from paratransfer.sensitivity.settings import SensitivitySettings

#: What a negative number looks like as a flag's value: -3, -0.5, -.5, -1e-3, -inf.
NEGATIVE_NUMBER = re.compile(r"^-(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|inf)$")


class Parser(argparse.ArgumentParser):
    """argparse, except that a negative number in any form is a value (`--lr -1e-3`; argparse
    itself reads exponent forms as an unknown option), so the flag's own check answers it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER


def thread_count(text: str) -> int:
    """`--threads`' value: a whole number of at least 1 (else a usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number (got {text!r})") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def add_threads(p: argparse.ArgumentParser) -> None:
    """--threads, as every command that runs a model takes it (`cli.entry.main` applies it)."""
    p.add_argument("--threads", type=thread_count, default=None, metavar="N",
                   help="intra-op CPU threads (default: OMP_NUM_THREADS when set, else the CPUs "
                        "this process may use: its affinity, capped by the cgroup CPU quota); "
                        "recorded in every output's `runtime`")


def add_common(p: argparse.ArgumentParser) -> None:
    """--dtype, --device, --overwrite, --quiet and --threads, as every model-loading command
    takes them."""
    p.add_argument("--dtype", default="auto", help="float32|bfloat16|float16 (auto: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N (auto: GPU when present)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_threads(p)


def add_seed_data(p: argparse.ArgumentParser) -> None:
    """How seed samples are rendered and cut (sensitivity, extraction, stability): the fields
    of `SensitivitySettings`."""
    add_setting_flags(p, SensitivitySettings)


#: The extraction settings `extract` and `stability` share (the others are extract's own).
EXTRACTION_KEPT = ("rank", "modules", "svd", "min_vocab_coverage", "allow_pad")


def add_extraction(p: argparse.ArgumentParser) -> None:
    """What extraction keeps: rank, modules, SVD method, vocabulary coverage, padding
    (extraction and the stability report)."""
    add_setting_flags(p, ExtractSettings, only=EXTRACTION_KEPT)
