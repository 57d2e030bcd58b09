"""Dense references the tests compare orthotune's factored math against (never used by the library)."""

from __future__ import annotations

import torch
from torch import Tensor

from orthotune.ops.spectral import dct_basis, dft_factors, sparse_delta


def sequential_apply_rows(x: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """``x R^T`` for ``R = R_1 ... R_k``, ``R_i = I + A_i C_i B_i^T``, one factor at a time.

    The exact sequential reference: ``R x = R_1 (R_2 (... (R_k x)))``, so in row form factor k acts
    first. It keeps k copies of the activations for backward, which the parallel core avoids.
    """
    for i in reversed(range(A.shape[-3])):
        x = x + ((x @ B[..., i, :, :]) @ C[..., i, :, :].transpose(-1, -2)) @ A[..., i, :, :].transpose(-1, -2)
    return x


def skew_dense(U: Tensor, V: Tensor) -> Tensor:
    """The dense generators ``U_i V_i^T - V_i U_i^T`` (..., k, d, d)."""
    return U @ V.transpose(-1, -2) - V @ U.transpose(-1, -2)


def idct2_sparse(coeffs: Tensor, rows: Tensor, cols: Tensor, shape: tuple[int, int]) -> Tensor:
    """``D_out^T C D_in``: the orthonormal 2-D inverse DCT of the sparse spectrum, dense."""
    d_out, d_in = shape
    P = dct_basis(d_out, coeffs.dtype, coeffs.device).index_select(0, rows)
    Q = dct_basis(d_in, coeffs.dtype, coeffs.device).index_select(0, cols)
    return sparse_delta(P, Q, coeffs)


def idft2_real_sparse(coeffs: Tensor, rows: Tensor, cols: Tensor, shape: tuple[int, int]) -> Tensor:
    """``Re(ifft2(C))`` of the sparse spectrum (numpy/torch normalisation ``1/(d_out d_in)``), dense."""
    P, Q = dft_factors(rows, cols, shape, coeffs.dtype)
    return sparse_delta(P, Q, torch.cat([coeffs, -coeffs])) / (shape[0] * shape[1])

