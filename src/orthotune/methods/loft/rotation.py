"""LOFT: orthogonal adaptation as a rotation inside a support (Zhao, Mishra, Jawanpuria, Lin, Shi,
Gao, Han, 2026, arXiv:2605.11872).

``W = W0 R``, ``R = I + P (T - I) P^T``: ``P`` (d_in x r, orthonormal) is the support, where the
rotation acts; ``T`` (r x r, orthogonal) is the transform, what it does there. The two are chosen
independently (:mod:`orthotune.methods.loft.supports`, :mod:`orthotune.methods.loft.transforms`); OFT, BOFT, HRA, PSOFT and
GOFT are presets of its :class:`SupportRotation` (``methods/oft.py`` ... ``goft.py``), and LoCO is the full support
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

from ...ops import lowrank
from ..base import AdapterMethod, Base, Core, in_matmul_dtype, split
from ..config import AdapterConfig, check_choice, check_positive_int
from .supports import CoordinateSupport, DenseSupport, FullSupport, coordinate_basis, principal_basis, random_basis
from .transforms import BlockCayley, Butterfly, Givens, Householder, LowRankTransform, Mode, SkewExp, Transform

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
                  "one matmul; used when the layer's own frozen weight is the base). Neither is faster for every method "
                  "(docs/loft.md)."},
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


class SupportRotation(AdapterMethod):
    """``R = I + P (T - I) P^T`` on the input side: a transform ``T`` in a support ``P`` (:meth:`build`).

    The shared base of LOFT and its presets (OFT, BOFT, HRA, GOFT, PSOFT). How ``R`` meets the
    activations (:attr:`path`) is chosen once, at construction, from the support, the transform and the
    ``compute`` setting: ``"one_form"`` (``x + U (M V^T x)``; ``"one_form_dropout"`` with dropout on the
    rotation's path), ``"structured"`` (``T`` itself on the full support), ``"folded"`` (``W0 T`` formed
    once per call) or ``"coordinate"`` (gather, ``T``, scatter the change back).
    """

    multiplicative = True

    def __init__(self, config: AdapterConfig, d_in: int, d_out: int, weight: Tensor) -> None:
        super().__init__(config, d_in, d_out, weight)
        like = self._param_like(0, weight=weight)
        self.support, self.transform = self.build(config, d_in, d_out, weight, like)
        self.transform.reset(config.init_identity)
        self.path_dropout = self.build_dropout(config)
        self.path = _path(self.support, self.transform, getattr(config, "compute", "activations"), self.path_dropout)

    @staticmethod
    def build(config: AdapterConfig, d_in: int, d_out: int, weight: Tensor, like: Tensor) -> tuple[Support, Transform]:  # pragma: no cover - abstract
        """The support and the (not yet initialised) transform for one layer."""
        raise NotImplementedError

    @staticmethod
    def build_dropout(config: AdapterConfig) -> nn.Module | None:
        """Dropout on the rotation's path (``x + U M V^T dropout(x)``), or None."""
        return None

    @property
    def ready(self) -> bool:
        return self.support.ready

    def _check_ready(self) -> None:
        if not self.support.ready:
            raise ValueError(
                "this LOFT adapter's task-aware support is not selected yet: run "
                "orthotune.select_supports(model, data_loader) before training or inference"
            )

    # ------------------------------------------------------------------ the core
    def core_key(self) -> tuple | None:
        """Layers of one path, transform signature, support kind and width share one batched core per step."""
        if not self.transform.batchable or not self.support.ready:
            return None
        ref = next(self.transform.parameters())
        return (self.path, type(self.transform), self.transform.signature(), type(self.support), self.d_in,
                ref.dtype, ref.device)

    @classmethod
    def cores(cls, modules: list[SupportRotation], dtype: torch.dtype | None = None) -> list[Core]:
        """The transforms' cores in one call; on the one-form paths folded with the supports into ``(U, MVt)``,
        ``R = I + U MVt``, ``MVt = M V^T``."""
        for m in modules:
            m._check_ready()
        core = type(modules[0].transform).cores([m.transform for m in modules])
        if modules[0].path.startswith("one_form"):
            core = _one_form(modules, core)
        return split(core, dtype)

    def core_dtype(self, dtype: torch.dtype, base: Base) -> torch.dtype:
        """On a quantised base a one-form rotation (HRA, PSOFT, LOFT by default) runs in the frozen matmul's
        compute dtype (bf16 under float32 activations), as on a bf16 model: bitsandbytes rounds the rotated input
        to it anyway, and the skinny products then run on tensor cores (8B-shaped NF4 table: HRA 0.93-0.96x peft
        LoRA's step, was 0.98-1.03x). The other paths keep the activations' dtype: OFT's Cayley blocks cast to bf16
        sat next to the float32 blocks their backward keeps, 1.001x peft LoRA's peak for a faster step (0.93x)."""
        one_form = self.multiplicative and self.path.startswith("one_form")
        return self.matmul_core_dtype(dtype, base) if one_form else dtype

    # ------------------------------------------------------------------ the paths
    def forward(self, x: Tensor, base: Base, core: Core) -> Tensor:
        path = getattr(self, "_" + self.path)
        dtype = next((t.dtype for t in core if t.is_floating_point()), x.dtype)  # the core's (see core_dtype)
        return in_matmul_dtype(x, dtype, base, lambda z: path(z, base, core))

    def _one_form(self, x: Tensor, base: Base, core: Core) -> Tensor:
        U, MVt = core
        return lowrank.rotated_base(x, U, MVt, base, base.fold(U, MVt, x))

    def _one_form_dropout(self, x: Tensor, base: Base, core: Core) -> Tensor:
        U, MVt = core
        return base(x + (self.path_dropout(x) @ MVt.mT) @ U.mT)

    def _structured(self, x: Tensor, base: Base, core: Core) -> Tensor:
        return base(self.transform.act(core, x, "forward"))

    def _folded(self, x: Tensor, base: Base, core: Core) -> Tensor:
        """``y = x (W0 T)^T`` when ``base`` is the layer's own frozen weight (and no block dropout acts), else structured."""
        W = base.weight
        if W is None or (self.training and getattr(self.transform, "dropout", 0.0) > 0):
            return self._structured(x, base, core)
        return F.linear(x, self.transform.act(core, W.to(x.dtype), "merge"))

    def _coordinate(self, x: Tensor, base: Base, core: Core) -> Tensor:
        return base(self._scatter(core, x, "forward"))

    def _scatter(self, core: Core, z: Tensor, mode: Mode) -> Tensor:
        """``T`` on the support's coordinates of ``z``, the change scattered back."""
        idx = self.support.index
        sub = z.index_select(-1, idx)
        return z.index_add(-1, idx, self.transform.act(core, sub, mode) - sub)

    # ------------------------------------------------------------------ weights
    def rotate_rows(self, W: Tensor, mode: Mode) -> Tensor:
        """``W R`` (``mode="merge"``) or ``W R^{-1}`` (``"unmerge"``) for float weights ``W`` (n, d_in)."""
        core = self.core()
        if self.path == "coordinate":
            return self._scatter(core, W, mode)
        if not self.path.startswith("one_form"):
            return self.transform.act(core, W, mode)
        U, MVt = (t.to(W.dtype) for t in core)
        if mode == "merge":
            return W + (W @ U) @ MVt
        if self.transform.exact:  # R^{-1} = R^T = I + MVt^T U^T
            return W + (W @ MVt.mT) @ U.mT
        # a non-orthogonal T on a dense support: R^{-1} = I + P (T^{-1} - I) P^T
        T = self.transform.matrix().double()
        M_inv = torch.linalg.inv(T) - torch.eye(T.shape[0], dtype=T.dtype, device=T.device)
        return lowrank.merge_right(W, U, M_inv.to(W.dtype), U)

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
            if self.support.ready and self.path.startswith("one_form"):
                err = float(lowrank.one_form_error(*self.core()))
            else:
                T = self.transform.matrix().double()
                eye = torch.eye(T.shape[0], dtype=T.dtype, device=T.device)
                err = float(torch.linalg.matrix_norm(T.T @ T - eye) / math.sqrt(self.d_in))
        return {"orthogonality_error": err, "support": type(self.support).__name__, "support_dim": self.support.dim,
                "support_selected": self.support.ready}


