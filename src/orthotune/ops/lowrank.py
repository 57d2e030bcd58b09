"""The one form shared by the low-rank orthogonal family: ``R = I + U M V^T``.

LoCO chains, HRA (compact WY) and LOFT all rotate activations as ``x -> x + U (M (V^T x))`` with
``U, V`` of shape (d, m) and a small ``M`` (m, m) computed once per step. Everything here works on
that triple without ever forming a d x d matrix, except :func:`materialize`, which exists to merge.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def apply_rows(x: Tensor, U: Tensor, M: Tensor, V: Tensor) -> Tensor:
    """Rotate row vectors: ``x R^T = x + ((x V) M^T) U^T`` for ``x`` of shape (..., d)."""
    return x + ((x @ V) @ M.transpose(-1, -2)) @ U.transpose(-1, -2)


class _LowRankUpdate(torch.autograd.Function):
    """``y + (x P) Q^T`` as one autograd node: two skinny matmuls, the add fused into the second.

    Backward: ``gh = g Q``, ``dP = x^T gh``, ``dQ = g^T (x P)``, ``dx = gh P^T``; when ``y`` is ``x``
    (a rotation, ``x + (x P) Q^T``) the two paths to ``x`` are summed in the same fused ``addmm``.
    """

    @staticmethod
    def forward(ctx, y: Tensor, x: Tensor, P: Tensor, Q: Tensor, same: bool) -> Tensor:  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ P
        out = torch.addmm((x2 if same else y.reshape(-1, y.shape[-1])), h, Q.transpose(0, 1))
        ctx.save_for_backward(x2, h, P, Q)
        ctx.same = same
        ctx.x_shape = x.shape
        return out.view(*y.shape[:-1], Q.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x2, h, P, Q = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gh = g2 @ Q
        need_y, need_x, need_p, need_q, _ = ctx.needs_input_grad
        dx = None
        if need_x or (ctx.same and need_y):
            dx = torch.addmm(g2, gh, P.transpose(0, 1)) if ctx.same else gh @ P.transpose(0, 1)
            dx = dx.view(ctx.x_shape)
        dy = g if (need_y and not ctx.same) else None
        dP = x2.transpose(0, 1) @ gh if need_p else None
        dQ = g2.transpose(0, 1) @ h if need_q else None
        return dy, dx, dP, dQ, None


def rotate_rows(x: Tensor, U: Tensor, W: Tensor) -> Tensor:
    """``x + (x W) U^T``: the one form with ``M`` folded in (``W = V M^T``), fused forward and backward.

    Same values as :func:`apply_rows` (``apply_rows(x, U, M, V) == rotate_rows(x, U, V @ M.T)``);
    ``U``, ``W`` are (d, m) in ``x``'s dtype.
    """
    return _LowRankUpdate.apply(x, x, W, U, True)


def add_lowrank(y: Tensor, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """``y + (x A) B^T`` for ``x`` (..., d_in), ``A`` (d_in, m), ``B`` (d_out, m): LoRA's update, fused."""
    return _LowRankUpdate.apply(y, x, A, B, False)


def materialize(U: Tensor, M: Tensor, V: Tensor) -> Tensor:
    """The dense ``I + U M V^T`` (d x d): only for merging and for tests."""
    d = U.shape[-2]
    eye = torch.eye(d, dtype=U.dtype, device=U.device)
    return eye + U @ M @ V.transpose(-1, -2)


def merge_right(W: Tensor, U: Tensor, M: Tensor, V: Tensor) -> Tensor:
    """``W R = W + (W U) M V^T`` for ``W`` (d_out, d): merging without a d x d matrix."""
    return W + ((W @ U) @ M) @ V.transpose(-1, -2)


def lowrank_norm(X: Tensor, K: Tensor, Y: Tensor, ord: str | int = "fro") -> Tensor:
    """``||X K Y^T||`` (Frobenius or spectral) from thin QR factors, never forming the d x d product.

    Orthonormalising ``X`` and ``Y`` first keeps the small matrix free of the cancellation a Gram-
    matrix trace would suffer when the product is tiny (e.g. an orthogonality error near 1e-7).
    """
    _, Rx = torch.linalg.qr(X)
    _, Ry = torch.linalg.qr(Y)
    return torch.linalg.matrix_norm(Rx @ K @ Ry.transpose(-1, -2), ord=ord)


def orthogonality_error(U: Tensor, M: Tensor, V: Tensor) -> Tensor:
    """``||R^T R - I||_F / sqrt(d)`` for ``R = I + U M V^T``, in O(d m^2).

    ``R^T R - I = Z K Z^T`` with ``Z = [U, V]`` and ``K = [[0, M], [M^T, M^T U^T U M]]``.
    """
    d = U.shape[-2]
    Z = torch.cat([U, V], dim=-1)
    m = M.shape[-1]
    zero = torch.zeros(m, m, dtype=M.dtype, device=M.device)
    K = torch.cat(
        [torch.cat([zero, M], -1), torch.cat([M.transpose(-1, -2), M.transpose(-1, -2) @ (U.transpose(-1, -2) @ U) @ M], -1)],
        -2,
    )
    return lowrank_norm(Z, K, Z) / d**0.5


def difference_norm(a: tuple[Tensor, Tensor, Tensor], b: tuple[Tensor, Tensor, Tensor], ord: str | int = "fro") -> Tensor:
    """``||R_a - R_b||`` for two rotations in the one form, without forming either."""
    Ua, Ma, Va = a
    Ub, Mb, Vb = b
    K = torch.block_diag(Ma, -Mb)
    return lowrank_norm(torch.cat([Ua, Ub], -1), K, torch.cat([Va, Vb], -1), ord=ord)
