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
from .base import AdapterMethod, Base, Core, in_matmul_dtype
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
        return skew.skew_exp_factors(*_core_precision(self.U, self.V))

    def core_key(self) -> tuple:
        """LoCO layers of one mode, chain length and rank share one batched core per step, whatever their width."""
        c = self.config
        return (c.mode, c.chain_length, c.rank, self.U.dtype, self.U.device)

    @classmethod
    def cores(cls, modules: list[LoCO], dtype: torch.dtype | None = None) -> list[Core]:
        """``(K, U, V)``: the small ``K`` with ``R = I + A K A^T`` and the layer's own parameters, from which its
        forward builds ``A = [U_1, V_1, ..., U_k, V_k]`` (:func:`factor_matrix`); in sequential mode ``K`` holds one
        (2r x 2r) block per factor. Only ``K`` is computed here, for the layers of all widths in one computation:
        no width-sized tensor is made, held or given gradients all step (each layer's backward hands its
        gradients straight to its parameters, as LoRA's does), and the Gram matrices' backward keeps the
        parameters, not a stacked copy (:class:`_Grams`). Without autograd (serving) the core is ``(K, A)``: built
        once, so that a kept core's fold ``W0 A`` is reused."""
        mode, k, r = modules[0].config.mode, modules[0].config.chain_length, modules[0].config.rank
        widths: dict[int, list[int]] = {}
        for i, m in enumerate(modules):
            widths.setdefault(m.d_in, []).append(i)
        groups = list(widths.values())
        grams = [_Grams.apply(len(idx), *[modules[i].U for i in idx], *[modules[i].V for i in idx]) for idx in groups]
        small = _chain_cores(mode, k, r, torch.cat(grams) if len(grams) > 1 else grams[0])
        if dtype is not None and dtype != small.dtype:
            small = small.to(dtype)
        if dtype is not None and dtype.itemsize < 4:  # 16-bit activations: align the rank for the GEMMs
            small = lowrank.pad_square(small)
        per_layer = small.unbind(0)
        order = [i for idx in groups for i in idx]
        out: list[Core] = [()] * len(modules)
        tracked = lowrank.tracked(*(p for m in modules for p in (m.U, m.V)))
        for i, K in zip(order, per_layer):
            m = modules[i]
            out[i] = (K, m.U, m.V) if tracked else (K, m.built_factor(m.U, m.V, K))
        return out

    def built_factor(self, U: Tensor, V: Tensor, K: Tensor) -> Tensor:
        """``A`` of ``R = I + A K A^T`` from the parameters, in ``K``'s dtype and zero-padded to its size: (d, 2kr)
        ``[U_1, V_1, ..., U_k, V_k]``, or per factor (k, d, 2r) ``[U_i, V_i]`` in sequential mode."""
        A = factor_matrix(U, V, per_factor=self.config.mode == "sequential").to(K.dtype)
        pad = K.shape[-1] - A.shape[-1]
        return A if pad == 0 else torch.nn.functional.pad(A, (0, pad))

    def rotation_factors(self, core: Core) -> tuple[Tensor, Tensor]:
        """``(A, K)`` of a core (:meth:`cores`), ``A`` built from the parameters if the core names them."""
        if len(core) == 2:
            return core[1], core[0]
        K, U, V = core
        return self.built_factor(U, V, K), K

    def one_form(self, core: Core) -> tuple[Tensor, Tensor]:
        """``(U, M V^T)`` of the one form ``R = I + U (M V^T)`` (:mod:`orthotune.ops.lowrank`): ``(A, K A^T)``."""
        A, K = self.rotation_factors(core)
        return A, K @ A.transpose(-1, -2)

    def core_dtype(self, dtype: torch.dtype, base: Base) -> torch.dtype:
        """On a quantised base the rotation runs in the frozen matmul's compute dtype (bf16 under float32
        activations), as on a bf16 model: bitsandbytes rounds the rotated input to it anyway, and its skinny
        products then run on tensor cores instead of in float32."""
        return self.matmul_core_dtype(dtype, base)

    def forward(self, x: Tensor, base: Base, core: Core) -> Tensor:
        A, K = self.rotation_factors(core)
        return in_matmul_dtype(x, K.dtype, base, lambda z: self._rotated_base(z, base, A, K))

    def _rotated_base(self, x: Tensor, base: Base, A: Tensor, K: Tensor) -> Tensor:
        """``base(x R^T)`` with ``R = I + A K A^T`` (or the chain of factors in sequential mode)."""
        if self.config.mode == "sequential":  # R = R_1 ... R_k: factor k meets x first
            for i in reversed(range(A.shape[0])):
                x = lowrank.apply_rows(x, A[i], K[i], A[i])
            return base(x)
        W0A = base.fold(A, K, x)
        if W0A is None:
            return base(lowrank.apply_rows(x, A, K, A))
        return lowrank.add_lowrank(base(x), x @ A, K, W0A)  # base(x) + ((x A) K^T) (W0 A)^T

    def merged_weight(self, W: Tensor) -> Tensor:
        A, K = (t.to(W.dtype) for t in self.rotation_factors(self.core()))
        if self.config.mode == "sequential":  # W R_1 R_2 ... R_k
            for i in range(A.shape[0]):
                W = W + ((W @ A[i]) @ K[i]) @ A[i].mT
            return W
        return W + ((W @ A) @ K) @ A.mT

    def unmerged_weight(self, W: Tensor) -> Tensor:
        A, K = (t.to(W.dtype) for t in self.rotation_factors(self.core()))  # R^T = I + A K^T A^T
        if self.config.mode == "sequential":  # W R_k^T ... R_1^T
            for i in reversed(range(A.shape[0])):
                W = W + ((W @ A[i]) @ K[i].mT) @ A[i].mT
            return W
        return W + ((W @ A) @ K.mT) @ A.mT

    def rotation(self) -> Tensor:
        eye = torch.eye(self.d_in, dtype=self.U.dtype if self.U.dtype == torch.float64 else torch.float32,
                        device=self.U.device)
        return self.merged_weight(eye)

    def diagnostics(self) -> dict[str, Any]:
        with torch.no_grad():
            report = {"orthogonality_error": float(lowrank.one_form_error(*self.one_form(self.core())) if self.config.mode != "sequential"
                                                   else lowrank.dense_orthogonality_error(self.rotation()))}
            report.update(approximation_error(self))
        return report


