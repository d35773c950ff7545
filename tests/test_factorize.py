"""Rank-r LoRA factors of a teacher block (paratransfer.extract.factorize)."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paratransfer.extract.factorize import FACTORIZERS, Factors, factorize
from paratransfer.io.errors import UserError


def truncated_svd(w: torch.Tensor, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-r approximation and all singular values, independently via numpy float64."""
    u, s, vt = np.linalg.svd(w.to(torch.float64).numpy(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank], s


def with_spectrum(m: int, n: int, singular_values: torch.Tensor, seed: int) -> torch.Tensor:
    """A float64 [m, n] matrix with exactly the given singular values (random singular vectors)."""
    g = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return (u * singular_values) @ v.T


def frobenius(x) -> float:
    return float(np.linalg.norm(np.asarray(x, dtype=np.float64)))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 24), st.integers(1, 24), st.data(), st.integers(0, 2**31 - 1))
def test_exact_is_the_best_rank_r_approximation(m, n, data, seed):
    rank = data.draw(st.integers(1, min(m, n)))
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    f = factorize(w, rank, "exact")
    assert f.B.shape == (m, rank) and f.A.shape == (rank, n)
    best, s = truncated_svd(w, rank)
    # The rank-r error is unique even when singular vectors are not (degenerate σ_r).
    err = frobenius((f.B @ f.A).numpy() - w.numpy())
    best_err = frobenius(best - w.numpy())
    assert err == pytest.approx(best_err, rel=1e-7, abs=1e-9)
    assert f.energy == pytest.approx(float((s[:rank] ** 2).sum() / (s**2).sum()), rel=1e-9)


