"""The one form shared by the low-rank orthogonal family: ``R = I + U M V^T``.

LoCO chains, HRA (compact WY) and LOFT all rotate activations as ``x -> x + U (M (V^T x))`` with
``U, V`` of shape (d, m) and a small ``M`` (m, m) computed once per step. Everything here works on
that triple without ever forming a d x d matrix, except :func:`materialize`, which exists to merge.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def apply_rows(x: Tensor, U: Tensor, M: Tensor, V: Tensor) -> Tensor:
    """Rotate row vectors: ``x R^T = x + ((x V) M^T) U^T`` for ``x`` of shape (..., d)."""
    return x + ((x @ V) @ M.transpose(-1, -2)) @ U.transpose(-1, -2)


def rotate_rows(x: Tensor, U: Tensor, MVt: Tensor) -> Tensor:
    """``x + (x MVt^T) U^T``: the one form with ``M`` folded in (``MVt = M V^T``), for ``x`` of shape (..., d).

    Same values as :func:`apply_rows` (``apply_rows(x, U, M, V) == rotate_rows(x, U, M @ V.T)``)
    with one small matmul less; ``U`` (d, m) and ``MVt`` (m, d) in ``x``'s dtype. Three plain ops on
    purpose: on a GPU these layers are host-bound, so the fewest dispatches (and a C++ backward) win.
    """
    return x + F.linear(F.linear(x, MVt), U)


def add_lowrank(y: Tensor, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """``y + (x A^T) B^T`` for ``x`` (..., d_in), ``A`` (m, d_in), ``B`` (d_out, m): LoRA's update.

    Without autograd the update is accumulated into ``y`` in place by one ``addmm_`` (the GEMM adds
    into its output: no (..., d_out) temporary, no add kernel); ``y`` must then be a fresh tensor the
    caller owns, as a base layer's output is.
    """
    h = F.linear(x, A)
    if tracked(y, x, A, B) or not y.is_contiguous() or torch.compiler.is_compiling():
        return y + F.linear(h, B)
    y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), B.t())
    return y


def tracked(*tensors: Tensor) -> bool:
    """Whether autograd records operations on any of ``tensors`` (then nothing may be done in place)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def pad_square(K: Tensor) -> Tensor:
    """The small core ``K`` (..., m, m) of ``R = I + A K A^T`` zero-padded so that ``m`` elements fill whole 16-byte
    words (a multiple of 8 in bf16/fp16): the (tokens, m) activations between the skinny GEMMs then have an
    aligned leading dimension, which cuBLAS's tensor-core kernels need (LoCO's ``2kr = 36`` is not). ``A`` is
    padded with zero columns to match, so the values are the same."""
    m, per_word = K.shape[-1], max(1, 16 // K.element_size())
    pad = -m % per_word
    return K if pad == 0 else F.pad(K, (0, pad, 0, pad))


def rotated_base(x: Tensor, U: Tensor, MVt: Tensor, base: Callable[[Tensor], Tensor], W0U: Tensor | None = None) -> Tensor:
    """``base(x R^T)`` for the one form ``R = I + U MVt``; with ``W0U = W0 U`` (``base`` the frozen map
    ``x -> x W0^T``) as ``base(x) + (x MVt^T) W0U^T`` instead, which skips the rotated (..., d_in) copy
    of ``x`` and its add (:func:`add_lowrank`, in place without autograd): same values, less memory traffic."""
    if W0U is None:
        return base(rotate_rows(x, U, MVt))
    return add_lowrank(base(x), x, MVt, W0U)


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


def one_form_error(U: Tensor, MVt: Tensor) -> Tensor:
    """:func:`orthogonality_error` of ``R = I + U (M V^T)`` given ``MVt = M V^T`` (a core), in float64."""
    U, MVt = U.double(), MVt.double()
    return orthogonality_error(U, torch.eye(U.shape[-1], dtype=U.dtype, device=U.device), MVt.mT)


def dense_orthogonality_error(R: Tensor) -> Tensor:
    """``||R^T R - I||_F / sqrt(d)`` of a dense ``R`` (inspection time only), in float64."""
    R = R.double()
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    return torch.linalg.matrix_norm(R.mT @ R - eye) / R.shape[-1] ** 0.5
