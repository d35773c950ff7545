"""Top-r SVD by randomized block Krylov iteration, grown until a convergence certificate holds.

`--svd auto` (the default of `extract`). A random block of r + p vectors is multiplied by
W Wᵀ again and again; every product is kept (a block Krylov space), so the top singular values
converge at a rate set by the square root of their gaps, much faster than plain power
iteration when the spectrum is flat at r (as it is for random weights). After each step the
Ritz values (the squared singular values of QᵀW for the orthonormal basis Q) are checked:

* **the top-r singular values stop moving**: none changed by more than `SV_TOLERANCE`
  (relative) in the last step;
* **the excess residual is small**: ‖W − BA‖²_F is computed exactly (BA is the projection of W
  onto r vectors of the basis, so ‖W − BA‖² = ‖W‖² − Σσ̃²); how far it is above the best
  attainable residual ‖W‖² − Σ_{i≤r} σ_i(W)² is *estimated*: Ritz values from nested spaces
  only grow towards the true ones, so the excess is what they have still to grow, extrapolated
  geometrically from their last two changes (never less than the last one). It must be at
  most `RESIDUAL_TOLERANCE` of the best residual.

Where the spectrum is flat at r the top-r singular *vectors* are not well defined and are not
what is certified; the singular values and the residual are. The estimate is not a bound: no
cheap a-posteriori bound is useful for flat spectra (the residual's share of the spectrum stays
large however good the subspace). A random start has a component along every singular vector
with probability one, which is what the extrapolation relies on. When the basis would grow
past `MAX_BASIS` columns before the certificate holds, the exact economy SVD is used instead:
every block is either certified or exact. (A basis that spans an invariant subspace, or the
whole space, gives exact Ritz values and ends the iteration too.)

Large products run in the block's dtype and on its device (a GPU when extraction runs there);
the small projected problems in float64 on the CPU. The random start is drawn on the CPU from
`seed`, so a block gives the same factors on every run and device type.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

SV_TOLERANCE = 1e-5  # relative change of each top-r singular value in the last step
RESIDUAL_TOLERANCE = 1e-4  # estimated excess of ‖W − BA‖²_F over the best, relative to the best
OVERSAMPLE = 16  # block size r + OVERSAMPLE (flat spectra: fewest passes over W at r = 16)
MAX_BASIS = 1024  # Krylov basis columns before falling back to the exact SVD
MIN_STEPS = 3  # Ritz values from at least three steps: two changes to extrapolate from
NOISE = 32  # changes below NOISE·ε·σ₁² are rounding, not convergence
GEOMETRIC_FLOOR = 0.5  # extrapolated tail is at least the last step's change


@dataclass(frozen=True)
class Certificate:
    """How one block was factorized, and the figures that certify it (for transfer.json)."""

    method: str  # "krylov", or "exact" (small block, or the budget ran out)
    steps: int  # Krylov steps: each one product with Wᵀ and one with W
    passes: int  # products of W or Wᵀ with a block of vectors
    basis: int  # columns of the final Krylov basis
    sv_change: float  # largest relative change of a top-r singular value in the last step
    excess_estimate: float  # estimated (‖W − BA‖² − best) / best
    residual: float  # ‖W − BA‖²_F / ‖W‖²_F, exact (0 for an all-zero block)
    certified: bool  # both tolerances met (always true for the exact SVD)
    note: str = ""  # why the exact SVD was used

    def as_dict(self) -> dict:
        """For JSON: figures that were never computed (infinite) become None."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}