@pytest.mark.parametrize(("m", "n"), [(40, 25), (25, 40), (30, 30)])
@pytest.mark.parametrize("rank", [1, 4, 16])
def test_exact_matches_truncated_svd_in_float32(m, n, rank):
    spectrum = 2.0 ** -torch.arange(min(m, n), dtype=torch.float64) * 10  # distinct, gapped
    w = with_spectrum(m, n, spectrum, seed=rank).to(torch.float32)
    f = factorize(w, rank, "exact")
    assert f.B.dtype == f.A.dtype == torch.float32
    best, s = truncated_svd(w, rank)
    np.testing.assert_allclose((f.B @ f.A).numpy(), best, atol=1e-5 * float(s[0]))
    assert f.energy == pytest.approx(float((s[:rank] ** 2).sum() / (s**2).sum()), rel=1e-5)
    # B = U_r Σ_r and A = V_rᵀ: A's rows are orthonormal, B's column norms are σ_1..σ_r.
    torch.testing.assert_close(f.A @ f.A.T, torch.eye(rank), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        f.B.norm(dim=0).double(), torch.tensor(s[:rank]), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("seed", range(5))
def test_eckart_young_beats_random_rank_r_approximations(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(30, 20, generator=g)
    rank = 5
    f = factorize(w, rank, "exact")
    err = torch.linalg.norm(f.B @ f.A - w)
    # a random pair, and the (better) projection of W onto a random r-dim column space
    random_pair = torch.randn(30, rank, generator=g) @ torch.randn(rank, 20, generator=g)
    q, _ = torch.linalg.qr(torch.randn(30, rank, generator=g))
    projection = q @ (q.T @ w)
    assert err <= torch.linalg.norm(random_pair - w)
    assert err <= torch.linalg.norm(projection - w)


@pytest.mark.parametrize(("m", "n"), [(200, 120), (120, 200)])
def test_randomized_is_close_to_exact_on_decaying_spectrum(m, n):
    spectrum = 0.7 ** torch.arange(min(m, n), dtype=torch.float64)
    w = with_spectrum(m, n, spectrum, seed=1).to(torch.float32)
    exact = factorize(w, 16, "exact")
    approx = factorize(w, 16, "randomized", seed=3)
    diff = torch.linalg.norm(approx.B @ approx.A - exact.B @ exact.A)
    assert diff <= 1e-4 * torch.linalg.norm(w)
    assert approx.energy == pytest.approx(exact.energy, rel=1e-5)


def test_randomized_is_reproducible_and_leaves_global_rng_alone():
    w = torch.randn(80, 60, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    a = factorize(w, 8, "randomized", seed=5)
    b = factorize(w, 8, "randomized", seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.B, b.B) and torch.equal(a.A, b.A) and a.energy == b.energy


def test_randomized_seed_changes_the_sketch():
    w = torch.randn(80, 60, generator=torch.Generator().manual_seed(0))  # flat spectrum
    a = factorize(w, 8, "randomized", seed=1)
    b = factorize(w, 8, "randomized", seed=2)
    assert not torch.equal(a.B, b.B)


def test_exact_is_reproducible():
    w = torch.randn(50, 30, generator=torch.Generator().manual_seed(0))
    a, b = factorize(w, 6, "exact"), factorize(w, 6, "exact")
    assert torch.equal(a.B, b.B) and torch.equal(a.A, b.A)


def test_exact_uses_economy_svd():
    calls = []
    real_svd = torch.linalg.svd

    def spy(x, *args, **kwargs):
        calls.append(kwargs.get("full_matrices", True))
        return real_svd(x, *args, **kwargs)

    with mock.patch.object(torch.linalg, "svd", spy):
        f = factorize(torch.randn(60, 10), 3, "exact")
    assert calls == [False]
    assert f.B.shape == (60, 3)


@pytest.mark.parametrize("method", sorted(FACTORIZERS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_factors_come_back_contiguous_in_the_input_dtype(method, dtype):
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(0)).to(dtype)
    f = factorize(w.T, 4, method)  # a non-contiguous view, as Selection.take returns
    assert isinstance(f, Factors)
    assert f.B.dtype == f.A.dtype == dtype
    assert f.B.is_contiguous() and f.A.is_contiguous()
    assert f.B.shape == (24, 4) and f.A.shape == (4, 40)
    assert 0.0 < f.energy <= 1.0


@pytest.mark.parametrize("method", sorted(FACTORIZERS))
def test_zero_block_keeps_everything(method):
    f = factorize(torch.zeros(12, 9), 3, method)
    assert f.energy == 1.0
    assert torch.count_nonzero(f.B @ f.A) == 0


@pytest.mark.parametrize("method", sorted(FACTORIZERS))
def test_full_rank_keeps_all_energy(method):
    w = torch.randn(10, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    f = factorize(w, 7, method)
    assert f.energy == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(f.B @ f.A, w)


@pytest.mark.parametrize("rank", [0, -1, 11, 50])
def test_rank_outside_the_block_is_a_user_error(rank):
    with pytest.raises(UserError, match=r"rank .*\[12, 10\] block") as err:
        factorize(torch.randn(12, 10), rank)
    assert "\n" not in str(err.value)


def test_unknown_method_names_the_known_ones():
    with pytest.raises(UserError, match="randomized") as err:
        factorize(torch.randn(5, 5), 2, "qr")
    assert "exact" in str(err.value)


def test_non_matrix_and_non_finite_blocks_are_user_errors():
    with pytest.raises(UserError, match="2-D"):
        factorize(torch.randn(2, 3, 4), 1)
    w = torch.randn(5, 5)
    w[1, 1] = float("inf")
    with pytest.raises(UserError, match="infinite"):
        factorize(w, 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_blocks_are_user_errors(bad):
    w = torch.randn(6, 5)
    w[4, 2] = bad
    with pytest.raises(UserError, match="NaN or infinite"):
        factorize(w, 2, "randomized")


def test_huge_finite_values_are_not_mistaken_for_infinite():
    # float32 ||W||² overflows here although every entry is finite
    w = torch.randn(20, 12, generator=torch.Generator().manual_seed(0)) * 1e20
    f = factorize(w, 3)
    _, s = truncated_svd(w, 3)
    assert f.energy == pytest.approx(float((s[:3] ** 2).sum() / (s**2).sum()), rel=1e-5)