def factor_matrix(U: Tensor, V: Tensor, per_factor: bool = False) -> Tensor:
    """``A`` from the generators' factors ``U``, ``V`` (..., k, d, r): (..., d, 2kr) ``[U_1, V_1, ..., U_k, V_k]``
    (one copy), or per factor (..., k, d, 2r) ``[U_i, V_i]``. ``B = [V_i, -U_i] = A J`` is never formed (:func:`skew.jt_rows`)."""
    if per_factor:
        return torch.cat([U, V], -1)
    return torch.stack([U.transpose(-3, -2), V.transpose(-3, -2)], -2).flatten(-3)


class _Grams(torch.autograd.Function):
    """``A^T A`` (L, 2kr, 2kr) of L layers of one width, ``A`` = :func:`factor_matrix` of each layer's ``(U, V)``,
    in float32 (float64 if the parameters are). The batched product reads a stacked copy of the parameters;
    its backward keeps the parameters instead (alive anyway) and stacks them again: nothing width-sized is held
    from the step's forward to its backward."""

    @staticmethod
    def forward(ctx: Any, n: int, *params: Tensor) -> Tensor:
        ctx.n = n
        ctx.save_for_backward(*params)
        A = _stacked(params, n)
        return A.transpose(-1, -2) @ A

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        params = ctx.saved_tensors
        A = _stacked(params, ctx.n)
        gA = A @ (grad + grad.transpose(-1, -2))  # d(A^T A) = dA^T A + A^T dA
        k, r = params[0].shape[-3], params[0].shape[-1]
        parts = gA.unflatten(-1, (k, 2, r)).permute(3, 0, 2, 1, 4)  # (2, L, k, d, r): U's then V's
        grads = [g.to(p.dtype).contiguous() for g, p in zip((*parts[0].unbind(0), *parts[1].unbind(0)), params)]
        return (None, *grads)


def _stacked(params: tuple[Tensor, ...], n: int) -> Tensor:
    return factor_matrix(*_core_precision(torch.stack(params[:n]), torch.stack(params[n:])))


def _core_precision(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """``U, V`` in the precision the core is made in: float32, or float64 if the parameters are."""
    return (U, V) if U.dtype in (torch.float32, torch.float64) else (U.float(), V.float())


def _chain_cores(mode: str, k: int, r: int, gram: Tensor) -> Tensor:
    """``K`` of ``R = I + A K A^T`` for each layer from its Gram matrix ``A^T A`` (L, 2kr, 2kr): ``B^T A = J^T A^T A``
    gives phi and the chain core (:func:`skew.chain_from_gram`) of all layers at once, and ``K = core J^T``
    (``C B^T = (C J^T) A^T``). Exact: (L, 2kr, 2kr) from the chain; approx: ``phi(B^T A) J^T``; sequential: each
    factor's ``phi(B_i^T A_i) J_r^T`` (L, k, 2r, 2r)."""
    gram = skew.jt_rows(gram, r)
    if mode == "exact":
        small = skew.chain_from_gram(gram, skew.phi(skew.diagonal_blocks(gram, k)))
    elif mode == "approx":  # exp(S_1 + ... + S_k) = I + U phi(V^T U) V^T
        small = skew.phi(gram)
    else:
        small = skew.phi(skew.diagonal_blocks(gram, k))
    return skew.jt_cols(small, r)


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
