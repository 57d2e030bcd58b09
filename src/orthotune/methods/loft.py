"""LOFT: orthogonal adaptation as a rotation inside a support (Zhao, Mishra, Jawanpuria, Lin, Shi,
Gao, Han, 2026, arXiv:2605.11872).

``W = W0 R``, ``R = I + P (T - I) P^T``: ``P`` (d_in x r, orthonormal) is the support, where the
rotation acts; ``T`` (r x r, orthogonal) is the transform, what it does there. The two are chosen
independently (:mod:`orthotune.supports`, :mod:`orthotune.transforms`); OFT, BOFT, HRA, PSOFT and
GOFT are presets of this module (``methods/oft.py`` ... ``goft.py``), and LoCO is the full support
with the ``"exp"`` transform.

How ``R`` meets the activations, never as a d x d matrix:

* a dense support (random, principal, gradient): the one form ``x + U M V^T x`` with ``U = V = P``,
  ``M = T - I`` (or ``U = P A``, ``V = P B`` when ``T = I + A M B^T`` is narrower than ``r``);
* the full support: ``T`` itself, batched (block contractions, composed butterfly blocks, Givens layers)
  or, for low-rank transforms (Householder, exponential), the one form with ``U = A``, ``V = B``;
* a coordinate support: gather the ``r`` coordinates, apply ``T``, scatter the change back.

A structured ``T`` on the full support (OFT, BOFT, GOFT) may instead be folded into the frozen
weight once per call, ``y = x (W0 T)^T`` (``compute="weight"``, :class:`FoldOption`): one
tensor-core matmul and a weight-sized gradient in place of memory-bound passes over the activations.

Merging follows the same paths on the rows of ``W`` (``W R = W + (W U) M V^T``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import batching
from ..config import AdapterConfig, check_choice, check_positive_int
from ..ops import lowrank
from ..supports import CoordinateSupport, DenseSupport, FullSupport, coordinate_basis, principal_basis, random_basis
from ..transforms import BlockCayley, Butterfly, Givens, Householder, LowRankTransform, Mode, SkewExp, Transform
from ..layer import frozen_weight, inference_fold
from .base import AdapterMethod, Base, cast_to

SUPPORTS = ("principal", "gradient", "gradient_coordinate", "random", "coordinate", "full")
TRANSFORMS = ("cayley", "exp", "givens", "householder", "butterfly")
DEFAULT_R = 16
Support = FullSupport | CoordinateSupport | DenseSupport
COMPUTE = ("activations", "weight")


@dataclass
class FoldOption:
    """The ``compute`` setting of structured transforms on the full support (OFT, BOFT, GOFT, LOFT)."""

    compute: str = field(
        default="activations",
        metadata={"help": "'activations' (x T^T, then the frozen layer) or 'weight' (W0 T formed once per call, then "
                  "one matmul; used when the layer's own frozen weight is the base). On an H100 training step the two "
                  "were within 10% in runs 5 and 7 (benchmarks/results/): neither wins for every method, so the "
                  "default is 'activations'."},
    )

    def __post_init__(self) -> None:
        check_choice("compute", self.compute, COMPUTE)
        super().__post_init__()  # type: ignore[misc]


@dataclass
class LOFTConfig(FoldOption, AdapterConfig):
    """LOFT: a support (where) times a transform (what). Parameters per layer depend on the transform
    on the r-dimensional support: cayley ``(r/b) b(b-1)/2``, exp ``2 k g r``, givens ``r - 1``,
    householder ``k r``, butterfly ``m (r/b) b(b-1)/2``."""

    method = "loft"
    patterns = {"rank_pattern": "r"}

    support: str = field(
        default="principal",
        metadata={"help": "Where the rotation acts: 'principal' (top right singular vectors of W0), 'gradient' "
                  "(dominant directions of Skew(W0^T G); fill with orthotune.select_supports), "
                  "'gradient_coordinate' (the coordinates with most first-order signal), 'random' (a random "
                  "orthonormal basis), 'coordinate' (the first r coordinates) or 'full' (all d_in coordinates)."},
    )
    r: int | None = field(
        default=None,
        metadata={"help": f"Support dimension (the rotation's rank budget); default {DEFAULT_R}. Leave unset "
                  "with support='full', which rotates all d_in coordinates."},
    )
    transform: str = field(
        default="cayley",
        metadata={"help": "The orthogonal map inside the support: 'cayley' (block-diagonal Cayley), 'exp' "
                  "(chain of low-rank skew exponentials), 'givens' (r-1 Givens rotations in log2 r layers), "
                  "'householder' (product of reflections) or 'butterfly' (BOFT's butterfly product)."},
    )
    block_size: int | None = field(
        default=None,
        metadata={"help": "Block size of 'cayley' (default: one r x r block) and 'butterfly' (default 2)."},
    )
    neumann_terms: int | None = field(
        default=None,
        metadata={"help": "'cayley' only: approximate the inverse with this many Cayley-Neumann terms "
                  "(faster, only approximately orthogonal). None: the exact Cayley transform."},
    )
    reflections: int = field(default=2, metadata={"help": "'householder': number of reflections k."})
    generator_rank: int = field(default=1, metadata={"help": "'exp': rank g of each generator's factors."})
    chain_length: int = field(default=1, metadata={"help": "'exp': number k of exponentials chained."})
    butterfly_factors: int = field(default=2, metadata={"help": "'butterfly': number m of butterfly factors."})
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Module name (regex, matched on the name or a dotted suffix) -> support dimension r there."},
    )

    def validate(self) -> None:
        check_choice("support", self.support, SUPPORTS)
        check_choice("transform", self.transform, TRANSFORMS)
        if self.support == "full" and self.r is not None:
            raise ValueError("support='full' rotates all d_in coordinates; leave r unset (r=None)")
        for name in ("r", "block_size", "neumann_terms"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        for name in ("reflections", "generator_rank", "chain_length", "butterfly_factors"):
            check_positive_int(name, getattr(self, name))
        if self.neumann_terms is not None and self.transform != "cayley":
            raise ValueError(f"neumann_terms applies to transform='cayley', not {self.transform!r}; leave it unset")
        if self.transform == "householder" and self.init_identity and self.reflections % 2:
            raise ValueError(
                f"reflections={self.reflections} is odd: the identity start pairs equal reflections, so use an even "
                "number (or init_identity=False)"
            )


class LOFT(AdapterMethod):
    """``R = I + P (T - I) P^T`` on the input side; presets override ``build`` and ``check_layer``."""

    config_class = LOFTConfig
    multiplicative = True

    def __init__(self, config: AdapterConfig, d_in: int, d_out: int, weight: Tensor) -> None:
        super().__init__(config, d_in, d_out, weight)
        like = self._param_like(0, weight=weight)
        self.support, self.transform = self.build(config, d_in, d_out, weight, like)
        self.transform.reset(config.init_identity)
        self.path_dropout: nn.Module | None = None

    # ------------------------------------------------------------------ construction
    @staticmethod
    def build(config: LOFTConfig, d_in: int, d_out: int, weight: Tensor, like: Tensor) -> tuple[Support, Transform]:
        """The support and the (not yet initialised) transform for one layer."""
        kind, r = config.support, _dim(config, d_in)
        # a support basis is fixed, not trained: kept in float32, since one rounded to bfloat16 is
        # orthonormal only to ~4e-3 and R = I + P (T - I) P^T inherits that error
        basis = like if like.dtype in (torch.float32, torch.float64) else like.float()
        if kind == "full":
            support: Support = FullSupport(d_in)
        elif kind in ("coordinate", "gradient_coordinate"):
            task_aware = kind == "gradient_coordinate"
            index = torch.full((r,), -1, device=like.device) if task_aware else coordinate_basis(r, like.device)
            support = CoordinateSupport(index, task_aware=task_aware)
        elif kind == "principal":
            support = DenseSupport(principal_basis(weight, r).to(basis))
        elif kind == "random":
            support = DenseSupport(random_basis(d_in, r, basis))
        else:
            support = DenseSupport(torch.zeros(d_in, r, dtype=basis.dtype, device=like.device), task_aware=True)
        return support, _transform(config, r, like)

    @classmethod
    def check_layer(cls, config: LOFTConfig, d_in: int, d_out: int, name: str) -> None:
        r = _dim(config, d_in)
        if r > d_in:
            raise ValueError(f"LOFT r={r} exceeds d_in={d_in} of {name!r}; use r <= {d_in} or exclude the module")
        if config.support == "principal" and r > min(d_in, d_out):
            raise ValueError(
                f"LOFT principal support r={r} exceeds min(d_in, d_out)={min(d_in, d_out)} of {name!r}: "
                f"W0 has only that many singular directions; use r <= {min(d_in, d_out)}"
            )
        t = config.transform
        if t == "cayley":
            BlockCayley.check(r, config.block_size or r, name)
        elif t == "butterfly":
            Butterfly.check(r, config.block_size or 2, config.butterfly_factors, name)
        elif t == "givens":
            Givens.check(r, name)
        elif t == "exp":
            SkewExp.check(r, config.generator_rank, name)

    # ------------------------------------------------------------------ the rotation
    def _lowrank_form(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(U, M, V)`` with ``R = I + U M V^T`` (float32 cores), or None for the structured paths."""
        core = self.transform.lowrank()
        if isinstance(self.support, DenseSupport):
            P = self.support.P
            P = P if P.dtype in (torch.float32, torch.float64) else P.float()
            if core is not None and core[1].shape[-1] < self.support.dim:
                A, M, B = core
                return P @ A, M, P @ B
            T = self.transform.matrix()
            return P, T - torch.eye(T.shape[0], dtype=T.dtype, device=T.device), P
        if isinstance(self.support, FullSupport):
            return core
        return None

    def _rotate_structured(self, z: Tensor, mode: Mode) -> Tensor:
        if isinstance(self.support, FullSupport):
            return self.transform.rotate(z, mode)
        idx = self.support.index
        sub = z.index_select(-1, idx)
        return z.index_add(-1, idx, self.transform.rotate(sub, mode) - sub)

    def _check_ready(self) -> None:
        if not self.support.ready:
            raise ValueError(
                "this LOFT adapter's task-aware support is not selected yet: run "
                "orthotune.select_supports(model, data_loader) before training or inference"
            )

    # ------------------------------------------------------------------ batched per-step cores
    def core_key(self) -> tuple | None:
        """LOFT layers of one transform signature and support kind share one batched core per step.

        Coordinate supports and path dropout keep the per-layer path (None).
        """
        if self.path_dropout is not None or not self.transform.batchable or not self.support.ready:
            return None
        if not isinstance(self.support, (FullSupport, DenseSupport)):
            return None
        ref = next(self.transform.parameters())
        return (type(self.transform), self.transform.signature(), type(self.support), self.d_in, ref.dtype, ref.device)

    def step_core(self) -> tuple[Tensor, ...]:
        """What forward applies: ``(U, M V^T)`` of the one form, or the structured transform's core."""
        ((_, core),) = self.step_cores([self])
        return tuple(t[0] for t in core)

    @classmethod
    def step_cores(cls, modules: list[LOFT]) -> list[tuple[range, tuple[Tensor, ...]]]:
        """:meth:`step_core` of many layers of one :meth:`core_key`: the transforms' cores in one call."""
        t = modules[0].transform
        core = type(t).stack_cores([m.transform for m in modules])
        lowrank_t = isinstance(t, LowRankTransform)
        if isinstance(modules[0].support, FullSupport):
            if lowrank_t:
                A, M, B = core
                core = (A, M @ B.mT)
            return [(range(len(modules)), core)]
        P = torch.stack([m.support.P for m in modules])
        P = P if P.dtype in (torch.float32, torch.float64) else P.float()
        if lowrank_t and core[1].shape[-1] < t.dim:
            A, M, B = core
            U, M, V = P @ A, M, P @ B
        else:  # T - I on the support (dense r x r per layer, from each layer's slice of the batched core)
            eye = torch.eye(t.dim, dtype=P.dtype, device=P.device)
            T = torch.stack([m.transform.apply_core(tuple(c[i] for c in core), eye, "merge") for i, m in enumerate(modules)])
            U, M, V = P, T - eye, P
        return [(range(len(modules)), (U, M @ V.mT))]

    def _batched(self) -> bool:
        return self.path_dropout is None and self.transform.batchable and isinstance(self.support, (FullSupport, DenseSupport))

    def forward(self, x: Tensor, base: Base) -> Tensor:
        self._check_ready()
        if self._batched():
            core = batching.current(self, x.dtype)
            if isinstance(self.support, DenseSupport) or isinstance(self.transform, LowRankTransform):
                U, Wt = core
                return lowrank.rotated_base(x, U, Wt, base, inference_fold(self, base, U, Wt, x))
            W = self._fold_target(x, base)
            if W is not None:  # y = x (W0 T)^T
                return F.linear(x, self.transform.apply_core(core, W.to(x.dtype), "merge"))
            return base(self.transform.apply_core(core, x, "forward"))
        form = self._lowrank_form()
        if form is None:
            return base(self._rotate_structured(x, "forward"))
        U, M, V = cast_to(x, *form)
        if self.path_dropout is None:
            return base(lowrank.apply_rows(x, U, M, V))
        return base(x + ((self.path_dropout(x) @ V) @ M.mT) @ U.mT)

    def _fold_target(self, x: Tensor, base: Base) -> Tensor | None:
        """The frozen weight to fold a full-support structured ``T`` into this call, or None."""
        if getattr(self.config, "compute", "activations") == "activations":
            return None
        if self.training and getattr(self.transform, "dropout", 0.0) > 0:
            return None  # block dropout acts on the activation path only
        return frozen_weight(base)

    def rotate_rows(self, W: Tensor, mode: Mode) -> Tensor:
        """``W R`` (``mode="merge"``) or ``W R^{-1}`` (``"unmerge"``) for float weights ``W`` (n, d_in)."""
        self._check_ready()
        form = self._lowrank_form()
        if form is None:
            return self._rotate_structured(W, mode)
        U, M, V = (t.to(W.dtype) for t in form)
        if mode == "merge":
            return lowrank.merge_right(W, U, M, V)
        if self.transform.exact:  # R^{-1} = R^T = I + V M^T U^T
            return lowrank.merge_right(W, V, M.mT, U)
        # a non-orthogonal T on a dense support: R^{-1} = I + P (T^{-1} - I) P^T
        T = self.transform.matrix().double()
        M_inv = torch.linalg.inv(T) - torch.eye(T.shape[0], dtype=T.dtype, device=T.device)
        return lowrank.merge_right(W, U, M_inv.to(W.dtype), V)

    def merged_weight(self, W: Tensor) -> Tensor:
        return self.rotate_rows(W, "merge")

    def unmerged_weight(self, W: Tensor) -> Tensor:
        return self.rotate_rows(W, "unmerge")

    def rotation(self) -> Tensor:
        ref = next(self.transform.parameters())
        dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        return self.rotate_rows(torch.eye(self.d_in, dtype=dtype, device=ref.device), "merge")

    def diagnostics(self) -> dict[str, Any]:
        """Orthogonality error ``||R^T R - I||_F / sqrt(d_in)`` and the support.

        From the one form in O(d m^2) where there is one; otherwise from the dense ``T`` (r x r, or
        d_in x d_in for the full support: an inspection-time cost, never a training one).
        """
        with torch.no_grad():
            form = self._lowrank_form() if self.support.ready else None
            if form is not None:
                err = float(lowrank.orthogonality_error(*(t.double() for t in form)))
            else:
                T = self.transform.matrix().double()
                eye = torch.eye(T.shape[0], dtype=T.dtype, device=T.device)
                err = float(torch.linalg.matrix_norm(T.T @ T - eye) / math.sqrt(self.d_in))
        return {"orthogonality_error": err, "support": type(self.support).__name__, "support_dim": self.support.dim,
                "support_selected": self.support.ready}


def _dim(config: LOFTConfig, d_in: int) -> int:
    return d_in if config.support == "full" else (config.r or DEFAULT_R)


def _transform(config: LOFTConfig, r: int, like: Tensor) -> Transform:
    t = config.transform
    if t == "cayley":
        return BlockCayley(r, config.block_size or r, like, neumann_terms=config.neumann_terms)
    if t == "butterfly":
        return Butterfly(r, config.block_size or 2, config.butterfly_factors, like)
    if t == "givens":
        return Givens(r, like)
    if t == "householder":
        return Householder(r, config.reflections, like)
    return SkewExp(r, config.generator_rank, config.chain_length, like)
