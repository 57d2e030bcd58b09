"""LoCA: location-aware cosine adaptation (Du et al., ICLR 2025, arXiv:2502.06820).

``W = W0 + alpha * iDCT2(C) = W0 + alpha D_out^T C D_in``, ``C`` holding n learnable coefficients
at n discrete cells of the (d_out x d_in) DCT spectrum. Only n cells are non-zero, so
``dW = alpha P^T diag(c) Q`` with ``P = D_out[rows]``, ``Q = D_in[cols]``: a rank-n product applied
to activations (or formed once when that is cheaper), never a dense spectrum or a full transform.

The cells are learned: their gradient is estimated by central finite differences on the spectrum
(:func:`orthotune.ops.spectral.located_dct_rows`) while :class:`orthotune.methods.loca.schedule.LocationLearner`
(or its Trainer callback) alternates coefficient and location phases, then freezes the locations.
Without a learner, LoCA trains its coefficients at fixed random cells.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...ops import spectral
from ..config import AdapterConfig, check_choice, check_dropout, check_positive_int
from ..base import Core
from ..spectral import COMPUTE, SparseSpectrum


@dataclass
class LoCAConfig(AdapterConfig):
    """LoCA hyperparameters (the paper's defaults): ``n_frequency`` trainable coefficients per layer."""

    method = "loca"
    patterns = {"n_frequency_pattern": "n_frequency"}

    n_frequency: int = field(default=1000, metadata={"help": "Number n of learnable DCT coefficients per layer."})
    scale: float = field(default=1.0, metadata={"help": "alpha: dW = alpha * iDCT2(C)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    learn_locations: bool = field(
        default=True, metadata={"help": "Let a LocationLearner move the coefficients' cells; False keeps the random cells."}
    )
    location_lr: float = field(
        default=1e-4,
        metadata={"help": "Adam learning rate of the locations, in units of the spectrum's extent (positions in [0, 1])."},
    )
    coefficient_steps: int = field(
        default=10, metadata={"help": "B_a: optimiser steps of each coefficient phase (locations fixed)."}
    )
    location_steps: int = field(
        default=20, metadata={"help": "B_l: optimiser steps of each location phase (coefficients fixed)."}
    )
    location_learning_steps: int | None = field(
        default=None,
        metadata={"help": "B_s: steps of alternation before the locations freeze; None = location_learning_fraction of all steps."},
    )
    location_learning_fraction: float = field(
        default=0.1, metadata={"help": "B_s as a fraction of the total optimiser steps when location_learning_steps is None."}
    )
    location_grad_clip: float | None = field(
        default=1.0, metadata={"help": "Clamp of each finite-difference location gradient (index units); None = no clamp."}
    )
    compute: str = field(
        default="auto",
        metadata={"help": "'lowrank' (rank-n on activations), 'dense' (form dW once per call, folded into the frozen "
                  "weight when no other adapter is composed) or 'auto' (cheaper by FLOPs)."},
    )
    n_frequency_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Module name (regex, matched on the name or a dotted suffix) -> n_frequency there."},
    )

    def validate(self) -> None:
        check_positive_int("n_frequency", self.n_frequency)
        check_positive_int("coefficient_steps", self.coefficient_steps)
        check_positive_int("location_steps", self.location_steps)
        check_choice("compute", self.compute, COMPUTE)
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be a finite number, got {self.scale!r}")
        check_dropout("dropout", self.dropout)
        if not (self.location_lr > 0 and math.isfinite(self.location_lr)):
            raise ValueError(f"location_lr must be a positive finite number, got {self.location_lr!r}")
        steps = self.location_learning_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ValueError(f"location_learning_steps must be an integer >= 0 or None, got {steps!r}")
        if not 0.0 <= self.location_learning_fraction <= 1.0:
            raise ValueError(f"location_learning_fraction must be in [0, 1], got {self.location_learning_fraction!r}")
        clip = self.location_grad_clip
        if clip is not None and not (clip > 0 and math.isfinite(clip)):
            raise ValueError(f"location_grad_clip must be a positive finite number or None, got {clip!r}")


class LoCA(SparseSpectrum):
    """Additive sparse-DCT update: ``y = W0 x + alpha D_out^T C D_in dropout(x)``."""

    config_class = LoCAConfig
    label = "LoCA"
    perturbed_std = 0.1

    def __init__(self, config: LoCAConfig, d_in: int, d_out: int, weight: Tensor) -> None:
        cells = spectral.distinct_cells(d_out * d_in, config.n_frequency)
        super().__init__(config, d_in, d_out, weight, torch.stack([cells // d_in, cells % d_in]))
        #: Continuous cells (2, n) in [0, 1] of the spectrum's extent, set by a LocationLearner during
        #: its location phases: forward then rounds them and their backward is the finite difference.
        self.relaxed_locations: Tensor | None = None
        if config.dropout > 0:
            self.dropout = nn.Dropout(config.dropout)

    def extent(self) -> Tensor:
        """``[[d_out - 1], [d_in - 1]]``: relaxed positions in [0, 1] times this are cells in index units."""
        return torch.tensor([[self.d_out - 1], [self.d_in - 1]], dtype=torch.float32, device=self.locations.device)

    def factors(self, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(P, Q, c_eff)`` with ``P^T diag(c_eff) Q = alpha D_out[rows]^T diag(c) D_in[cols]``: only the DCT rows
        at this layer's cells, computed here. At fixed cells the rows are the cosines and their norms go into
        ``c_eff`` (n numbers instead of a pass over n x (d_in + d_out) entries)."""
        relaxed = self.relaxed_locations
        if relaxed is None:
            rows, cols = self.locations
            norms = spectral.cell_scales(self.locations, self.d_out, self.d_in)  # as the planned cores scale them
            P, Q = spectral.cos_rows(self.d_out, rows, c.dtype), spectral.cos_rows(self.d_in, cols, c.dtype)
            return P, Q, (c.to(norms.dtype) * (self.config.scale * norms)).to(c.dtype)  # rounded once
        pos = relaxed * self.extent()
        clip = self.config.location_grad_clip
        P = spectral.located_dct_rows(self.d_out, pos[0], c.dtype, clip)
        Q = spectral.located_dct_rows(self.d_in, pos[1], c.dtype, clip)
        return P, Q, self.config.scale * c

    def core_key(self) -> Hashable | None:
        """At fixed cells every layer's core is planned in one call (:meth:`cores`); a location phase's relaxed
        cells (rows with a finite-difference backward) are made per layer."""
        return None if self.relaxed_locations is not None else (self.spectrum.dtype, self.spectrum.device)

    @classmethod
    def cores(cls, modules: list[LoCA], dtype: torch.dtype | None = None) -> list[Core]:
        """At fixed cells ``(cos_out, cos_in, c_eff)`` per layer: the cosine tables of its widths (4 d values each,
        one tensor per width shared by every layer) and its coefficients times their norms and alpha, scaled in one
        call per layer shape. Its forward makes the rows from the tables (:meth:`rows`): a few launches, and no
        n x (d_in + d_out) rows held from a forward to its backward. Relaxed cells: :meth:`factors` per layer."""
        if any(m.relaxed_locations is not None for m in modules):
            return super().cores(modules, dtype)
        dtype = dtype or modules[0].spectrum.dtype
        device = modules[0].spectrum.device
        tables = {d: spectral.cos_table(d, dtype, device) for d in sorted({d for m in modules for d in (m.d_out, m.d_in)})}
        shapes: dict[tuple[int, int, float], list[int]] = defaultdict(list)
        for i, m in enumerate(modules):
            shapes[(m.d_out, m.d_in, m.config.scale)].append(i)
        coefficients: dict[int, Tensor] = {}
        for (d_out, d_in, scale), members in shapes.items():
            spectra = [modules[i].spectrum for i in members]
            cells = torch.cat([modules[i].locations for i in members], 1)
            norms = spectral.cell_scales(cells, d_out, d_in).mul_(scale)
            scaled = (torch.cat(spectra).to(norms.dtype) * norms).to(dtype)  # rounded once
            coefficients.update(zip(members, scaled.split([c.shape[0] for c in spectra])))
        return [(tables[m.d_out], tables[m.d_in], coefficients[i]) for i, m in enumerate(modules)]

    def rows(self, core: Core) -> tuple[Tensor, Tensor, Tensor]:
        """``(P, Q, c_eff)``: the cosine rows at this layer's cells from a fixed-cell core's tables, or a relaxed
        core's rows as they are."""
        P, Q, c = core
        if P.dim() == 1:
            P, Q = spectral.cos_rows_of(P, self.locations[0]), spectral.cos_rows_of(Q, self.locations[1])
        return P, Q, c

    @torch.no_grad()
    def diagnostics(self) -> dict[str, Any]:
        """Distinct cells in use and ``||dW||_F`` (Parseval: the norm of the coalesced coefficients)."""
        flat = self.locations[0] * self.d_in + self.locations[1]
        cells, inverse = torch.unique(flat, return_inverse=True)
        summed = torch.zeros(cells.numel(), dtype=torch.float64, device=flat.device).index_add_(
            0, inverse, self.spectrum.double()
        )
        return {"distinct_locations": cells.numel(), "delta_norm": abs(self.config.scale) * float(summed.norm())}
