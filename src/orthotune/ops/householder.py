"""Householder products in the one form ``I + U M V^T`` (HRA, Yuan et al., NeurIPS 2024, arXiv:2405.17484).

``H_1 H_2 ... H_k``, ``H_i = I - 2 u_i u_i^T / ||u_i||^2``, is the compact WY form: the exact chain
of :func:`orthotune.ops.skew.chain_core` with ``A_i = B_i = u_i`` and ``C_i = -2 / ||u_i||^2``.
With Gram-Schmidt (``apply_GS`` in peft) the reflections are taken along orthonormalised vectors
``Q``, and the product is ``I - 2 Q Q^T``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .skew import chain_core


def reflection_core(u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, M, V)`` with ``H_1 ... H_k = I + U M V^T`` for the columns ``u_i`` of ``u`` (..., d, k)."""
    A = u.transpose(-1, -2).unsqueeze(-1)  # (..., k, d, 1)
    C = (-2.0 / (u * u).sum(-2))[..., None, None]
    U, V, M = chain_core(A, A, C)
    return U, M, V


def gram_schmidt_core(u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(Q, -2 I, Q)``: reflections along the Gram-Schmidt orthonormalisation of ``u``'s columns.

    QR gives the same ``Q`` as Gram-Schmidt up to column signs, which ``Q Q^T`` does not see.
    """
    Q = torch.linalg.qr(u).Q
    k = u.shape[-1]
    return Q, (-2.0 * torch.eye(k, dtype=u.dtype, device=u.device)).expand(*u.shape[:-2], k, k), Q


def orthogonality_penalty(u: Tensor) -> Tensor:
    """HRA's regulariser ``||I - Ũ^T Ũ||_F^2``, ``Ũ`` the columns of ``u`` scaled to unit length.

    Zero exactly when the reflection planes are mutually orthogonal; the HRA paper adds it to the
    loss with a weight to trade the adapter's capacity against its regularity.
    """
    unit = u / u.norm(dim=0, keepdim=True)
    gram = unit.T @ unit
    return (gram - torch.eye(gram.shape[0], dtype=u.dtype, device=u.device)).pow(2).sum()