def _extend(x: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(orthonormal block for x's part outside `basis`, basisᵀx, norm of that part).

    Block Gram-Schmidt with QR, done twice: the second pass removes what rounding left along
    `basis`, and the arbitrary directions QR completes a rank-deficient block with (which the
    first pass cannot have made orthogonal to `basis`); "twice is enough" keeps the basis
    orthonormal to working precision.
    """
    first = basis.mT @ x
    x = x - basis @ first
    rest = float(torch.linalg.vector_norm(x))
    q, r = torch.linalg.qr(x)
    second = basis.mT @ q
    q = torch.linalg.qr(q - basis @ second)[0]
    return q, first + second @ r, rest


class _Ritz:
    """The top-r Ritz values of each step and the certificate they give."""

    def __init__(self, rank: int, total: float, eps: float):
        self.rank, self.total, self.eps = rank, total, eps
        self.history: list[torch.Tensor] = []  # top-r squared singular values, float64

    def add(self, theta: torch.Tensor) -> None:
        self.history.append(theta[: self.rank].clamp_min(0.0))

    def _growth(self, step: int, noise: float) -> torch.Tensor:
        """How much each top-r Ritz value grew in a step; rounding-sized changes count as 0."""
        grew = self.history[step] - self.history[step - 1]
        return torch.where(grew.abs() > noise, grew, torch.zeros_like(grew))

    def figures(self) -> tuple[float, float]:
        """(largest relative change of a singular value, estimated relative excess residual)."""
        if len(self.history) < 2:
            return math.inf, math.inf
        now, before = self.history[-1], self.history[-2]
        noise = NOISE * self.eps * float(now[0])
        grew = self._growth(-1, noise)
        # |Δσ|/σ = |Δθ| / (σ_new (σ_new + σ_old)) with θ = σ²
        denom = (now.sqrt() * (now.sqrt() + before.sqrt())).clamp_min(1e-300)
        sv_change = float((grew.abs() / denom).max())
        last = float(grew.clamp_min(0).sum())
        if last == 0.0:
            tail = 0.0
        elif len(self.history) < MIN_STEPS:
            tail = math.inf
        else:
            previous = float(self._growth(-2, noise).clamp_min(0).sum())
            ratio = max(last / previous if previous > 0 else math.inf, GEOMETRIC_FLOOR)
            tail = last * ratio / (1.0 - ratio) if ratio < 1.0 else math.inf
        if tail == 0.0:
            return sv_change, 0.0
        best = self.total - float(now.sum()) - tail
        return sv_change, tail / max(best, NOISE * self.eps * self.total)


def _exact(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank].mT


def _residual(total: float, s: torch.Tensor) -> float:
    if total == 0.0:
        return 0.0
    return max(0.0, total - float((s.double() ** 2).sum())) / total


def certified_svd(
    block: torch.Tensor,
    rank: int,
    seed: int = 0,
    *,
    total: float | None = None,
    oversample: int = OVERSAMPLE,
    sv_tolerance: float = SV_TOLERANCE,
    residual_tolerance: float = RESIDUAL_TOLERANCE,
    max_basis: int = MAX_BASIS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Certificate]:
    """(U_r [m, r], S_r [r], V_r [n, r], certificate) of a float32/float64 block W ≈ U S Vᵀ.

    `total` is ‖W‖²_F when the caller has it. The certificate's tolerances are the module's
    constants unless given.
    """
    if total is None:
        total = float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2
    transposed = block.shape[0] > block.shape[1]
    w = block.mT if transposed else block  # [m, n], m <= n: the basis lives on the short side
    m, n = w.shape
    width = rank + oversample
    eps = torch.finfo(w.dtype).eps

    def done(u, s, v, cert):
        return (v, s, u, cert) if transposed else (u, s, v, cert)

    if width >= m or total == 0.0:
        u, s, v = _exact(w, rank)
        why = "all-zero block" if total == 0.0 else f"block narrower than {width} (r + oversample)"
        return done(u, s, v, Certificate("exact", 0, 0, 0, 0.0, 0.0, _residual(total, s), True,
                                         why))

    limit = min(m, max_basis)
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(n, width, generator=generator, dtype=w.dtype).to(w.device)
    basis = torch.empty(m, limit, dtype=w.dtype, device=w.device)  # Q
    images = torch.empty(n, limit, dtype=w.dtype, device=w.device)  # Wᵀ Q
    gram = torch.zeros(limit, limit, dtype=torch.float64)  # Qᵀ W Wᵀ Q, on the CPU
    ritz = _Ritz(rank, total, eps)
    tiny = NOISE * eps
    q = torch.linalg.qr(w @ start)[0]
    k, passes, steps = 0, 1, 0
    note = ""
    while True:
        b = q.shape[1]
        basis[:, k : k + b] = q
        y = w.mT @ q
        images[:, k : k + b] = y
        x = w @ y  # W Wᵀ q: its coordinates in the basis are the new columns of the Gram
        passes += 2
        k += b
        steps += 1
        q, column, rest = _extend(x, basis[:, :k])
        column = column.double().cpu()
        gram[:k, k - b : k] = column
        gram[k - b : k, :k] = column.mT
        ritz.add(torch.linalg.eigvalsh(gram[:k, :k]).flip(0))
        sv_change, excess = ritz.figures()
        if sv_change <= sv_tolerance and excess <= residual_tolerance:
            break
        if k == m or rest <= tiny * float(torch.linalg.vector_norm(column)):
            sv_change = excess = 0.0  # the basis spans an invariant subspace: Ritz values exact
            break
        if k >= limit:
            note = f"not certified within {limit} basis columns"
            break
        q = q[:, : limit - k]
    if note:
        u, s, v = _exact(w, rank)
        return done(u, s, v, Certificate("exact", steps, passes, k, sv_change, excess,
                                         _residual(total, s), True, note))
    theta, vectors = torch.linalg.eigh(gram[:k, :k])
    top = vectors[:, -rank:].flip(1)  # [k, r], largest first
    z = (images[:, :k] @ top.to(images)).double()  # [n, r] = (U_rᵀ W)ᵀ with U_r = Q top
    v, s, ph = torch.linalg.svd(z, full_matrices=False)  # z = v diag(s) ph
    u = basis[:, :k] @ (top.to(ph) @ ph.mT).to(w.dtype)
    cert = Certificate("krylov", steps, passes, k, sv_change, excess,
                       _residual(total, s), True)
    return done(u, s.to(w.dtype), v.to(w.dtype), cert)
