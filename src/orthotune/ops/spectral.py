"""Spectral bases and sparse spectral updates: the math of LoCA and FourierFT.

A spectrum ``C`` (d_out x d_in) with n non-zeros ``c_k`` at cells ``(r_k, s_k)`` maps back to the
weight domain through two bases, ``dW = B_out^T C B_in``. Only n cells are non-zero, so

    dW = sum_k c_k outer(B_out[r_k], B_in[s_k]) = P^T diag(c) Q,   P = B_out[r], Q = B_in[s],

a rank-n product: applied to activations it costs ``n (d_in + d_out)`` per token and never forms
``C`` or ``dW`` (:func:`sparse_apply`). With the orthonormal DCT-II matrix ``D`` as the basis this
is the 2-D inverse DCT ``D_out^T C D_in`` (``scipy.fft.idctn(C, norm="ortho")``); the real part of
the 2-D inverse DFT is the same product with a rank-2n basis of cosines and sines, since
``cos(a + b) = cos a cos b - sin a sin b`` (:func:`dft_basis`).

Bases are cached once per (size, dtype, device), shared by every layer. :func:`located_rows`
gathers basis rows at discrete locations and gives those locations a gradient by central finite
differences on the spectrum (LoCA, Du et al., ICLR 2025, arXiv:2502.06820).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

_CACHE: dict[tuple[str, int, torch.dtype, torch.device], Tensor] = {}


def _cached(kind: str, n: int, dtype: torch.dtype, device: torch.device | str | None, build: Callable[[int], Tensor]) -> Tensor:
    device = torch.device(device or "cpu")
    key = (kind, n, dtype, device)
    table = _CACHE.get(key)
    if table is None:
        # Built in float64 with exact integer phase reduction, then rounded once to the target dtype.
        # setdefault: threads that build the same table at once all get the one that went in first
        table = _CACHE.setdefault(key, build(n).to(device=device, dtype=dtype))
    return table


def _dct(n: int) -> Tensor:
    k = torch.arange(n, dtype=torch.int64).unsqueeze(1)
    j = torch.arange(n, dtype=torch.int64).unsqueeze(0)
    phase = ((2 * j + 1) * k) % (4 * n)  # cos(pi (2j+1) k / 2n) has period 4n in (2j+1) k
    D = torch.cos(phase.double() * (math.pi / (2 * n))) * math.sqrt(2.0 / n)
    D[0] /= math.sqrt(2.0)
    return D


def _dft(n: int) -> Tensor:
    k = torch.arange(n, dtype=torch.int64).unsqueeze(1)
    j = torch.arange(n, dtype=torch.int64).unsqueeze(0)
    angle = ((k * j) % n).double() * (2 * math.pi / n)
    return torch.cat([torch.cos(angle), torch.sin(angle)], 0)


def dct_basis(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """The orthonormal DCT-II matrix ``D`` (n x n, row k = frequency k): ``dct(x) = D x``, ``D^T D = I``."""
    return _cached("dct", n, dtype, device, _dct)


def dft_basis(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """``[cos(2 pi k j / n); sin(2 pi k j / n)]`` stacked (2n x n): rows k and n + k belong to frequency k."""
    return _cached("dft", n, dtype, device, _dft)


class _LocatedRows(torch.autograd.Function):
    """``basis[round(positions)]`` with the LoCA finite-difference gradient for ``positions``."""

    @staticmethod
    def forward(ctx, basis: Tensor, positions: Tensor, clip: float | None) -> Tensor:  # type: ignore[override]
        idx = positions.detach().round().long()
        ctx.save_for_backward(basis, idx)
        ctx.clip = clip
        ctx.pos_dtype = positions.dtype
        return basis.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor, None]:  # type: ignore[override]
        basis, idx = ctx.saved_tensors
        last = basis.shape[0] - 1
        up = basis.index_select(0, (idx + 1).clamp(max=last)).float()
        down = basis.index_select(0, (idx - 1).clamp(min=0)).float()
        # dL/dB[k] . B[r+1] is the loss slope of moving entry k to row r+1: a central difference.
        fd = 0.5 * (grad.float() * (up - down)).sum(-1)
        if ctx.clip is not None:
            fd = fd.clamp(-ctx.clip, ctx.clip)
        return None, fd.to(ctx.pos_dtype), None


def located_rows(basis: Tensor, positions: Tensor, clip: float | None = 1.0) -> Tensor:
    """Rows of ``basis`` at ``positions`` (rounded), differentiable in the positions by finite differences.

    Backward returns, for entry k at row ``r``, ``(1/2) <dL/dP_k, B[r+1] - B[r-1]>`` (one-sided
    rows repeat at the edges), clamped to ``[-clip, clip]``: the central difference of the loss
    when entry k moves one row, to first order. The coefficient ``c_k`` that multiplies ``P_k``
    downstream is in ``dL/dP_k``, so for the DCT this is LoCA's estimator
    ``(c_k / 2) (K[r+1, s] - K[r-1, s])`` with ``K = D_out (dL/dW) D_in^T``.
    Integer (or non-differentiable) positions give a plain gather.
    """
    if positions.requires_grad and torch.is_grad_enabled():
        return _LocatedRows.apply(basis, positions, clip)
    return basis.index_select(0, positions.detach().round().long())


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


def dft_factors(rows: Tensor, cols: Tensor, shape: tuple[int, int], dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    """``(P, Q)`` (2n x d_out, 2n x d_in) with ``Re(iDFT2)`` of a sparse spectrum ``= P^T diag([c, -c]) Q * 1/(d_out d_in)``."""
    d_out, d_in = shape
    P = dft_basis(d_out, dtype, device).index_select(0, torch.cat([rows, rows + d_out]))
    Q = dft_basis(d_in, dtype, device).index_select(0, torch.cat([cols, cols + d_in]))
    return P, Q


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
