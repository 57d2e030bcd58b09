"""PSOFT (principal-subspace orthogonal fine-tuning; peft 0.21's ``PsoftConfig``) as a LOFT preset:
the principal support ``P = V_r`` (top right singular vectors of ``W0``) and an r x r Cayley
transform, optionally with peft's magnitude vectors ``T = diag(b) cayley(Q) diag(a)``.

peft writes the update as ``B (T - I) A`` with ``A = V_r^T``, ``B = U_r S_r``: since
``W0 V_r = U_r S_r`` that is ``W0 P (T - I) P^T``, LOFT's rotation on the principal support, and
``psoft_alpha`` cancels out of it. Magnitudes (peft's default) or ``psoft_orth=False`` make ``T``
non-orthogonal; unmerging then inverts ``T`` (r x r). Only the PSOFT init (``ab_svd_init=
"psoft_init"``) is a rotation of ``W0``; peft's ``"pissa_init"`` variant is not carried.

With ``psoft_svd="lowrank"`` peft's randomized ``U_r S_r`` is not ``W0 V_r`` (``torch.svd_lowrank``'s
error), so the update is no rotation of ``W0``: the layer keeps that output factor ``B = U_r S_r``
(d_out x r, a persistent buffer, like the support, so that a saved adapter reloads the very factors it
was trained with on any device) and computes peft's additive ``W0 + B (T - I) P^T`` (``"output_factor"`` path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..ops import cayley
from .base import Base, Core, cast_to
from .config import AdapterConfig, check_choice, check_dropout, check_positive_int
from .loft.rotation import SupportRotation
from .loft.supports import DenseSupport, principal_basis, seeded_svd_lowrank
from .loft.transforms import Mode, Transform, register_triu_indices, zero_or_normal, core_dtype


@dataclass
class PSOFTConfig(AdapterConfig):
    """PSOFT, named as in peft: ``r(r-1)/2`` (+ ``r`` per magnitude vector; ``r^2`` without psoft_orth)."""

    method = "psoft"

    r: int = field(default=32, metadata={"help": "Rank: the principal subspace's dimension, T is r x r."})
    psoft_orth: bool = field(default=True, metadata={"help": "Cayley-parameterised orthogonal T; False: a free r x r matrix."})
    psoft_mag_a: bool = field(default=True, metadata={"help": "Learn a scale vector on T's input side."})
    psoft_mag_b: bool = field(default=True, metadata={"help": "Learn a scale vector on T's output side."})
    use_cayley_neumann: bool = field(default=False, metadata={"help": "Neumann series instead of the exact inverse."})
    num_cayley_neumann_terms: int = field(default=5, metadata={"help": "Terms of the Neumann series."})
    cayley_neumann_eps: float | None = field(
        default=None, metadata={"help": "With Neumann: rescale Q to this Frobenius norm when it exceeds it."}
    )
    psoft_svd: str = field(default="full", metadata={"help": "'full' (torch.linalg.svd) or 'lowrank' (seeded svd_lowrank)."})
    psoft_svd_lowrank_niter: int = field(default=10, metadata={"help": "Power iterations of the 'lowrank' SVD."})
    random_seed: int = field(default=0, metadata={"help": "Seed of the 'lowrank' SVD's random projection."})
    psoft_dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of the update path."})

    def validate(self) -> None:
        check_positive_int("r", self.r)
        check_positive_int("num_cayley_neumann_terms", self.num_cayley_neumann_terms)
        check_positive_int("psoft_svd_lowrank_niter", self.psoft_svd_lowrank_niter)
        check_choice("psoft_svd", self.psoft_svd, ("full", "lowrank"))
        check_dropout("psoft_dropout", self.psoft_dropout)
        if self.cayley_neumann_eps is not None and not self.cayley_neumann_eps > 0:
            raise ValueError(f"cayley_neumann_eps must be positive or None, got {self.cayley_neumann_eps!r}")


class PSOFTTransform(Transform):
    """``T = diag(b) C diag(a)``, ``C`` Cayley (exact or Neumann) of an r x r skew ``Q``, or free."""

    def __init__(self, config: PSOFTConfig, like: Tensor) -> None:
        super().__init__(config.r)
        self.config = config
        r = config.r
        self.exact = config.psoft_orth and not config.use_cayley_neumann and not (config.psoft_mag_a or config.psoft_mag_b)
        if config.psoft_orth:
            self.weight = nn.Parameter(like.new_empty(r * (r - 1) // 2))
            register_triu_indices(self, r, like.device)
        else:
            self.weight = nn.Parameter(like.new_empty(r, r))
        self.vector_a = nn.Parameter(like.new_empty(r)) if config.psoft_mag_a else None
        self.vector_b = nn.Parameter(like.new_empty(r)) if config.psoft_mag_b else None

    def reset(self, identity: bool) -> None:
        if self.config.psoft_orth:  # peft's init: zero generator (or I), unit magnitudes
            zero_or_normal(self.weight, identity)
        with torch.no_grad():
            if not self.config.psoft_orth:
                nn.init.eye_(self.weight)
                if not identity:
                    self.weight.add_(0.1 * torch.randn_like(self.weight))
            for v in (self.vector_a, self.vector_b):
                if v is not None:
                    v.fill_(1.0)

    batchable = True

    def signature(self) -> tuple:
        c = self.config  # every setting that changes T, so that only like transforms share a batched call
        return super().signature(), (c.psoft_orth, c.use_cayley_neumann, c.num_cayley_neumann_terms, c.cayley_neumann_eps)

    @classmethod
    def cores(cls, transforms: list[Transform]) -> tuple[Tensor]:
        """``T`` (n, r, r) of every transform in one batched Cayley (float32)."""
        t = transforms[0]
        c = t.config
        W = torch.stack([core_dtype(x.weight) for x in transforms])
        if not c.psoft_orth:
            T = W
        else:
            Q = cayley.skew_from_triu(W, t.rows, t.cols, c.r)
            if not c.use_cayley_neumann:
                T = cayley.cayley(Q)
            else:
                if c.cayley_neumann_eps is not None:  # rescale to the given Frobenius norm where it exceeds it
                    norm = torch.linalg.matrix_norm(Q)[..., None, None]
                    Q = torch.where(norm > c.cayley_neumann_eps, Q * (c.cayley_neumann_eps / (norm + 1e-12)), Q)
                T = cayley.cayley_neumann(Q, c.num_cayley_neumann_terms)
        if t.vector_b is not None:
            T = torch.stack([core_dtype(x.vector_b) for x in transforms])[..., :, None] * T
        if t.vector_a is not None:
            T = T * torch.stack([core_dtype(x.vector_a) for x in transforms])[..., None, :]
        return (T,)

    def act(self, core: tuple[Tensor, ...], z: Tensor, mode: Mode) -> Tensor:
        (T,) = core
        if mode == "unmerge":
            return z @ torch.linalg.inv(T.double()).to(z.dtype)
        return z @ (T if mode == "merge" else T.mT).to(z.dtype)


class PSOFT(SupportRotation):
    """A rotation (with magnitudes, a general invertible map) inside W0's principal subspace; with
    ``psoft_svd="lowrank"``, peft's additive ``B (T - I) P^T`` on the randomized SVD's factors."""

    config_class = PSOFTConfig

    def __init__(self, config: PSOFTConfig, d_in: int, d_out: int, weight: Tensor) -> None:
        super().__init__(config, d_in, d_out, weight)
        if config.psoft_svd == "lowrank":
            self.register_buffer("output_factor", lowrank_output_factor(weight, config).to(self.support.P))
            self.path = "output_factor"
            self.multiplicative = False  # an update added to W0, merged and unmerged by adding and subtracting it

    # ------------------------------------------------------------------ the "lowrank" path: y = W0 x + B (T - I) P^T x
    def _output_factor(self, x: Tensor, base: Base, core: Core) -> Tensor:
        P, B = cast_to(x, self.support.P, self.output_factor)
        z = (x if self.path_dropout is None else self.path_dropout(x)) @ P
        return base(x) + (self.transform.act(core, z, "forward") - z) @ B.mT

    def _delta(self, W: Tensor) -> Tensor:
        """``B (T - I) P^T`` in ``W``'s dtype (peft's get_delta_weight)."""
        B, P = self.output_factor.to(W.dtype), self.support.P.to(W.dtype)
        return (self.transform.act(self.core(), B, "merge") - B) @ P.mT

    def merged_weight(self, W: Tensor) -> Tensor:
        return W + self._delta(W) if self.path == "output_factor" else super().merged_weight(W)

    def unmerged_weight(self, W: Tensor) -> Tensor:
        return W - self._delta(W) if self.path == "output_factor" else super().unmerged_weight(W)

    def rotation(self) -> Tensor:
        if self.path == "output_factor":
            raise ValueError(
                "this PSOFT adapter (psoft_svd='lowrank') adds B (T - I) P^T to W0, with B the randomized SVD's U S, not "
                "W0 P: it is no rotation of W0; read its update as merged_weight(zeros)"
            )
        return super().rotation()

    def diagnostics(self) -> dict[str, Any]:
        """As for every rotation; with ``psoft_svd="lowrank"`` the error is ``T``'s alone and ``rotation_of_base``
        is False, since the update ``B (T - I) P^T`` is not ``W0 (R - I)``."""
        out = super().diagnostics()
        if self.path == "output_factor":
            out["rotation_of_base"] = False
        return out

    @staticmethod
    def build_dropout(config: PSOFTConfig) -> nn.Module | None:
        return nn.Dropout(config.psoft_dropout) if config.psoft_dropout > 0 else None

    @staticmethod
    def build(config: PSOFTConfig, d_in: int, d_out: int, weight: Tensor, like: Tensor) -> tuple[DenseSupport, Transform]:
        P = principal_basis(weight, config.r, config.psoft_svd, config.psoft_svd_lowrank_niter, config.random_seed)
        # the fixed basis stays float32 (as in LOFT.build): rounded to bfloat16 it is orthonormal only to ~4e-3
        return DenseSupport(P.to(like if like.dtype in (torch.float32, torch.float64) else like.float())), PSOFTTransform(config, like)

    @classmethod
    def check_layer(cls, config: PSOFTConfig, d_in: int, d_out: int, name: str) -> None:
        if config.r > min(d_in, d_out):
            raise ValueError(
                f"PSOFT r={config.r} exceeds min(d_in, d_out)={min(d_in, d_out)} of {name!r}: W0 has only that many "
                f"principal directions; use r <= {min(d_in, d_out)}"
            )


def lowrank_output_factor(weight: Tensor, config: PSOFTConfig) -> Tensor:
    """peft's ``scaling * B = U_r S_r`` (d_out x r, float32) of ``psoft_svd="lowrank"`` from the layer's (d_out, d_in) weight."""
    U, S, _ = seeded_svd_lowrank(weight, config.r, config.psoft_svd_lowrank_niter, config.random_seed)
    return U * S
