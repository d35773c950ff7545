"""Command-line options that several commands share: one home, imported by each command's
module (it imports none of them)."""

from __future__ import annotations

import argparse
import re

#: What a negative number looks like as a flag's value: -3, -0.5, -.5, -1e-3, -inf.
NEGATIVE_NUMBER = re.compile(r"^-(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|inf)$")


class Parser(argparse.ArgumentParser):
    """argparse, except that a negative number in any form is a value (`--lr -1e-3`; argparse
    itself reads exponent forms as an unknown option), so the flag's own check answers it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER


def add_common(p: argparse.ArgumentParser) -> None:
    """--dtype, --device, --overwrite and --quiet, as every model-loading command takes them."""
    p.add_argument("--dtype", default="auto", help="float32|bfloat16|float16 (auto: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N (auto: GPU when present)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_seed_data(p: argparse.ArgumentParser) -> None:
    """How seed samples are rendered and cut (sensitivity and extraction)."""
    p.add_argument("--prompt-format", default="tulu",
                   help="tulu (docs/method.md §1) or chat-template")
    p.add_argument("--max-length", type=int, default=2048, help="truncate samples to this many tokens")
    p.add_argument("--max-samples", type=int, default=None, help="use at most this many seed samples")


def add_extraction(p: argparse.ArgumentParser) -> None:
    """What extraction keeps: rank, modules, SVD method, vocabulary coverage, padding
    (extraction and the stability report)."""
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r (default 16)")
    p.add_argument("--modules", default="embed,attn,mlp,head",
                   help="groups (embed,attn,mlp,head) or roles (q,k,v,o,gate,up,down)")
    p.add_argument("--svd", default="auto",
                   help="auto (randomized block Krylov until the top-r singular values and the "
                        "residual are certified, else exact), exact (economy SVD), randomized "
                        "(fixed sketch, unchecked); default auto")
    p.add_argument("--min-vocab-coverage", type=float, default=0.5,
                   help="refuse embed/head when fewer of the student's tokens are found in the "
                        "teacher's vocabulary (default 0.5)")
    p.add_argument("--allow-pad", action="store_true",
                   help="zero-pad teacher matrices narrower than the student's instead of refusing")
