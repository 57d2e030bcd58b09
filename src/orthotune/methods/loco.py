"""LoCO: low-rank compositional rotations (Nguyen, Choi, Tong; IJCAI 2026, arXiv:2605.15916).

``W = W0 R``, ``R = exp(S_1) exp(S_2) ... exp(S_k)``, ``S_i = U_i V_i^T - V_i U_i^T`` (U_i, V_i: d x r).

Three ways to apply the chain to activations, all O(d k r) per token and never d x d:

* ``"exact"`` (default): the exact parallel chain ``R = I + A M B^T``, ``M = C (I - G C)^{-1}``
  (orthotune's closed form, :func:`orthotune.ops.skew.chain_core`): one core per step, then one
  rank-2kr pass. Exact and exactly orthogonal.
* ``"sequential"``: the same rotation applied factor by factor (the paper's exact chain).
* ``"approx"``: the fully parallel approximation ``exp(S_1 + ... + S_k)``. The paper's own
  approximation could not be read here (only its abstract is reachable); this is the first-order
  (BCH/Lie-Trotter) form from orthotune's spec: exactly orthogonal, with the error bounded by
  ``(1/2) sum_i ||[S_i, S_{i+1} + ... + S_k]||_2`` (:func:`approximation_error` reports both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..ops import lowrank, skew
from .base import AdapterMethod, Base, Core, cast, split
from .config import AdapterConfig, check_choice, check_positive_int

MODES = ("exact", "sequential", "approx")


@dataclass
class LoCOConfig(AdapterConfig):
    """LoCO hyperparameters: ``2 * chain_length * rank * d_in`` trainable parameters per layer."""

    method = "loco"
    patterns = {"rank_pattern": "rank", "chain_length_pattern": "chain_length"}

    rank: int = field(default=4, metadata={"help": "Rank r of each generator's factors U_i, V_i (d x r)."})
    chain_length: int = field(default=4, metadata={"help": "Number k of rotations composed in the chain."})
    mode: str = field(
        default="exact",
        metadata={"help": "'exact' (parallel closed form), 'sequential' (factor by factor) or 'approx' (exp of the sum)."},
    )
    init_std: float | None = field(
        default=None,
        metadata={"help": "Std of the V_i at init (U_i start at zero, so R = I); default 1/sqrt(d_in)."},
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Module name (regex, matched on the name or a dotted suffix) -> rank there (peft's rule)."},
    )
    chain_length_pattern: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Module name (regex, as rank_pattern) -> chain_length there."}
    )

    def validate(self) -> None:
        check_positive_int("rank", self.rank)
        check_positive_int("chain_length", self.chain_length)
        check_choice("mode", self.mode, MODES)
        if self.init_std is not None and not (self.init_std > 0 and math.isfinite(self.init_std)):
            raise ValueError(f"init_std must be a positive finite number or None, got {self.init_std!r}")


class LoCO(AdapterMethod):
    """Input-side rotation chain of ``chain_length`` low-rank skew exponentials."""

    config_class = LoCOConfig
    multiplicative = True

    def __init__(self, config: LoCOConfig, d_in: int, d_out: int, weight: Tensor) -> None:
        super().__init__(config, d_in, d_out, weight)
        k, r = config.chain_length, config.rank
        self.U = nn.Parameter(self._param_like(k, d_in, r, weight=weight))
        self.V = nn.Parameter(self._param_like(k, d_in, r, weight=weight))
        self.reset_parameters()

    @classmethod
    def check_layer(cls, config: LoCOConfig, d_in: int, d_out: int, name: str) -> None:
        if 2 * config.rank > d_in:
            raise ValueError(
                f"LoCO rank={config.rank} is too large for {name!r} (d_in={d_in}): a skew generator of rank 2r "
                f"needs 2r <= d_in; use rank <= {d_in // 2} or exclude the module"
            )

    def reset_parameters(self) -> None:
        std = self.config.init_std or 1.0 / math.sqrt(self.d_in)
        with torch.no_grad():
            nn.init.normal_(self.V, std=std)
            if self.config.init_identity:
                nn.init.zeros_(self.U)
            else:
                nn.init.normal_(self.U, std=0.5 / math.sqrt(self.d_in))

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(A, B, C)``: each rotation ``exp(S_i) = I + A_i C_i B_i^T``; the core in float32."""
        U, V = self.U, self.V
        if U.dtype not in (torch.float32, torch.float64):
            U, V = U.float(), V.float()
        return skew.skew_exp_factors(U, V)

    def core_key(self) -> tuple:
        """LoCO layers of one mode, chain length and rank share one batched core per step, whatever their width."""
        c = self.config
        return (c.mode, c.chain_length, c.rank, self.U.dtype, self.U.device)

    @classmethod
    def cores(cls, modules: list[LoCO], dtype: torch.dtype | None = None) -> list[Core]:
        """``(U, MVt)`` with ``R x = x + U (MVt x)``, ``MVt = M V^T`` (exact, approx); in sequential mode
        ``(A_i, C_i B_i^T)`` stacked per factor. Stacked per width, the small cores of all widths in one computation.
        Its backward keeps no width-sized tensor but the cores (the products with ``B`` come from ``A``, see
        :func:`_chain_cores`); recomputing the cores in the backward instead saved 0.4-0.6% of the 8B-shaped NF4
        table's peak and cost 5% of its eager step, 4-7% compiled (H200), so they stay for the step."""
        widths: dict[int, list[int]] = {}
        for i, m in enumerate(modules):
            widths.setdefault(m.d_in, []).append(i)
        stacks = []
        for idx in widths.values():
            # One stack for U and V, then leading-dim slices: their gradients come back as contiguous
            # slices of one tensor, which autograd hands to the parameters without a copy each.
            both = torch.stack([modules[i].U for i in idx] + [modules[i].V for i in idx])
            stacks.append((both[: len(idx)], both[len(idx) :]))
        out: list[Core] = [()] * len(modules)
        for idx, stacked in zip(widths.values(), _chain_cores(modules[0].config.mode, stacks)):
            stacked = cast(stacked, dtype)
            if dtype is not None and dtype.itemsize < 4:  # 16-bit activations: align the rank for the GEMMs
                stacked = lowrank.pad_rank(*stacked)
            for i, core in zip(idx, split(stacked)):
                out[i] = core
        return out

    def forward(self, x: Tensor, base: Base, core: Core) -> Tensor:
        U, MVt = core
        if self.config.mode == "sequential":  # R = R_1 ... R_k: factor k meets x first
            for i in reversed(range(U.shape[0])):
                x = lowrank.rotate_rows(x, U[i], MVt[i])
            return base(x)
        return lowrank.rotated_base(x, U, MVt, base, base.fold(U, MVt, x))

    def merged_weight(self, W: Tensor) -> Tensor:
        U, MVt = (t.to(W.dtype) for t in self.core())
        if self.config.mode == "sequential":  # W R_1 R_2 ... R_k
            for i in range(U.shape[0]):
                W = W + (W @ U[i]) @ MVt[i]
            return W
        return W + (W @ U) @ MVt

    def unmerged_weight(self, W: Tensor) -> Tensor:
        U, MVt = (t.to(W.dtype) for t in self.core())  # R^T = I + MVt^T U^T
        if self.config.mode == "sequential":  # W R_k^T ... R_1^T
            for i in reversed(range(U.shape[0])):
                W = W + (W @ MVt[i].mT) @ U[i].mT
            return W
        return W + (W @ MVt.mT) @ U.mT

    def rotation(self) -> Tensor:
        eye = torch.eye(self.d_in, dtype=self.U.dtype if self.U.dtype == torch.float64 else torch.float32,
                        device=self.U.device)
        return self.merged_weight(eye)

    def diagnostics(self) -> dict[str, Any]:
        with torch.no_grad():
            report = {"orthogonality_error": float(lowrank.one_form_error(*self.core()) if self.config.mode != "sequential"
                                                   else lowrank.dense_orthogonality_error(self.rotation()))}
            report.update(approximation_error(self))
        return report


