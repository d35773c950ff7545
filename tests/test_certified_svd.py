"""`--svd auto`: block Krylov with a certificate (paratransfer.extract.certified_svd), against numpy's SVD.

What is promised: the top-r singular values within 1e-4 (relative) of the exact ones, the
residual ‖W − U S Vᵀ‖²_F within 1e-4 (relative) of the best rank-r residual — both down to
the dtype's resolution, a few ε·σ₁ and ε·‖W‖² — for every kind of spectrum; seeded and
reproducible.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paratransfer.extract.certified_svd import MAX_BASIS, certified_svd
from paratransfer.extract.factorize import factorize

TOLERANCE = 1e-4
SPECTRA = ("decaying", "slow", "flat", "repeated", "rank-deficient", "zero")


def with_spectrum(m: int, n: int, values: np.ndarray, seed: int) -> torch.Tensor:
    """A float64 [m, n] matrix with exactly these singular values (random singular vectors)."""
    g = torch.Generator().manual_seed(seed)
    k = len(values)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return (u * torch.as_tensor(values, dtype=torch.float64)) @ v.T


@st.composite
def matrices(draw, kinds=SPECTRA, sizes=(12, 64)):
    """(kind, W float64, rank, oversample): shapes, ranks and spectra of every kind."""
    m, n = draw(st.integers(*sizes)), draw(st.integers(*sizes))
    k = min(m, n)
    rank = draw(st.integers(1, max(1, k // 3)))
    oversample = draw(st.integers(0, 6))
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**31 - 1))
    i = np.arange(k, dtype=np.float64)
    if kind == "flat":  # Gaussian: no gap anywhere near r
        w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return kind, w, rank, oversample
    if kind == "decaying":
        values = np.exp(-draw(st.floats(0.05, 1.0)) * i)
    elif kind == "slow":
        values = (i + 1) ** -draw(st.floats(0.1, 1.0))
    elif kind == "repeated":  # plateaus, one of them usually straddling r
        levels = sorted(draw(st.lists(st.floats(0.1, 10.0), min_size=1, max_size=4)), reverse=True)
        counts = [draw(st.integers(1, k)) for _ in levels]
        values = np.concatenate([np.full(c, v) for v, c in zip(levels, counts, strict=True)])[:k]
        if draw(st.booleans()):  # a decaying tail below the plateaus, else zeros
            tail = levels[-1] * 0.9 * draw(st.floats(0.3, 0.95)) ** np.arange(k - len(values))
        else:
            tail = np.zeros(k - len(values))
        values = np.concatenate([values, tail])
    elif kind == "rank-deficient":
        kept = draw(st.integers(1, rank + 3))
        values = np.where(i < kept, 1.0 + np.cos(i), 0.0)
        values = np.sort(values)[::-1].copy()
    else:
        values = np.zeros(k)
    return kind, with_spectrum(m, n, values, seed), rank, oversample


def check_against_exact(w: torch.Tensor, u, s, v, rank: int) -> None:
    """The promise, against numpy's float64 SVD of the same matrix."""
    w64 = w.to(torch.float64).numpy()
    exact = np.linalg.svd(w64, compute_uv=False)
    eps = torch.finfo(w.dtype).eps
    # Rounding in w.dtype moves singular values by about eps·σ_max times a factor that grows
    # with the matrix's size (the products of the Krylov iterations add to it).
    sigma_floor = 8 * eps * np.sqrt(max(w.shape)) * exact[0]
    got = s.to(torch.float64).numpy()
    assert np.all(np.abs(got - exact[:rank]) <= TOLERANCE * exact[:rank] + sigma_floor), (
        got, exact[:rank])
    approx = (u.to(torch.float64) * s.to(torch.float64)) @ v.to(torch.float64).T
    residual = float(np.sum((w64 - approx.numpy()) ** 2))
    best = float(np.sum(exact[rank:] ** 2))
    total = float(np.sum(exact**2))
    assert residual <= best * (1 + TOLERANCE) + 16 * eps * total
    assert residual >= best - 16 * eps * total  # Eckart-Young: nothing beats the exact SVD
    for factor in (u, v):
        gram = factor.to(torch.float64).T @ factor.to(torch.float64)
        torch.testing.assert_close(gram, torch.eye(rank, dtype=torch.float64), atol=512 * eps,
                                   rtol=0)


@settings(max_examples=120, deadline=None)
@given(matrices(), st.integers(0, 2**31 - 1))
def test_auto_matches_exact_on_every_kind_of_spectrum(case, seed):
    kind, w, rank, oversample = case
    u, s, v, cert = certified_svd(w, rank, seed, oversample=oversample)
    assert u.shape == (w.shape[0], rank) and v.shape == (w.shape[1], rank) and s.shape == (rank,)
    check_against_exact(w, u, s, v, rank)
    assert cert.certified
    assert cert.method in ("krylov", "exact")
    total = float(torch.sum(w**2))
    residual = float(torch.sum((w - (u * s) @ v.T) ** 2))
    assert cert.residual == pytest.approx(residual / total if total else 0.0, rel=1e-6, abs=1e-12)
    if cert.method == "krylov":
        assert cert.sv_change <= 1e-5 and cert.excess_estimate <= TOLERANCE
        assert cert.passes == 1 + 2 * cert.steps


