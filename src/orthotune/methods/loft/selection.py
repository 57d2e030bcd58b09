"""LOFT's task-aware supports from a weight's gradient: the statistic ``Skew(W0^T G)`` and the supports it ranks.

For ``W = W0 exp(S)`` the loss gradient with respect to a skew generator ``S`` at ``S = 0`` is
``Skew(W0^T G)`` (``G = dL/dW``); a support that holds its dominant directions buys the most
first-order decrease. Everything here works on one layer's ``(W0, G)``; collecting ``G`` over a model
is :func:`orthotune.training.support_selection.select_supports`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def skew_statistic(W0: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """``(X, Y)`` with ``X Y^T = Skew(W0^T G) = (W0^T G - G^T W0) / 2`` (d_in x d_in), never formed.

    For ``W = W0 exp(S)`` the loss gradient with respect to a skew generator ``S`` at ``S = 0`` is
    ``Skew(W0^T G)`` (``G = dL/dW``): LOFT's first-order statistic for task-aware supports.
    ``X = [W0^T, G^T]``, ``Y = [G^T, -W0^T] / 2``, both d_in x 2 d_out.
    """
    return torch.cat([W0.T, G.T], 1), 0.5 * torch.cat([G.T, -W0.T], 1)


def gradient_basis(W0: Tensor, G: Tensor, r: int) -> Tensor:
    """The ``r`` dominant directions of ``Skew(W0^T G)``: its top-``r`` singular vectors.

    Among all r-dimensional supports these maximise ``||P^T Skew(W0^T G) P||_F``, the first-order
    decrease a rotation inside the support can buy. A skew matrix's singular values come in equal
    pairs (its invariant planes), so an even ``r`` takes whole planes. From the factors (two thin
    QRs, O(d_in d_out^2)) when ``2 d_out < d_in``; otherwise from the eigenvectors of ``K^T K``,
    which needs the dense d_in x d_in statistic of one layer at a time.
    """
    X, Y = skew_statistic(W0.double(), G.double())
    if X.shape[1] < X.shape[0]:
        Qx, Rx = torch.linalg.qr(X)
        _, Ry = torch.linalg.qr(Y)
        U = Qx @ torch.linalg.svd(Rx @ Ry.T).U
    else:
        K = X @ Y.T
        U = torch.linalg.eigh(K.T @ K).eigenvectors.flip(-1)  # eigh sorts ascending
    if U.shape[1] < r:  # the statistic has rank < r: complete the basis orthogonally
        U = complete_basis(U, r)
    return U[:, :r].to(W0.dtype)


def complete_basis(U: Tensor, r: int) -> Tensor:
    """``U`` (d x k, orthonormal) followed by ``r - k`` Haar-random orthonormal directions orthogonal to it.

    The first ``k`` columns are ``U``'s own (up to sign); the rest is a random basis of part of the
    complement (global torch RNG, on the CPU in float64, so a seed fixes it on every device).
    """
    k = U.shape[1]
    if r <= k:
        return U[:, :r]
    Ud = U.detach().to("cpu", torch.float64)
    fill = torch.randn(Ud.shape[0], r - k, dtype=torch.float64)
    fill = fill - Ud @ (Ud.T @ fill)
    fill = fill - Ud @ (Ud.T @ fill)  # twice: orthogonal to U to rounding, whatever its conditioning
    Q = torch.linalg.qr(fill).Q
    return torch.cat([Ud, Q], 1).to(dtype=U.dtype, device=U.device)


def gradient_dims(r: int, fraction: float) -> int:
    """How many of ``r`` support directions a ``gradient_fraction`` takes from the statistic: ``fraction * r``
    rounded to an even number (whole invariant planes of the skew statistic), at least 2 when ``fraction > 0``."""
    if not (isinstance(fraction, (int, float)) and 0 <= fraction <= 1):
        raise ValueError(f"gradient_fraction must be a number in [0, 1], got {fraction!r}")
    if fraction in (0, 1):
        return int(fraction * r)
    return min(r, max(2, 2 * round(fraction * r / 2)))


def gradient_coordinates(W0: Tensor, G: Tensor, r: int) -> Tensor:
    """The ``r`` coordinates whose rows of ``Skew(W0^T G)`` carry the most first-order mass (sorted).

    orthotune's coordinate variant of the gradient-informed support (a greedy stand-in for the
    best coordinate block, which no closed form gives): row norms from the factors, O(d_in d_out^2).
    """
    X, Y = skew_statistic(W0.double(), G.double())
    row_norms = ((X @ (Y.T @ Y)) * X).sum(1)
    return torch.sort(torch.topk(row_norms, r).indices).values


def captured_fraction(W0: Tensor, G: Tensor, P: Tensor) -> float:
    """``||P^T K P||_F / ||K||_F`` for ``K = Skew(W0^T G)``: the share of the first-order signal a
    support sees (about ``r/d`` for a random one, near 1 for a gradient-informed one)."""
    X, Y = skew_statistic(W0.double(), G.double())
    P = P.double()
    total = ((X.T @ X) * (Y.T @ Y)).sum().clamp_min(0).sqrt()  # ||X Y^T||_F without the d x d product
    inside = torch.linalg.matrix_norm((P.T @ X) @ (Y.T @ P))
    return float(inside / total) if total > 0 else 0.0


def second_moment_basis(M: Tensor, r: int) -> Tensor:
    """The top-``r`` eigenvectors of ``M = sum_b K_b^T K_b`` (``K_b`` one batch's ``Skew(W0^T G_b)``).

    The ``statistic="second_moment"`` support: directions where the per-batch first-order signal is
    large, whether or not its sign agrees across batches (the mean gradient's signal can cancel).
    """
    return torch.linalg.eigh(M.double()).eigenvectors.flip(-1)[:, :r].contiguous()


def whitened_basis(W0: Tensor, G: Tensor, C: Tensor, r: int, ridge: float = 0.1) -> Tensor:
    """A support of ``r`` orthonormal directions ranked by first-order gain per unit of input energy.

    A rotation in the plane of two input directions moves the output in proportion to the inputs'
    energy along them (``C = E[x x^T]``, the layer's input second moment), so the plain statistic's
    top directions, which lie where inputs are large, are also where the loss curves most. This takes
    the top-``r`` singular subspace of ``M Skew(W0^T G) M`` with ``M = (C + ridge * tr(C)/d I)^(-1/2)``
    (the statistic in whitened input coordinates; ``ridge`` bounds the weight of near-silent
    directions), maps it back by ``M`` and orthonormalises it. Float64; needs the dense d_in x d_in
    statistic.
    """
    X, Y = skew_statistic(W0.double(), G.double())
    K = X @ Y.T
    C = C.double()
    d = C.shape[0]
    evals, evecs = torch.linalg.eigh(C + ridge * torch.trace(C) / d * torch.eye(d, dtype=C.dtype, device=C.device))
    M = (evecs * evals.clamp_min(torch.finfo(C.dtype).tiny).rsqrt()) @ evecs.T
    Kw = M @ K @ M
    U = torch.linalg.eigh(Kw.T @ Kw).eigenvectors.flip(-1)[:, :r]
    return torch.linalg.qr(M @ U).Q.to(W0.dtype)