def _chain_cores(mode: str, stacks: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """Per-step cores of layers given as stacks ``(U, V)`` of shape (L, k, d, r), one stack per width.

    Only the Gram matrices ``B^T A = J^T A^T A`` (2kr x 2kr) depend on the width: they are computed per stack,
    then ``phi`` and the chain core run once for all layers of all widths, and the core is folded
    into the right factor per stack. Returns, per stack, exact / approx: ``(U_c, M V_c^T)``
    ((L, d, 2kr), (L, 2kr, d)), the one form; sequential: ``(A_i, C_i B_i^T)`` ((L, k, d, 2r),
    (L, k, 2r, d)), one pair per factor. Float32 (float64 if the parameters are).
    """
    k, r = stacks[0][0].shape[-3], stacks[0][0].shape[-1]
    parts = []
    for U, V in stacks:
        if U.dtype not in (torch.float32, torch.float64):
            U, V = U.float(), V.float()
        A = torch.cat([U, V], -1)  # A_i = [U_i, V_i]; B_i = [V_i, -U_i] = A_i J_r is never formed (skew.jt_rows)
        parts.append(A if mode == "sequential" else skew.stack_factors(A))  # per factor, or U_c side by side
    # B^T A = J^T A^T A: per factor (sequential, (L, k, 2r, 2r)) or of the stacked factors V_c^T U_c (L, 2kr, 2kr)
    gram = skew.jt_rows(torch.cat([F.transpose(-1, -2) @ F for F in parts]), r)
    if mode == "exact":
        small = skew.chain_from_gram(gram, skew.phi(skew.diagonal_blocks(gram, k)))
    else:  # approx: exp(S_1 + ... + S_k) = I + U phi(V^T U) V^T; sequential: each factor's phi(B_i^T A_i)
        small = skew.phi(gram)
    out, start = [], 0
    for F in parts:
        core = small[start : start + F.shape[0]]
        start += F.shape[0]
        # C B^T = (C J^T) A^T: the backward keeps A (U_c), which is the core itself, not a second copy B (V_c)
        out.append((F, skew.jt_cols(core, r) @ F.transpose(-1, -2)))
    return out


@torch.no_grad()
def approximation_error(module: LoCO) -> dict[str, float]:
    """How far the parallel approximation ``exp(sum S_i)`` is from the exact chain, for one layer.

    Returns the spectral-norm gap ``||R_chain - R_approx||_2``, its relative Frobenius size
    ``||R_chain - R_approx||_F / ||R_chain - I||_F``, the first-order bound that the gap never
    exceeds, and the orthogonality error of the approximation. All computed low-rank, in float64.
    """
    A, B, C = (t.double() for t in module.factors())
    exact = skew.chain_core(A, B, C)
    approx = skew.sum_exp_core(A, B)
    exact_t = (exact[0], exact[2], exact[1])
    approx_t = (approx[0], approx[2], approx[1])
    gap_fro = lowrank.difference_norm(exact_t, approx_t)
    moved = lowrank.lowrank_norm(exact_t[0], exact_t[1], exact_t[2])
    return {
        "approx_error_2norm": float(lowrank.difference_norm(exact_t, approx_t, ord=2)),
        "approx_error_relative": float(gap_fro / moved) if moved > 0 else 0.0,
        "approx_error_bound": float(skew.trotter_bound(A, B)),
        "approx_orthogonality_error": float(lowrank.orthogonality_error(*approx_t)),
    }
