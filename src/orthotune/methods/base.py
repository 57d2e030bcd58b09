"""What a method is: one adapter on one frozen weight, its parameters and its math, nothing else.

The shared wrapper (:mod:`orthotune.layer`) owns adapter names, activity, merge state, dtypes and
devices; a method only answers three questions:

* ``forward(x, base)``: the adapted layer on activations, given ``base`` (the frozen layer, or the
  previously composed adapters, without bias). Rotations call ``base(R x)``; additive methods
  return ``base(x) + delta(x)``.
* ``merged_weight(W)`` / ``unmerged_weight(W)``: the weight map ``W -> W'`` (float32, W of shape
  (d_out, d_in)) and its inverse, so that ``forward(x, lambda z: z @ W.T) == x @ merged_weight(W).T``.
* identity at init (``init_identity=True``) and a perturbed start otherwise.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from ..config import AdapterConfig

Base = Callable[[Tensor], Tensor]


class AdapterMethod(nn.Module):
    """Base class of every method module; subclasses implement the three answers above."""

    config_class: ClassVar[type[AdapterConfig]]
    #: True for methods whose weight map is multiplicative (rotations, scales): unmerging inverts it.
    multiplicative: ClassVar[bool] = False
    #: True if the method can run on activations of a Linear layer; else the layer merges per step.
    activation_path: ClassVar[bool] = True

    def __init__(self, config: AdapterConfig, d_in: int, d_out: int, weight: Tensor) -> None:
        super().__init__()
        self.config = config
        self.d_in = d_in
        self.d_out = d_out

    @classmethod
    def check_layer(cls, config: AdapterConfig, d_in: int, d_out: int, name: str) -> None:
        """Raise ValueError if ``config`` cannot adapt a (d_out x d_in) layer called ``name``."""

    def forward(self, x: Tensor, base: Base) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def merged_weight(self, W: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def unmerged_weight(self, W: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def diagnostics(self) -> dict[str, Any]:
        """Per-layer numbers for `inspect` (orthogonality error, angles); empty by default."""
        return {}

    def rotation(self) -> Tensor | None:
        """The dense input-side rotation R (d_in x d_in) for orthogonal methods, else None (tests, inspect)."""
        return None

    def _param_like(self, *shape: int, weight: Tensor) -> Tensor:
        """An empty float tensor on the base weight's device, in the adapter dtype."""
        dtype = torch.float32 if self.config.autocast_adapter_dtype else weight.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        return torch.empty(*shape, dtype=dtype, device=weight.device)


def cast_to(x: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Cast small adapter tensors to the activations' dtype (activation-sized work runs in x's dtype)."""
    return tuple(t if t.dtype == x.dtype else t.to(x.dtype) for t in tensors)
