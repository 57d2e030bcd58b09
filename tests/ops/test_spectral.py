"""The spectral ops against scipy/numpy in float64, and LoCA's finite-difference location gradient."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch

from orthotune.ops import spectral

from ..oracles import idct2_sparse, idft2_real_sparse


def _sparse(shape: tuple[int, int], n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    cells = spectral.distinct_cells(shape[0] * shape[1], n, generator=g)
    rows, cols = cells // shape[1], cells % shape[1]
    c = torch.randn(n, dtype=torch.float64, generator=g)
    dense = np.zeros(shape)
    dense[rows.numpy(), cols.numpy()] = c.numpy()
    return c, rows, cols, dense


@pytest.mark.parametrize("shape", [(7, 5), (16, 16), (12, 33)])
def test_idct2_matches_scipy_idctn_ortho(shape: tuple[int, int]) -> None:
    c, rows, cols, dense = _sparse(shape, n=min(20, shape[0] * shape[1]))
    ours = idct2_sparse(c, rows, cols, shape)
    ref = scipy.fft.idctn(dense, norm="ortho")
    assert np.abs(ours.numpy() - ref).max() < 1e-13


@pytest.mark.parametrize("n", [1, 9, 64])
def test_dct_basis_is_orthonormal_and_is_scipy_dct(n: int) -> None:
    D = spectral.dct_basis(n, torch.float64)
    assert torch.allclose(D @ D.T, torch.eye(n, dtype=torch.float64), atol=1e-14)
    assert np.abs(D.numpy() - scipy.fft.dct(np.eye(n), norm="ortho", axis=0)).max() < 1e-14


def test_idft2_real_matches_numpy_ifft2() -> None:
    shape = (10, 14)
    c, rows, cols, dense = _sparse(shape, n=25, seed=1)
    ours = idft2_real_sparse(c, rows, cols, shape)
    assert np.abs(ours.numpy() - np.fft.ifft2(dense).real).max() < 1e-15


def test_rows_are_the_rows_of_the_full_basis_in_any_dtype_and_order() -> None:
    index = torch.tensor([5, 0, 11, 5])
    assert torch.equal(spectral.dct_rows(12, index, torch.float64), spectral.dct_basis(12, torch.float64)[index])
    dft = np.fft.fft(np.eye(10))  # row k = exp(-2 pi i k j / n): cos and -sin
    got = spectral.dft_rows(10, torch.tensor([3, 7]), torch.float64).numpy()
    assert np.abs(got[:2] - dft[[3, 7]].real).max() < 1e-14 and np.abs(got[2:] + dft[[3, 7]].imag).max() < 1e-14
    assert spectral.dct_rows(12, index, torch.bfloat16).dtype == torch.bfloat16


def test_rows_of_a_wide_basis_are_correctly_rounded_in_every_dtype() -> None:
    """Exact integer phase reduction and a float64 table: rows of a 14336-wide basis in float32 and bf16 are the
    float64 rows rounded once (an angle left unreduced, up to pi n, would be off by about 1e-3 of the row's scale)."""
    n, index = 14336, torch.tensor([0, 1, 7000, 14334, 14335])
    for rows in (spectral.dct_rows, spectral.dft_rows, spectral.cos_rows):
        ref = rows(n, index, torch.float64)
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(rows(n, index, dtype), ref.to(dtype))
    D = spectral.dct_rows(n, index, torch.float64)
    assert torch.allclose(D @ D.T, torch.eye(len(index), dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 13, 64])
def test_dct_rows_are_their_norms_times_the_cosines(n: int) -> None:
    index = torch.tensor([0, n - 1, n // 2, 0])
    ref = scipy.fft.dct(np.eye(n), norm="ortho", axis=0)[index.numpy()]
    split = spectral.dct_scales(n, index)[:, None] * spectral.cos_rows(n, index, torch.float64)
    assert spectral.dct_scales(n, index).dtype == torch.float64
    assert np.abs(split.numpy() - ref).max() < 1e-14


@pytest.mark.parametrize("compute", ["lowrank", "dense", "auto"])
def test_sparse_apply_equals_dense_delta(compute: str) -> None:
    c, rows, cols, _ = _sparse((9, 13), n=15, seed=2)
    P = spectral.dct_basis(9, torch.float64)[rows]
    Q = spectral.dct_basis(13, torch.float64)[cols]
    x = torch.randn(4, 3, 13, dtype=torch.float64)
    dW = spectral.sparse_delta(P, Q, c)
    assert torch.allclose(spectral.sparse_apply(x, P, Q, c, compute), x @ dW.T, atol=1e-13)


def test_cost_rule_prefers_lowrank_for_sparse_spectra_and_dense_for_crowded_ones() -> None:
    # LoCA n=1000 on Llama-2048 projections, 4096 tokens: rank-n on activations.
    assert not spectral.prefers_dense(4096, 1000, 2048, 2048, grad=True)
    assert not spectral.prefers_dense(4096, 1000, 2048, 5632, grad=False)
    # FourierFT n=3000 (rank 6000) on a 768 x 768 layer: forming dW once is cheaper.
    assert spectral.prefers_dense(4096, 6000, 768, 768, grad=True)
    # One token (decoding): never form a dense matrix for it.
    assert not spectral.prefers_dense(1, 6000, 768, 768, grad=False)


def test_distinct_cells_are_distinct_and_in_range() -> None:
    g = torch.Generator().manual_seed(0)
    for total, n in [(10, 10), (1000, 30), (10**9, 500)]:
        cells = spectral.distinct_cells(total, n, generator=g)
        assert cells.numel() == n == cells.unique().numel() and 0 <= cells.min() and cells.max() < total
    with pytest.raises(ValueError, match="distinct"):
        spectral.distinct_cells(5, 6)


def _loss_at(rows: torch.Tensor, cols: torch.Tensor, c: torch.Tensor, loss_of_delta) -> float:
    d_out, d_in = loss_of_delta.shape
    return float(loss_of_delta(idct2_sparse(c, rows, cols, (d_out, d_in))))


class _Loss:
    """A loss of dW and its dense central difference when one entry moves by one row or column."""

    def __init__(self, fn, shape: tuple[int, int]) -> None:
        self.fn, self.shape = fn, shape

    def __call__(self, dW: torch.Tensor) -> torch.Tensor:
        return self.fn(dW)

    def central_difference(self, rows, cols, c, k: int, axis: int) -> float:
        """(L(entry k at +1) - L(entry k at -1)) / 2, edges repeated as in the estimator."""
        last = self.shape[axis] - 1
        moved = []
        for step in (1, -1):
            loc = [rows.clone(), cols.clone()]
            loc[axis][k] = (loc[axis][k] + step).clamp(0, last)
            moved.append(_loss_at(loc[0], loc[1], c, self))
        return (moved[0] - moved[1]) / 2


def _fd_gradient(rows, cols, c, loss: _Loss, clip=None) -> torch.Tensor:
    d_out, d_in = loss.shape
    pos = torch.stack([rows, cols]).double().requires_grad_()
    P = spectral.located_dct_rows(d_out, pos[0], torch.float64, clip)
    Q = spectral.located_dct_rows(d_in, pos[1], torch.float64, clip)
    loss(spectral.sparse_delta(P, Q, c)).backward()
    return pos.grad


def test_fd_location_gradient_is_exact_for_a_spectral_least_squares_loss() -> None:
    """||dW - T||^2 / 2 is quadratic with identity Hessian in the spectrum: the estimator is exact there."""
    shape, n = (12, 10), 8
    c, rows, cols, _ = _sparse(shape, n, seed=3)
    T = torch.randn(shape, dtype=torch.float64)
    loss = _Loss(lambda dW: 0.5 * (dW - T).pow(2).sum(), shape)
    grad = _fd_gradient(rows, cols, c, loss)
    for axis in (0, 1):
        ref = torch.tensor([loss.central_difference(rows, cols, c, k, axis) for k in range(n)], dtype=torch.float64)
        interior = (torch.stack([rows, cols])[axis] > 0) & (torch.stack([rows, cols])[axis] < shape[axis] - 1)
        assert torch.allclose(grad[axis][interior], ref[interior], atol=1e-12)


def test_fd_location_gradient_points_to_the_known_best_location() -> None:
    """One coefficient, target = the same coefficient 3 rows and 2 columns away: the gradient must point there."""
    shape = (16, 16)
    r_star, s_star, a = 9, 5, 1.5
    T = idct2_sparse(torch.tensor([a], dtype=torch.float64), torch.tensor([r_star]), torch.tensor([s_star]), shape)
    # A smooth (activation-regression) loss so that distant cells still see a slope.
    X = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    X = X @ torch.linalg.matrix_exp(0.3 * torch.ones(16, 16, dtype=torch.float64))  # correlated inputs
    loss = _Loss(lambda dW: 0.5 * ((X @ (dW - T).T) ** 2).mean(), shape)
    c = torch.tensor([a], dtype=torch.float64)
    for r, s in [(r_star - 1, s_star), (r_star + 1, s_star), (r_star, s_star - 1), (r_star, s_star + 1)]:
        rows, cols = torch.tensor([r]), torch.tensor([s])
        grad = _fd_gradient(rows, cols, c, loss)
        ref = torch.tensor([loss.central_difference(rows, cols, c, 0, ax) for ax in (0, 1)], dtype=torch.float64)
        # Descent (-grad) moves towards (r*, s*) on the displaced axis; sign and magnitude agree with the dense reference.
        toward = torch.tensor([np.sign(r_star - r), np.sign(s_star - s)], dtype=torch.float64)
        axis = int(toward[1] != 0)
        assert -grad[axis, 0] * toward[axis] > 0
        assert torch.sign(grad[axis, 0]) == torch.sign(ref[axis])
        assert 0.5 < float(grad[axis, 0] / ref[axis]) < 2.0


def test_fd_location_gradient_agrees_with_dense_reference_on_a_generic_loss() -> None:
    shape, n = (20, 24), 30
    c, rows, cols, _ = _sparse(shape, n, seed=4)
    W0 = torch.randn(shape, dtype=torch.float64)
    X = torch.randn(50, shape[1], dtype=torch.float64)
    Y = torch.tanh(X @ torch.randn(shape, dtype=torch.float64).T)
    loss = _Loss(lambda dW: ((torch.tanh(X @ (W0 + dW).T) - Y) ** 2).mean(), shape)
    grad = _fd_gradient(rows, cols, c, loss)
    for axis in (0, 1):
        ref = torch.tensor([loss.central_difference(rows, cols, c, k, axis) for k in range(n)], dtype=torch.float64)
        agree = (torch.sign(grad[axis]) == torch.sign(ref)).double().mean()
        corr = torch.corrcoef(torch.stack([grad[axis], ref]))[0, 1]
        size = float(grad[axis].norm() / ref.norm())
        assert agree >= 0.9 and corr > 0.9 and 0.5 < size < 2.0, (axis, float(agree), float(corr), size)


def test_fd_location_gradient_is_clamped_and_integer_positions_are_plain_gathers() -> None:
    shape = (8, 8)
    c, rows, cols, _ = _sparse(shape, 5, seed=5)
    loss = _Loss(lambda dW: 1e3 * dW.pow(2).sum() + 1e3 * dW.sum(), shape)
    grad = _fd_gradient(rows, cols, 10 * c, loss, clip=1.0)
    assert grad.abs().max() <= 1.0 and (grad.abs() == 1.0).any()
    plain = spectral.located_dct_rows(8, rows.double(), torch.float64, 1.0)
    assert not plain.requires_grad and torch.equal(plain, spectral.dct_basis(8, torch.float64)[rows])