@settings(max_examples=40, deadline=None)
@given(matrices(kinds=("decaying", "slow", "flat", "repeated")), st.integers(0, 2**31 - 1))
def test_auto_in_float32_matches_exact_to_float32_resolution(case, seed):
    _, w, rank, oversample = case
    w = w.to(torch.float32)
    u, s, v, cert = certified_svd(w, rank, seed, oversample=oversample)
    assert u.dtype == s.dtype == v.dtype == torch.float32
    check_against_exact(w, u, s, v, rank)


def test_flat_spectrum_is_certified_before_the_basis_fills_the_space():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u, s, v, cert = certified_svd(w, 8, seed=1)
    assert cert.method == "krylov" and cert.basis < 200
    check_against_exact(w, u, s, v, 8)


def test_a_decaying_spectrum_needs_fewer_steps_than_a_flat_one():
    flat = torch.randn(300, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    decaying = with_spectrum(300, 200, 0.7 ** np.arange(200), seed=0)
    steps = {}
    for name, w in (("flat", flat), ("decaying", decaying)):
        u, s, v, cert = certified_svd(w, 8, seed=1)
        assert cert.method == "krylov"
        check_against_exact(w, u, s, v, 8)
        steps[name] = cert.steps
    assert steps["decaying"] < steps["flat"]


def test_out_of_budget_falls_back_to_the_exact_svd():
    w = torch.randn(120, 100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u, s, v, cert = certified_svd(w, 4, seed=0, oversample=4, max_basis=16)
    assert cert.method == "exact" and "not certified" in cert.note
    assert cert.steps == 2 and cert.basis == 16  # it tried, then gave up
    report = cert.as_dict()
    assert report["method"] == "exact" and json.loads(json.dumps(report, allow_nan=False))
    check_against_exact(w, u, s, v, 4)
    exact = torch.linalg.svdvals(w)[:4]
    torch.testing.assert_close(s, exact)


def test_narrow_and_zero_blocks_take_the_exact_path():
    w = torch.randn(40, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, _, _, cert = certified_svd(w, 2, seed=0)  # r + oversample >= 10
    assert cert.method == "exact" and cert.steps == 0
    u, s, v, cert = certified_svd(torch.zeros(50, 60), 3, seed=0)
    assert cert.method == "exact" and cert.residual == 0.0
    assert torch.count_nonzero(s) == 0 and u.shape == (50, 3) and v.shape == (60, 3)


def test_seeded_reproducible_and_leaves_the_global_rng_alone():
    w = torch.randn(200, 150, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    a = certified_svd(w, 6, seed=5)
    b = certified_svd(w, 6, seed=5)
    c = certified_svd(w, 6, seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3], strict=True)) and a[3] == b[3]
    assert not torch.equal(a[0], c[0])  # another start, another (equally good) basis
    check_against_exact(w, *c[:3], 6)


def test_tall_and_wide_blocks_give_transposed_factors():
    w = torch.randn(90, 250, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    u, s, v, _ = certified_svd(w, 5, seed=2)
    ut, st_, vt, _ = certified_svd(w.T.contiguous(), 5, seed=2)
    torch.testing.assert_close(s, st_)
    torch.testing.assert_close((u * s) @ v.T, ((ut * st_) @ vt.T).T)


def test_factorize_auto_reports_its_certificate():
    w = torch.randn(160, 120, generator=torch.Generator().manual_seed(0))
    f = factorize(w, 8, "auto", seed=1)
    assert f.svd["method"] == "krylov" and f.svd["certified"] is True
    assert f.svd["steps"] >= 1 and f.svd["passes"] == 1 + 2 * f.svd["steps"]
    assert f.svd["sv_change"] <= 1e-5 and f.svd["excess_estimate"] <= TOLERANCE
    assert f.energy == pytest.approx(1 - f.svd["residual"], abs=1e-6)
    exact = factorize(w, 8, "exact")
    assert f.energy == pytest.approx(exact.energy, rel=TOLERANCE)
    assert exact.svd["method"] == "exact" and exact.svd["seconds"] >= 0
    assert factorize(w, 8).svd["method"] == "krylov"  # the default


def test_budget_is_bounded():
    assert MAX_BASIS >= 512 and math.isfinite(MAX_BASIS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_blocks_device():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    u, s, v, cert = certified_svd(w.cuda(), 8, seed=1)
    assert u.is_cuda and s.is_cuda and v.is_cuda
    check_against_exact(w, u.cpu(), s.cpu(), v.cpu(), 8)
