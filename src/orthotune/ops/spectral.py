"""Spectral bases and sparse spectral updates: the math of LoCA and FourierFT.

A spectrum ``C`` (d_out x d_in) with n non-zeros ``c_k`` at cells ``(r_k, s_k)`` maps back to the
weight domain through two bases, ``dW = B_out^T C B_in``. Only n cells are non-zero, so

    dW = sum_k c_k outer(B_out[r_k], B_in[s_k]) = P^T diag(c) Q,   P = B_out[r], Q = B_in[s],

a rank-n product: applied to activations it costs ``n (d_in + d_out)`` per token and never forms
``C`` or ``dW`` (:func:`sparse_apply`). With the orthonormal DCT-II matrix ``D`` as the basis this
is the 2-D inverse DCT ``D_out^T C D_in`` (``scipy.fft.idctn(C, norm="ortho")``); the real part of
the 2-D inverse DFT is the same product with a rank-2n basis of cosines and sines, since
``cos(a + b) = cos a cos b - sin a sin b`` (:func:`dft_rows`).

Basis rows are made, only those a layer uses, at each call (from a table of the 4n distinct values): a
14336-wide layer with n=1000 needs 1000 rows, not the 14336 x 14336 table (411 MB in bf16) a
shared cache would hold, and the rows are a pure function of (size, locations, dtype), so forward
reads no hidden state and a compiled graph builds them like any other op. :func:`located_dct_rows`
gives the locations a gradient by central finite differences on the spectrum (LoCA, Du et al.,
ICLR 2025, arXiv:2502.06820).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import fused_rows


def _phase_dtype(n: int) -> torch.dtype:
    """int32 holds every product ``(2j + 1) k < 2 n^2`` up to n = 32767; int64 beyond."""
    return torch.int32 if 2 * n * n < 2**31 else torch.int64


def _cos_table(n: int, device: torch.device | str | None) -> Tensor:
    """``cos(pi m / 2n)`` for m in [0, 4n), float64: every value a row of the n-point DCT-II takes."""
    return torch.cos(torch.arange(4 * n, dtype=torch.float64, device=device) * (math.pi / (2 * n)))


def _dct_phase(n: int, index: Tensor) -> Tensor:
    """``(2j + 1) k mod 4n`` (len(index) x n) for k in ``index``: exact in integers, then reduced in place."""
    phases = _phase_dtype(n)
    odd = torch.arange(1, 2 * n, 2, dtype=phases, device=index.device)
    return torch.outer(index.to(phases), odd).remainder_(4 * n)


def dct_rows(n: int, index: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Rows ``index`` of the orthonormal DCT-II matrix ``D`` (len(index) x n) on ``index``'s device.

    ``D[k, j] = sqrt(2/n) cos(pi (2j + 1) k / 2n)`` (row 0 times ``1/sqrt 2``) takes only 4n values: the
    phase ``(2j + 1) k`` is reduced exactly in integers mod ``4n`` and indexes a table of those values made
    in float64 and rounded once (one more entry, ``sqrt(1/n)``, for row 0). Every entry is the correctly
    rounded value in any dtype, and a row costs one integer product, one remainder and one gather.
    """
    table = _cos_table(n, index.device)
    table = torch.cat([table * math.sqrt(2.0 / n), table.new_full((1,), math.sqrt(1.0 / n))]).to(dtype)
    k = index.unsqueeze(-1)
    return table[_dct_phase(n, index) + torch.where(k == 0, 4 * n, 0).to(_phase_dtype(n))]


