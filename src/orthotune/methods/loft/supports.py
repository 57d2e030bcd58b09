"""LOFT supports: where a rotation acts, ``R = I + P (T - I) P^T`` with ``P`` (d x r) orthonormal.

Kinds (how ``P`` is held):

* :class:`FullSupport`: ``P = I`` (r = d): OFT, BOFT, HRA, GOFT, LoCO rotate every coordinate.
* :class:`CoordinateSupport`: ``P`` = r columns of the identity, held as indices (a gather and a
  scatter, never a matrix): coordinate blocks, and task-aware coordinates.
* :class:`DenseSupport`: an orthonormal ``P`` (d x r) buffer: random, principal (top right singular
  vectors of ``W0``, as PSOFT) and gradient-informed subspaces.

Strategies that build ``P`` are plain functions (gradient-informed ones: :mod:`orthotune.methods.loft.selection`,
filled from data by :func:`orthotune.training.support_selection.select_supports`). Buffers are persistent, so
the support is saved with the adapter: random and gradient supports cannot be recomputed from the
config, and storing principal ones avoids SVD sign ambiguity on reload.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class FullSupport(nn.Module):
    """Every coordinate: ``P = I``."""

    ready = True

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim


class _StoredSupport(nn.Module):
    """A support held in one persistent buffer; a task-aware one stays unset until selected."""

    buffer_name = ""

    def __init__(self, value: Tensor, task_aware: bool) -> None:
        super().__init__()
        self.task_aware = task_aware
        self.register_buffer(self.buffer_name, value)
        self.ready = self.is_set()

    def is_set(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def assign(self, value: Tensor) -> None:
        """Set the support (what :func:`select_supports` calls)."""
        with torch.no_grad():
            getattr(self, self.buffer_name).copy_(value)
        self.ready = True

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.ready = self.is_set()


class CoordinateSupport(_StoredSupport):
    """``r`` coordinates (indices into the input); task-aware ones start unset (-1)."""

    buffer_name = "index"

    def __init__(self, index: Tensor, task_aware: bool = False) -> None:
        self.dim = index.numel()
        super().__init__(index, task_aware)

    def is_set(self) -> bool:
        return bool((self.index >= 0).all())


class DenseSupport(_StoredSupport):
    """An orthonormal basis ``P`` (d x r); task-aware ones start as zeros until selected."""

    buffer_name = "P"

    def __init__(self, P: Tensor, task_aware: bool = False) -> None:
        self.dim = P.shape[1]
        super().__init__(P, task_aware)

    def is_set(self) -> bool:
        return bool(self.P.abs().sum() > 0)


# --------------------------------------------------------------------------- strategies
def coordinate_basis(r: int, device: torch.device | None = None) -> Tensor:
    """The first ``r`` coordinates: a coordinate block."""
    return torch.arange(r, device=device)


def random_basis(d: int, r: int, like: Tensor) -> Tensor:
    """A uniformly random orthonormal ``P`` (d x r): QR of a Gaussian matrix, signs fixed."""
    Q, Rq = torch.linalg.qr(torch.randn(d, r, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(Rq))  # Haar-distributed
    return Q.to(dtype=like.dtype, device=like.device)


def principal_basis(W: Tensor, r: int, svd: str = "full", niter: int = 10, seed: int = 0) -> Tensor:
    """Top-``r`` right singular vectors of ``W`` (d_out x d_in): PSOFT's principal subspace.

    ``svd="lowrank"`` runs ``torch.svd_lowrank`` under a forked RNG seeded with ``seed``, exactly as
    peft 0.21 does, so both libraries find the same subspace.
    """
    W = W.detach().float()
    if svd == "full":
        return torch.linalg.svd(W, full_matrices=False).Vh[:r].T.contiguous()
    return seeded_svd_lowrank(W, r, niter, seed)[2]


def seeded_svd_lowrank(W: Tensor, r: int, niter: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``U_r, S_r, V_r`` of ``torch.svd_lowrank(W, q=r)`` (``W`` float32) under a forked RNG seeded with ``seed``,
    on ``W``'s device: peft 0.21's PSOFT call, so both libraries draw the same random projection."""
    W = W.detach().float()
    fork = {"devices": []} if W.device.type == "cpu" else {"devices": [W.device], "device_type": W.device.type}
    with torch.random.fork_rng(**fork):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
    return U[:, :r].contiguous(), S[:r].contiguous(), V[:, :r].contiguous()
