"""Rank-r factorization of a reduced teacher block into LoRA factors (docs/method.md §4).

W ~= B @ A with B = U_r Σ_r [m, r] and A = V_rᵀ [r, n]: the best rank-r approximation
(Eckart-Young), which becomes the starting point of the student's LoRA pair. Three methods:
`auto` (block Krylov grown until a certificate holds, else the exact SVD; `certified_svd.py`),
`exact` (economy SVD) and `randomized` (`torch.svd_lowrank`, fixed sketch, uncertified).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from paratransfer.io.errors import UserError

# The methods' names and help are read by `paratransfer --help` (`--svd`), which must not wait
# for torch: the functions import it when extraction calls them.
if TYPE_CHECKING:
    import torch

DEFAULT_OVERSAMPLE = 8
RANDOMIZED_POWER_ITERATIONS = 4


@dataclass(frozen=True)
class Factors:
    """LoRA factors of one block and how much of the block they keep."""

    B: torch.Tensor  # [m, r] = U_r Σ_r
    A: torch.Tensor  # [r, n] = V_rᵀ
    energy: float  # ||B@A||_F² / ||W||_F²; 1.0 for an all-zero block (nothing is lost)
    svd: dict = field(default_factory=dict)  # how: method, seconds, certificate figures


# A factorizer gets (block, rank, seed, ||block||_F²) for a float32/float64 block and returns
# (U_r [m, r], S_r [r], V_r [n, r], what was done: {"method": ..., ...}).
Factorizer = Callable[["torch.Tensor", int, int, float],
                      tuple["torch.Tensor", "torch.Tensor", "torch.Tensor", dict]]


def _exact(block: torch.Tensor, rank: int, seed: int, total: float) -> tuple:
    """Economy SVD: exact top-r triplets, never the m x m U of a full SVD."""
    import torch

    u, s, vh = torch.linalg.svd(block, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank].mT, {"method": "exact"}


def _randomized(block: torch.Tensor, rank: int, seed: int, total: float) -> tuple:
    """Randomized SVD (Halko et al.) with a fixed sketch: fast, but how close it comes to the
    exact factors depends on the spectrum and is not checked (`auto` checks).

    svd_lowrank draws from the global RNG, so it runs inside a forked RNG state seeded with
    `seed`: reproducible, and the caller's random stream is left untouched.
    """
    import torch

    q = min(rank + DEFAULT_OVERSAMPLE, min(block.shape))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(block, q=q, niter=RANDOMIZED_POWER_ITERATIONS)
    info = {"method": "randomized", "sketch": q, "power_iterations": RANDOMIZED_POWER_ITERATIONS}
    return u[:, :rank], s[:rank], v[:, :rank], info


def _auto(block: torch.Tensor, rank: int, seed: int, total: float) -> tuple:
    """Block Krylov until the certificate holds, else the exact SVD (`certified_svd`)."""
    from paratransfer.extract.certified_svd import certified_svd

    u, s, v, certificate = certified_svd(block, rank, seed, total=total)
    return u, s, v, certificate.as_dict()


@dataclass(frozen=True)
class Method:
    """An `--svd` method: its factorizer and what `--help` says of it."""

    run: Factorizer
    help: str


#: Every `--svd` method, by the name a user types.
FACTORIZERS: dict[str, Method] = {
    "auto": Method(_auto, "randomized block Krylov until the top-r singular values and the "
                   "residual are certified, else exact"),
    "exact": Method(_exact, "economy SVD"),
    "randomized": Method(_randomized, "fixed sketch, unchecked"),
}
DEFAULT_METHOD = "auto"


def svd_help(default: str = DEFAULT_METHOD) -> str:
    """`--svd`'s help: every method with what it does."""
    return (", ".join(f"{name} ({m.help})" for name, m in FACTORIZERS.items())
            + f"; default {default}")


def _check(block: torch.Tensor, rank: int, method: str) -> Factorizer:
    """Validate the request and return the factorizer, with one-line UserErrors."""
    if method not in FACTORIZERS:
        known = ", ".join(sorted(FACTORIZERS))
        raise UserError(f"unknown factorization method {method!r}; known: {known}")
    if block.dim() != 2:
        raise UserError(f"can only factorize a 2-D block, got shape {list(block.shape)}")
    m, n = block.shape
    if rank < 1 or rank > min(m, n):
        raise UserError(
            f"rank {rank} is outside 1..{min(m, n)} (the smaller side) of a [{m}, {n}] block"
        )
    return FACTORIZERS[method].run


def _squared_norm(block: torch.Tensor) -> float:
    """||W||_F², which also screens the block for NaN/inf in the same single pass.

    Computed in the block's dtype (a float64-accumulating norm of float32 is ~6x slower here)
    and redone in float64 only if float32 overflowed on finite values.
    """
    import torch

    norm = float(torch.linalg.vector_norm(block))
    if not math.isfinite(norm):
        if not bool(torch.isfinite(block).all()):
            m, n = block.shape
            raise UserError(
                f"cannot factorize a [{m}, {n}] block containing NaN or infinite values"
            )
        norm = float(torch.linalg.vector_norm(block, dtype=torch.float64))
    return norm * norm


def _energy(total: float, singular_values: torch.Tensor) -> float:
    """Share of the block's squared Frobenius norm kept by the kept singular values."""
    if total == 0.0:
        return 1.0
    import torch

    kept = float((singular_values.to(torch.float64) ** 2).sum())
    return min(1.0, kept / total)


def factorize(block: torch.Tensor, rank: int, method: str = DEFAULT_METHOD,
              seed: int = 0) -> Factors:
    """LoRA factors (B, A) of a teacher block at the given rank, by the named SVD method.

    Computes in float32 (float64 stays float64) because half-precision SVD is unsupported or
    inaccurate on CPU; returns contiguous factors in the block's float dtype.
    """
    import torch

    factorizer = _check(block, rank, method)
    out_dtype = block.dtype if block.is_floating_point() else torch.float32
    work = block.to(torch.float64 if block.dtype == torch.float64 else torch.float32)
    total = _squared_norm(work)
    started = time.perf_counter()
    u, s, v, info = factorizer(work, rank, seed, total)
    info["seconds"] = round(time.perf_counter() - started, 4)
    return Factors(
        B=(u * s).to(out_dtype).contiguous(),
        A=v.mT.to(out_dtype).contiguous(),
        energy=_energy(total, s),
        svd=info,
    )