class LOFT(SupportRotation):
    """LOFT's configurable rotation: any support (:data:`SUPPORTS`) times any transform (:data:`TRANSFORMS`)."""

    config_class = LOFTConfig

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



def _path(support: Support, transform: Transform, compute: str, dropout: nn.Module | None) -> str:
    """How a rotation meets the activations (:class:`SupportRotation`), fixed at construction."""
    if isinstance(support, DenseSupport) or (isinstance(support, FullSupport) and isinstance(transform, LowRankTransform)):
        return "one_form" if dropout is None else "one_form_dropout"
    if isinstance(support, CoordinateSupport):
        return "coordinate"
    return "folded" if compute == "weight" else "structured"


def _one_form(modules: list[SupportRotation], core: Core) -> Core:
    """``(U, MVt)`` of many layers (stacked) from their transforms' stacked core: ``U = V = P``, ``M = T - I``
    on a dense support (``U = P A``, ``V = P B`` when ``T = I + A M B^T`` is narrower than the support);
    ``U = A``, ``V = B`` for a low-rank transform on the full support."""
    t = modules[0].transform
    lowrank_t = isinstance(t, LowRankTransform)
    if isinstance(modules[0].support, FullSupport):
        A, M, B = core
        return A, M @ B.mT
    P = torch.stack([m.support.P for m in modules])
    P = P if P.dtype in (torch.float32, torch.float64) else P.float()
    if lowrank_t and core[1].shape[-1] < t.dim:
        A, M, B = core
        return P @ A, M @ (P @ B).mT
    # T - I on the support (dense r x r per layer, from each layer's slice of the batched core)
    eye = torch.eye(t.dim, dtype=P.dtype, device=P.device)
    T = torch.stack([m.transform.act(tuple(c[i] for c in core), eye, "merge") for i, m in enumerate(modules)])
    return P, (T - eye) @ P.mT


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
