"""LOFT transforms: the orthogonal map ``T`` (dim x dim) that acts inside a support.

Each transform owns its parameters and applies ``T`` to row vectors in three modes:

* ``"forward"``: ``z T^T`` (activations, what the adapted layer computes),
* ``"merge"``: ``z T`` (rows of a weight: ``W -> W T``),
* ``"unmerge"``: ``z T^{-1}`` (``= z T^T`` when ``T`` is exactly orthogonal).

Small per-step cores (Cayley blocks, angles, WY cores) are computed in float32 (float64 stays
float64, for gradchecks) and cast to the activations' dtype. The core of a low-rank transform is
``(A, M, B)`` with ``T = I + A M B^T``, which the support rotation folds with its support into the
one form ``x + U (M V^T) x``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from ...ops import butterfly, cayley, givens, householder, lowrank, skew

Mode = Literal["forward", "merge", "unmerge"]


def core_dtype(t: Tensor) -> Tensor:
    """Small cores in float32 (float64 kept as is)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class Transform(nn.Module):
    """Base class: an invertible ``dim x dim`` map, exactly orthogonal when ``exact``."""

    exact: bool = True

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def reset(self, identity: bool) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    #: Whether :meth:`cores` computes the per-step cores of many transforms at once.
    batchable: bool = False

    def rotate(self, z: Tensor, mode: Mode) -> Tensor:
        return self.act(self.core(), z, mode)

    def act(self, core: tuple[Tensor, ...], z: Tensor, mode: Mode) -> Tensor:  # pragma: no cover - abstract
        """``z T^T`` / ``z T`` / ``z T^{-1}`` from this step's :meth:`core` (the transform acting on rows ``z``)."""
        raise NotImplementedError

    def core(self) -> tuple[Tensor, ...]:
        """The per-step tensors :meth:`act` needs (float32): the batched computation for one transform."""
        return tuple(t[0] for t in type(self).cores([self]))

    @classmethod
    def cores(cls, transforms: list[Transform]) -> tuple[Tensor, ...]:  # pragma: no cover - abstract
        """:meth:`core` of many transforms of one :meth:`signature`, stacked on a new first dimension."""
        raise NotImplementedError

    #: The attributes that, with the parameters' shapes, decide how :meth:`cores` computes (named, not
    #: read from ``vars(self)``: the signature is taken inside compiled graphs, where dynamo cannot list them).
    settings: ClassVar[tuple[str, ...]] = ("dim",)

    def signature(self) -> tuple:
        """Transforms of one class and signature (parameter shapes, settings) share one :meth:`cores` call."""
        return tuple(p.shape for p in self.parameters()), tuple(getattr(self, k) for k in self.settings)

    def matrix(self) -> Tensor:
        """The dense ``T`` (dim x dim): rows of the identity through ``z -> z T``."""
        ref = core_dtype(next(self.parameters()))
        return self.rotate(torch.eye(self.dim, dtype=ref.dtype, device=ref.device), "merge")


def _param(like: Tensor, *shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=like.dtype, device=like.device))


def register_triu_indices(module: nn.Module, size: int, device: torch.device) -> None:
    """Non-persistent ``rows``/``cols`` buffers of a ``size x size`` strict upper triangle, on the
    parameters' device so the skew scatter never copies indices (peft's OFT layout)."""
    rows, cols = torch.triu_indices(size, size, 1, device=device)
    module.register_buffer("rows", rows, persistent=False)
    module.register_buffer("cols", cols, persistent=False)


def zero_or_normal(p: Tensor, identity: bool, std: float = 0.1) -> None:
    """Zero generators (the identity), or peft's perturbed start ``N(0, std^2)``."""
    with torch.no_grad():
        if identity:
            p.zero_()
        else:
            p.normal_(0.0, std)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