def cos_rows(n: int, index: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The DCT-II rows without their norms: ``cos(pi (2j + 1) k / 2n)`` for k in ``index`` (len(index) x n).

    ``dct_rows(n, k) = dct_scales(n, k) * cos_rows(n, k)``; applying the norms to the few coefficients
    that multiply the rows instead of to every entry saves a pass over the (len(index) x n) rows. Correctly
    rounded in any dtype, as :func:`dct_rows`.
    """
    return cos_rows_of(cos_table(n, dtype, index.device), index)


def cos_table(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """The 4n values ``cos(pi m / 2n)`` the n-point DCT-II rows take, made in float64 and rounded once to ``dtype``:
    one table serves every layer of width n (:func:`cos_rows_of`)."""
    return _cos_table(n, device).to(dtype)


def cos_rows_of(table: Tensor, index: Tensor) -> Tensor:
    """:func:`cos_rows` from a :func:`cos_table` (n = ``len(table) / 4``): an integer product, a remainder, a gather;
    in eager code on a GPU one kernel that writes only the rows (:mod:`orthotune.ops.fused_rows`, the same values).
    A compiler fuses the three itself (on an H200 0.5-1% faster than calling the kernel from the graph)."""
    if fused_rows.available(table) and not table.requires_grad and not torch.compiler.is_compiling():
        return torch.ops.orthotune.cos_rows(table, index)
    return table[_dct_phase(table.shape[0] // 4, index)]


def cell_scales(cells: Tensor, d_out: int, d_in: int) -> Tensor:
    """``dct_scales(d_out, rows) * dct_scales(d_in, cols)`` for ``cells`` = (rows, cols) (2 x n), float64:
    ``sqrt((1 + [r != 0]) (1 + [s != 0]) / (d_out d_in))``, the norms of the 2-D DCT basis at those cells."""
    return (cells != 0).add(1).prod(0).to(torch.float64).mul_(1.0 / (d_out * d_in)).sqrt_()


def dct_scales(n: int, index: Tensor) -> Tensor:
    """The norms of the orthonormal DCT-II rows at ``index``, float64: ``sqrt(2/n)``, ``sqrt(1/n)`` for row 0."""
    return (index != 0).to(torch.float64).add_(1.0).mul_(1.0 / n).sqrt_()


def dft_rows(n: int, index: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[cos(2 pi k j / n); sin(2 pi k j / n)]`` for k in ``index`` (2 len(index) x n): the phase ``k j`` is
    reduced mod n in integers and indexes tables of the n values, made in float64 and rounded once."""
    angle = torch.arange(n, dtype=torch.float64, device=index.device) * (2 * math.pi / n)
    k = index.to(_phase_dtype(n)).unsqueeze(-1)
    phase = (k * torch.arange(n, dtype=k.dtype, device=index.device)).remainder(n)
    return torch.cat([torch.cos(angle).to(dtype)[phase], torch.sin(angle).to(dtype)[phase]], 0)


def dct_basis(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """The full orthonormal DCT-II matrix ``D`` (n x n, row k = frequency k): ``dct(x) = D x``, ``D^T D = I``."""
    return dct_rows(n, torch.arange(n, device=device), dtype)


class _LocatedDCTRows(torch.autograd.Function):
    """``D[round(positions)]`` with the LoCA finite-difference gradient for ``positions``."""

    @staticmethod
    def forward(ctx, n: int, positions: Tensor, dtype: torch.dtype, clip: float | None) -> Tensor:  # type: ignore[override]
        idx = positions.detach().round().long()
        ctx.save_for_backward(idx)
        ctx.n, ctx.clip, ctx.pos_dtype = n, clip, positions.dtype
        return dct_rows(n, idx, dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor, None, None]:  # type: ignore[override]
        (idx,) = ctx.saved_tensors
        n = ctx.n
        up = dct_rows(n, (idx + 1).clamp(max=n - 1), torch.promote_types(grad.dtype, torch.float32))
        down = dct_rows(n, (idx - 1).clamp(min=0), up.dtype)
        # dL/dD[k] . D[r+1] is the loss slope of moving entry k to row r+1: a central difference.
        fd = 0.5 * (grad.to(up.dtype) * (up - down)).sum(-1)
        if ctx.clip is not None:
            fd = fd.clamp(-ctx.clip, ctx.clip)
        return None, fd.to(ctx.pos_dtype), None, None


def located_dct_rows(n: int, positions: Tensor, dtype: torch.dtype = torch.float32, clip: float | None = 1.0) -> Tensor:
    """Rows of the n x n DCT at ``positions`` (rounded), differentiable in the positions by finite differences.

    Backward returns, for entry k at row ``r``, ``(1/2) <dL/dP_k, D[r+1] - D[r-1]>`` (one-sided
    rows repeat at the edges), clamped to ``[-clip, clip]``: the central difference of the loss
    when entry k moves one row, to first order. The coefficient ``c_k`` that multiplies ``P_k``
    downstream is in ``dL/dP_k``, so this is LoCA's estimator
    ``(c_k / 2) (K[r+1, s] - K[r-1, s])`` with ``K = D_out (dL/dW) D_in^T``.
    Integer (or non-differentiable) positions give the plain rows.
    """
    if positions.requires_grad and torch.is_grad_enabled():
        return _LocatedDCTRows.apply(n, positions, dtype, clip)
    return dct_rows(n, positions.detach().round().long(), dtype)


def sparse_delta(P: Tensor, Q: Tensor, c: Tensor) -> Tensor:
    """``P^T diag(c) Q`` (d_out x d_in) for ``P`` (m, d_out), ``Q`` (m, d_in): one matmul."""
    return (P.transpose(0, 1) * c) @ Q


def prefers_dense(tokens: int, m: int, d_in: int, d_out: int, grad: bool, merged: bool = False) -> bool:
    """Whether forming ``dW`` (m d_in d_out multiply-adds) beats the rank-m path on activations.

    Rank-m on activations: ``T m (d_in + d_out)`` forward and about as much backward. Dense, applied
    beside the base layer: the ``m d_in d_out`` product plus ``T d_in d_out`` forward; backward adds
    the input gradient and the weight gradient (``2 T d_in d_out``) and ``m d_in d_out`` for the
    coefficients: it only wins when ``m (d_in + d_out)`` exceeds about ``d_in d_out``. ``merged``:
    ``dW`` is folded into the frozen weight (:func:`add_sparse_delta`), so the forward costs only the
    ``m d_in d_out`` product and backward the weight gradient and the coefficients' projection:
    it wins from a few dozen tokens on (n=1000 at 4096 tokens: 4.2G + 21G against 50G multiply-adds).
    """
    lowrank = tokens * m * (d_in + d_out)
    if merged:
        dense = m * d_in * d_out
        if grad:
            lowrank *= 2
            dense += tokens * d_in * d_out + m * d_in * d_out
        return dense < lowrank
    dense = m * d_in * d_out + tokens * d_in * d_out
    if grad:
        lowrank *= 2
        dense += 2 * tokens * d_in * d_out + m * d_in * d_out
    return dense < lowrank


def add_sparse_delta(W: Tensor, P: Tensor, Q: Tensor, c: Tensor) -> Tensor:
    """``W + P^T diag(c) Q`` in one ``addmm`` (the frozen weight with the update folded in)."""
    return torch.addmm(W, P.transpose(0, 1) * c, Q)


def sparse_apply(x: Tensor, P: Tensor, Q: Tensor, c: Tensor, compute: str = "auto") -> Tensor:
    """``x dW^T`` for ``dW = P^T diag(c) Q`` and rows ``x`` (..., d_in), all in x's dtype.

    ``compute``: ``"lowrank"`` = ``((x Q^T) * c) P`` (O(m (d_in + d_out)) per token, no dense
    matrix), ``"dense"`` = form ``dW`` once and apply it, ``"auto"`` = the cheaper by
    :func:`prefers_dense` for this call's token count.
    """
    if compute == "auto":
        grad = torch.is_grad_enabled() and (x.requires_grad or c.requires_grad or P.requires_grad or Q.requires_grad)
        tokens = x.numel() // max(x.shape[-1], 1)
        compute = "dense" if prefers_dense(tokens, c.shape[0], Q.shape[1], P.shape[1], grad) else "lowrank"
    if compute == "dense":
        return x @ sparse_delta(P, Q, c).transpose(0, 1)
    return ((x @ Q.transpose(0, 1)) * c) @ P


def dft_factors(rows: Tensor, cols: Tensor, shape: tuple[int, int], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(P, Q)`` (2n x d_out, 2n x d_in) with ``Re(iDFT2)`` of a sparse spectrum ``= P^T diag([c, -c]) Q * 1/(d_out d_in)``."""
    d_out, d_in = shape
    return dft_rows(d_out, rows, dtype), dft_rows(d_in, cols, dtype)


def distinct_cells(total: int, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` distinct flat cell indices drawn uniformly from ``range(total)`` without a full permutation."""
    if n > total:
        raise ValueError(f"cannot draw {n} distinct cells out of {total}")
    if total <= 4 * n:
        return torch.randperm(total, generator=generator)[:n]
    cells = torch.empty(0, dtype=torch.int64)
    while cells.numel() < n:
        cells = torch.unique(torch.cat([cells, torch.randint(total, (n,), generator=generator)]))
    return cells[torch.randperm(cells.numel(), generator=generator)[:n]]
