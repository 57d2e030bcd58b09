"""The sparse 2-D spectrum update LoCA and FourierFT share: n coefficients at n cells of the weight's spectrum, ``dW = P^T diag(c) Q``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import spectral
from .base import AdapterMethod, Base, Core
from .config import AdapterConfig

COMPUTE = ("auto", "lowrank", "dense")


class SparseSpectrum(AdapterMethod):
    """An additive update from n coefficients at n spectrum cells: ``dW = P^T diag(c) Q`` (LoCA, FourierFT).

    Subclasses say which basis rows ``P``, ``Q`` and effective coefficients ``c`` a spectrum gives
    (:meth:`factors`); applying, merging and the checks are shared.
    """

    label = ""
    perturbed_std = 1.0  # std of the coefficients when init_identity is False

    def __init__(self, config: AdapterConfig, d_in: int, d_out: int, weight: Tensor, cells: Tensor) -> None:
        super().__init__(config, d_in, d_out, weight)
        self.spectrum = nn.Parameter(self._param_like(cells.shape[1], weight=weight))
        # Integer (row, col) cells: exact under .half()/.double(), saved with the adapter.
        self.register_buffer("locations", cells.to(weight.device))
        self.dropout: nn.Module = nn.Identity()
        self.reset_parameters()

    @classmethod
    def check_layer(cls, config: AdapterConfig, d_in: int, d_out: int, name: str) -> None:
        if config.n_frequency > d_in * d_out:
            raise ValueError(
                f"{cls.label} n_frequency={config.n_frequency} exceeds the {d_out}x{d_in}={d_in * d_out} cells of "
                f"{name!r}'s spectrum; use n_frequency <= {d_in * d_out} or exclude the module"
            )

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.config.init_identity:
                nn.init.zeros_(self.spectrum)  # dW = 0, while dL/dc = the spectrum of dL/dW at the cells != 0
            else:
                nn.init.normal_(self.spectrum, std=self.perturbed_std)

    def factors(self, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # pragma: no cover - abstract
        """``(P, Q, c_eff)`` for the spectrum ``c`` (already in the compute dtype and device)."""
        raise NotImplementedError

    def rows(self, core: Core) -> tuple[Tensor, Tensor, Tensor]:
        """``(P, Q, c_eff)`` of this step from the layer's core (here the core is those factors)."""
        P, Q, c = core
        return P, Q, c

    def delta_weight(self, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
        """``dW`` (d_out x d_in): one (d_out x m)(m x d_in) product."""
        return spectral.sparse_delta(*self.factors(self.spectrum.to(device=device, dtype=dtype)))

    @classmethod
    def cores(cls, modules: list[SparseSpectrum], dtype: torch.dtype | None = None) -> list[Core]:
        """``(P, Q, c_eff)`` of :meth:`factors` per layer, from the spectrum in ``dtype``."""
        return [m.factors(m.spectrum if dtype is None else m.spectrum.to(dtype)) for m in modules]

    def core_dtype(self, dtype: torch.dtype, base: Base) -> torch.dtype:
        """On a quantised base the activations are float32 (norms kept float32) while the base matmul runs in
        its compute dtype: the rank-n update, a third of that matmul's FLOPs at n=1000, runs there as well, and
        its basis rows are made there (no float32 copy of n x (d_in + d_out) entries to cast)."""
        return self.matmul_core_dtype(dtype, base)

    def forward(self, x: Tensor, base: Base, core: Core) -> Tensor:
        P, Q, c = self.rows(core)
        # Folding dW into the frozen weight needs that weight, and no dropout on the update's input.
        W = base.weight if isinstance(self.dropout, nn.Identity) or not self.training else None
        compute = self.config.compute
        if compute == "auto":
            grad = torch.is_grad_enabled() and c.requires_grad
            tokens = x.numel() // max(x.shape[-1], 1)
            dense = spectral.prefers_dense(tokens, c.shape[0], self.d_in, self.d_out, grad, merged=W is not None)
            compute = "dense" if dense else "lowrank"
        if compute == "dense" and W is not None:
            return F.linear(x, spectral.add_sparse_delta(W, P, Q, c))
        path = self.core_dtype(x.dtype, base)
        xp = x.to(path)
        update = spectral.sparse_apply(self.dropout(xp), P.to(path), Q.to(path), c.to(path), compute=compute)
        # A quantised base's matmul computes in ``path`` too: it takes the same cast input (one cast of the
        # (..., d_in) activations, not two; the input's gradients from both are summed in ``path``) and its
        # output is cast back as bitsandbytes' own forward would.
        shared = base.computes_in(path, x)
        out = base(xp).to(x.dtype) if shared else base(x)
        # Eager: add into the frozen map's fresh output, one pass instead of a cast and an add (3-6% of an 8B-shaped
        # NF4 model's eager step on an H200 at n=1000); not into a view (bitsandbytes' 8-bit matmul returns one,
        # which autograd forbids changing) nor under a compiler, which fuses the add anyway.
        if out.dtype == x.dtype and not torch.compiler.is_compiling() and not out._is_view():
            return out.add_(update)
        return out + update.to(x.dtype)

    def merged_weight(self, W: Tensor) -> Tensor:
        return W + self.delta_weight(W.dtype, W.device)

    def unmerged_weight(self, W: Tensor) -> Tensor:
        return W - self.delta_weight(W.dtype, W.device)