class BlockCayley(Transform):
    """``T = blockdiag(cayley(Q_1), ..., cayley(Q_n))``, exact or Cayley-Neumann (OFT's transform).

    ``Q_i`` from ``b(b-1)/2`` upper-triangular entries each (peft's OFT/PSOFT layout); with
    ``share`` one block serves every chunk. ``dropout`` replaces random blocks by the identity in
    training (multiplicative dropout).
    """

    settings = ("dim", "block_size", "neumann_terms", "dropout")

    def __init__(self, dim: int, block_size: int, like: Tensor, neumann_terms: int | None = None,
                 share: bool = False, dropout: float = 0.0) -> None:
        super().__init__(dim)
        self.block_size = block_size
        self.neumann_terms = neumann_terms
        self.exact = neumann_terms is None
        self.dropout = dropout
        n = 1 if share else dim // block_size
        self.weight = _param(like, n, block_size * (block_size - 1) // 2)
        register_triu_indices(self, block_size, like.device)

    @staticmethod
    def check(dim: int, block_size: int, name: str) -> None:
        _check(block_size >= 1 and dim % block_size == 0,
               f"{name!r}: block size {block_size} does not divide the rotated dimension {dim}; use a divisor of {dim}")

    def reset(self, identity: bool) -> None:
        zero_or_normal(self.weight, identity)

    batchable = True

    def blocks(self) -> Tensor:
        """The (n, b, b) rotation blocks, float32."""
        return self.core()[0]

    @classmethod
    def cores(cls, transforms: list[Transform]) -> tuple[Tensor]:
        t = transforms[0]
        W = torch.stack([core_dtype(x.weight) for x in transforms])
        Q = cayley.skew_from_triu(W, t.rows, t.cols, t.block_size)
        return (cayley.cayley(Q) if t.exact else cayley.cayley_neumann(Q, t.neumann_terms),)

    def act(self, core: tuple[Tensor, ...], z: Tensor, mode: Mode) -> Tensor:
        (B,) = core
        if mode == "forward" and self.training and self.dropout > 0:
            B = cayley.drop_blocks(B[None], self.dropout)[0]
        if mode == "unmerge" and not self.exact:
            return cayley.apply_blocks(z, torch.linalg.inv(B.double()).to(z.dtype), transpose=True)
        return cayley.apply_blocks(z, B.to(z.dtype), transpose=mode == "merge")


#: Largest span ``s = b 2^(m-1)`` whose dense ``s x s`` blocks of ``T`` are formed per step: beyond it their
#: ``s`` multiply-adds per coordinate (the factors': ``m b``) and ``(dim/s) m s^3`` to form them stop being cheap.
COMPOSE_MAX_SPAN = 256


class Butterfly(Transform):
    """``T = F_0 ... F_{m-1}``, ``F_i`` block-diagonal exact Cayley rotations between butterfly
    permutations (BOFT's transform). ``layout="square"`` stores full ``b x b`` blocks made skew by
    ``(X - X^T)/2`` as peft's BOFT does; ``"triu"`` stores only the ``b(b-1)/2`` free entries.

    ``T`` is block-diagonal with contiguous blocks of the span ``s = b 2^(m-1)``: for ``s <=``
    :data:`COMPOSE_MAX_SPAN` the core holds those blocks too (:func:`orthotune.ops.butterfly.compose`,
    once per step for all layers), and the activations meet one ``s``-block contraction; otherwise
    the factors are applied one by one (gather, ``b``-block contraction, gather). The core always
    starts with the factors' (m, n, b, b) blocks: multiplicative dropout acts on them.
    """

    settings = ("dim", "block_size", "layout", "dropout", "span")

    def __init__(self, dim: int, block_size: int, factors: int, like: Tensor, layout: str = "triu",
                 dropout: float = 0.0) -> None:
        super().__init__(dim)
        self.block_size = block_size
        self.layout = layout
        self.dropout = dropout
        n = dim // block_size
        if layout == "square":
            self.weight = _param(like, factors, n, block_size, block_size)
        else:
            self.weight = _param(like, factors, n, block_size * (block_size - 1) // 2)
            register_triu_indices(self, block_size, like.device)
        self.span = butterfly.block_span(block_size, factors)
        self.composed = self.span <= COMPOSE_MAX_SPAN
        perms = butterfly.butterfly_permutations(dim, block_size, factors).to(like.device)
        self.register_buffer("perms", perms, persistent=False)
        self.register_buffer("inverse_perms", torch.argsort(perms, dim=-1), persistent=False)

    @staticmethod
    def check(dim: int, block_size: int, factors: int, name: str) -> None:
        BlockCayley.check(dim, block_size, name)
        _check(factors >= 1, f"{name!r}: the number of butterfly factors must be >= 1, got {factors}")
        if factors > 1:
            span = butterfly.block_span(block_size, factors)
            _check(block_size % 2 == 0 and dim % span == 0,
                   f"{name!r}: {factors} butterfly factors of {block_size}-blocks need an even block size and a "
                   f"dimension divisible by {block_size}*2^{factors - 1}={span}, got {dim}; lower the factors or the block size")

    def reset(self, identity: bool) -> None:
        zero_or_normal(self.weight, identity)

    batchable = True

    def blocks(self) -> Tensor:
        """The (m, n, b, b) rotation blocks of the factors, float32."""
        return self.core()[0]

    @classmethod
    def cores(cls, transforms: list[Transform]) -> tuple[Tensor] | tuple[Tensor, Tensor]:
        """The factors' blocks (L, m, n, b, b), and with :attr:`composed` ``T``'s (L, dim/s, s, s) blocks."""
        t = transforms[0]
        W = torch.stack([core_dtype(x.weight) for x in transforms])
        if t.layout == "square":
            Q = cayley.skew_from_square(W)
        else:
            Q = cayley.skew_from_triu(W, t.rows, t.cols, t.block_size)
        B = cayley.cayley(Q)
        return (B, butterfly.compose(B, t.perms, t.span)) if t.composed else (B,)

    def act(self, core: tuple[Tensor, ...], z: Tensor, mode: Mode) -> Tensor:
        B = core[0]
        R = core[1] if self.composed else None
        if mode == "forward" and self.training and self.dropout > 0:  # dropout acts on the factors' blocks
            B = cayley.drop_blocks(B, self.dropout)
            R = butterfly.compose(B, self.perms, self.span) if self.composed else None
        if R is not None:
            return cayley.apply_blocks(z, R.to(z.dtype), transpose=mode == "merge")
        return butterfly.apply_rows(z, B.to(z.dtype), self.perms, self.inverse_perms, transpose=mode == "merge")


class Givens(Transform):
    """``T = G_{L-1} ... G_0``: ``dim - 1`` Givens rotations in ``ceil(log2 dim)`` parallel layers (GOFT).

    Per step the layers are regrouped into a block-diagonal matrix and a small dense one
    (:func:`orthotune.ops.givens.compact`) where ``dim`` has a power-of-two factor >= 8, so the
    activations see two matmuls instead of ``L`` gathers; otherwise they are applied layer by layer.
    """

    settings = ("dim", "block")

    def __init__(self, dim: int, like: Tensor) -> None:
        super().__init__(dim)
        self.theta = _param(like, dim - 1)
        self.block = givens.compact_block(dim)
        partner, angle_index, sign = givens.tree_layout(dim)
        self.register_buffer("partner", partner.to(like.device), persistent=False)
        self.register_buffer("angle_index", angle_index.to(like.device), persistent=False)
        self.register_buffer("sign", sign.to(like.device), persistent=False)
        if self.block:  # the coordinates the compact form's dense part acts on
            self.register_buffer("high_idx", torch.arange(0, dim, self.block, device=like.device), persistent=False)

    @staticmethod
    def check(dim: int, name: str) -> None:
        _check(dim >= 2, f"{name!r}: Givens rotations need at least 2 coordinates, got {dim}")

    def reset(self, identity: bool) -> None:
        zero_or_normal(self.theta, identity)

    batchable = True

    @classmethod
    def cores(cls, transforms: list[Transform]) -> tuple[Tensor, Tensor]:
        t = transforms[0]
        C, S = givens.coefficients(torch.stack([core_dtype(x.theta) for x in transforms]), t.angle_index, t.sign)
        return givens.compact(C, S, t.partner, t.block) if t.block else (C, S)

    def act(self, core: tuple[Tensor, ...], z: Tensor, mode: Mode) -> Tensor:
        a, b = (c.to(z.dtype) for c in core)
        if self.block:
            return givens.apply_compact(z, a, b, self.high_idx, transpose=mode == "merge")
        return givens.apply_rows(z, a, b, self.partner, transpose=mode == "merge")


class LowRankTransform(Transform):
    """A transform given as ``T = I + A M B^T``: applied and merged through the one form."""

    batchable = True

    def act(self, core: tuple[Tensor, ...], z: Tensor, mode: Mode) -> Tensor:
        A, M, B = (t.to(z.dtype) for t in core)
        if mode == "merge":
            return lowrank.merge_right(z, A, M, B)
        return lowrank.apply_rows(z, A, M, B)  # exact: T^{-1} = T^T


class Householder(LowRankTransform):
    """``T = H_1 ... H_k``, ``H_i = I - 2 u_i u_i^T/||u_i||^2`` in compact WY form (HRA's transform);
    with ``gram_schmidt`` the reflections use orthonormalised vectors, ``T = I - 2 Q Q^T``."""

    settings = ("dim", "gram_schmidt")

    def __init__(self, dim: int, reflections: int, like: Tensor, gram_schmidt: bool = False) -> None:
        super().__init__(dim)
        self.gram_schmidt = gram_schmidt
        self.u = _param(like, dim, reflections)

    @staticmethod
    def check(dim: int, reflections: int, gram_schmidt: bool, name: str) -> None:
        _check(not gram_schmidt or reflections <= dim,
               f"{name!r}: Gram-Schmidt needs at most {dim} reflections (the dimension), got {reflections}")

    def reset(self, identity: bool) -> None:
        with torch.no_grad():
            k = self.u.shape[1]
            if identity:  # reflections in equal pairs cancel: the identity, with non-zero gradients (HRA's init)
                half = torch.empty(self.u.shape[0], k // 2, dtype=self.u.dtype, device=self.u.device)
                nn.init.kaiming_uniform_(half, a=math.sqrt(5))
                self.u.copy_(torch.repeat_interleave(half, 2, dim=1))
            else:
                nn.init.kaiming_uniform_(self.u, a=math.sqrt(5))

    @classmethod
    def cores(cls, transforms: list[Transform]) -> tuple[Tensor, Tensor, Tensor]:
        u = torch.stack([core_dtype(x.u) for x in transforms])
        return householder.gram_schmidt_core(u) if transforms[0].gram_schmidt else householder.reflection_core(u)


class SkewExp(LowRankTransform):
    """``T = exp(S_1) ... exp(S_k)``, ``S_i = U_i V_i^T - V_i U_i^T`` of rank ``2g``: LoCO's chain as a
    transform, computed by the exact parallel chain of :mod:`orthotune.ops.skew`."""

    def __init__(self, dim: int, generator_rank: int, chain_length: int, like: Tensor) -> None:
        super().__init__(dim)
        self.U = _param(like, chain_length, dim, generator_rank)
        self.V = _param(like, chain_length, dim, generator_rank)

    @staticmethod
    def check(dim: int, generator_rank: int, name: str) -> None:
        _check(2 * generator_rank <= dim,
               f"{name!r}: a skew generator of rank 2*{generator_rank} needs 2*generator_rank <= {dim}; lower generator_rank")

    def reset(self, identity: bool) -> None:
        with torch.no_grad():  # as LoCO: V random, U zero, so T = I with non-zero gradients
            nn.init.normal_(self.V, std=1.0 / math.sqrt(self.dim))
            if identity:
                nn.init.zeros_(self.U)
            else:
                nn.init.normal_(self.U, std=0.5 / math.sqrt(self.dim))

    @classmethod
    def cores(cls, transforms: list[Transform]) -> tuple[Tensor, Tensor, Tensor]:
        U = torch.stack([core_dtype(x.U) for x in transforms])
        V = torch.stack([core_dtype(x.V) for x in transforms])
        A, B, M = skew.chain_core(*skew.skew_exp_factors(U, V))
        return A, M, B
