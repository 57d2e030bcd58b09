"""Low-rank skew-symmetric exponentials and their chains (the math of LoCO).

A generator ``S = U V^T - V U^T`` (``U, V`` of shape (d, r)) factors as ``S = A B^T`` with
``A = [U, V]``, ``B = [V, -U]`` (d x 2r), and ``exp(A B^T) = I + A phi(B^T A) B^T`` where
``phi(Z) = sum_j Z^j / (j+1)!``: a 2r x 2r computation. A chain ``exp(S_1) ... exp(S_k)`` is then,
exactly, ``I + A M B^T`` with stacked factors and ``M = C (I - G C)^{-1}`` (see :func:`chain_core`).

Shapes: factor stacks are (..., k, d, m); cores are (..., m, m); leading dims batch layers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .lowrank import lowrank_norm


def phi(Z: Tensor) -> Tensor:
    """``phi(Z) = sum_{j>=0} Z^j/(j+1)!`` (= ``Z^{-1}(e^Z - I)``), exact for any norm.

    Read off the top-right block of ``exp([[Z, I], [0, 0]])``; ``torch.linalg.matrix_exp`` uses
    scaling and squaring, so there is no truncated series to go wrong for large generators.
    """
    n = Z.shape[-1]
    eye = torch.eye(n, dtype=Z.dtype, device=Z.device).expand_as(Z)
    zero = torch.zeros_like(Z)
    aug = torch.cat([torch.cat([Z, eye], -1), torch.cat([zero, zero], -1)], -2)
    return torch.linalg.matrix_exp(aug)[..., :n, n:]


def skew_factors(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """``A = [U, V]``, ``B = [V, -U]`` so that ``A B^T = U V^T - V U^T``."""
    return torch.cat([U, V], -1), torch.cat([V, -U], -1)


def skew_exp_factors(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(A, B, C)`` with ``exp(U V^T - V U^T) = I + A C B^T``, ``C = phi(B^T A)``; batched."""
    A, B = skew_factors(U, V)
    return A, B, phi(B.transpose(-1, -2) @ A)


def stack_factors(A: Tensor) -> Tensor:
    """(..., k, d, m) -> (..., d, k*m): the factors side by side, first factor leftmost."""
    *lead, k, d, m = A.shape
    return A.transpose(-3, -2).reshape(*lead, d, k * m)


def _block_diag(C: Tensor) -> Tensor:
    """(..., k, m, m) -> (..., k*m, k*m) block-diagonal, batched."""
    *lead, k, m, _ = C.shape
    eye_k = torch.eye(k, dtype=C.dtype, device=C.device)
    return torch.einsum("...imn,ij->...imjn", C, eye_k).reshape(*lead, k * m, k * m)


def _strict_block_upper_mask(k: int, m: int, like: Tensor) -> Tensor:
    blocks = torch.ones(k, k, dtype=like.dtype, device=like.device).triu(1)
    return torch.kron(blocks, torch.ones(m, m, dtype=like.dtype, device=like.device))


def chain_core(A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact product ``prod_i (I + A_i C_i B_i^T) = I + U M V^T`` (factor 1 leftmost).

    ``U``/``V`` stack the ``A_i``/``B_i``; ``M = C (I - G C)^{-1}`` with ``C = blockdiag(C_i)`` and
    ``G`` strictly block-upper-triangular, ``G_ij = B_i^T A_j`` (i < j). ``G C`` is nilpotent, so
    ``I - G C`` is unit upper triangular: one small triangular solve, no approximation.
    Serves LoCO chains (``C_i = phi(B_i^T A_i)``) and Householder products (compact WY form).
    """
    k, m = A.shape[-3], A.shape[-1]
    U, V = stack_factors(A), stack_factors(B)
    Cb = _block_diag(C)
    G = (V.transpose(-1, -2) @ U) * _strict_block_upper_mask(k, m, U)
    eye = torch.eye(k * m, dtype=U.dtype, device=U.device)
    M = torch.linalg.solve_triangular(eye - G @ Cb, Cb, upper=True, left=False)
    return U, V, M


def sum_exp_core(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``exp(S_1 + ... + S_k) = I + U phi(V^T U) V^T``: the first-order (BCH) parallel form.

    Exactly orthogonal (it is the exponential of one skew matrix of rank <= 2kr) and equal to the
    chain up to commutator terms; see :func:`trotter_bound`.
    """
    U, V = stack_factors(A), stack_factors(B)
    return U, V, phi(V.transpose(-1, -2) @ U)


def sequential_apply_rows(x: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """``x R^T`` for ``R = R_1 ... R_k``, ``R_i = I + A_i C_i B_i^T``, one factor at a time.

    The exact sequential reference: ``R x = R_1 (R_2 (... (R_k x)))``, so in row form factor k acts
    first. It keeps k copies of the activations for backward, which the parallel core avoids.
    """
    for i in reversed(range(A.shape[-3])):
        x = x + ((x @ B[..., i, :, :]) @ C[..., i, :, :].transpose(-1, -2)) @ A[..., i, :, :].transpose(-1, -2)
    return x


def skew_dense(U: Tensor, V: Tensor) -> Tensor:
    """The dense generators ``U_i V_i^T - V_i U_i^T`` (..., k, d, d): for tests and diagnostics."""
    return U @ V.transpose(-1, -2) - V @ U.transpose(-1, -2)


def trotter_bound(A: Tensor, B: Tensor) -> Tensor:
    """Upper bound on ``||exp(S_1)...exp(S_k) - exp(S_1 + ... + S_k)||_2`` for skew ``S_i = A_i B_i^T``.

    For skew-symmetric (anti-Hermitian) generators the first-order product formula obeys
    ``||e^{X+Y} - e^X e^Y||_2 <= ||[X, Y]||_2 / 2``; telescoping over the chain gives
    ``(1/2) sum_i ||[S_i, S_{i+1} + ... + S_k]||_2`` (Childs et al., 2021, Theory of Trotter error).
    Each commutator is low-rank, so this costs O(d k^2 r^2).
    """
    if A.dim() != 3:
        raise ValueError(f"trotter_bound expects factors of shape (k, d, m) for one layer, got {tuple(A.shape)}")
    k = A.shape[0]
    total = A.new_zeros(())
    for i in range(k - 1):
        Ai, Bi = A[i], B[i]
        At, Bt = stack_factors(A[i + 1 :]), stack_factors(B[i + 1 :])
        # [S_i, T] = A_i (B_i^T A_t) B_t^T - A_t (B_t^T A_i) B_i^T, with T = A_t B_t^T
        K = torch.block_diag(Bi.T @ At, -(Bt.T @ Ai))
        total = total + 0.5 * lowrank_norm(torch.cat([Ai, At], -1), K, torch.cat([Bt, Bi], -1), ord=2)
    return total
