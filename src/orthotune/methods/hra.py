"""HRA (Yuan et al., NeurIPS 2024, arXiv:2405.17484) as a LOFT preset: the full support and a product
of ``r`` Householder reflections, ``R = H_1 ... H_r``, applied in compact WY form ``x + U M U^T x``
(never the d x d matrix peft 0.21 builds every step).

Parameters (``hra_u``'s layout, (d_in, r)), initialisation (reflections in equal pairs) and
``apply_GS`` are peft's. :func:`orthogonality_loss` is the paper's regulariser on the reflection
planes, to add to the training loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..ops.householder import orthogonality_penalty
from .config import AdapterConfig, check_positive_int
from .loft.rotation import SupportRotation
from .loft.supports import FullSupport
from .loft.transforms import Householder, Transform


@dataclass
class HRAConfig(AdapterConfig):
    """HRA, named as in peft: ``d_in * r`` parameters per layer."""

    method = "hra"
    patterns = {"rank_pattern": "r"}

    r: int = field(default=8, metadata={"help": "Number of Householder reflections (even, to start at the identity)."})
    apply_GS: bool = field(default=False, metadata={"help": "Orthonormalise the reflection vectors (Gram-Schmidt)."})
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Module name (regex, matched on the name or a dotted suffix) -> r there (no peft equivalent)."},
    )

    def validate(self) -> None:
        check_positive_int("r", self.r)
        if self.init_identity and self.apply_GS:
            raise ValueError(
                "apply_GS=True cannot start at the identity: I - 2 Q Q^T with orthonormal Q is a reflection; "
                "pass init_identity=False with apply_GS=True"
            )
        if self.init_identity and self.r % 2:
            raise ValueError(
                f"HRA r={self.r} is odd: the identity start pairs equal reflections, so use an even r "
                "(or init_identity=False)"
            )


class HRA(SupportRotation):
    """A chain of reflections on the input, as one low-rank core per step."""

    config_class = HRAConfig

    @staticmethod
    def build(config: HRAConfig, d_in: int, d_out: int, weight: Tensor, like: Tensor) -> tuple[FullSupport, Transform]:
        return FullSupport(d_in), Householder(d_in, config.r, like, gram_schmidt=config.apply_GS)

    @classmethod
    def check_layer(cls, config: HRAConfig, d_in: int, d_out: int, name: str) -> None:
        Householder.check(d_in, config.r, config.apply_GS, name)


def orthogonality_loss(model: torch.nn.Module, adapter_name: str | None = None) -> Tensor:
    """HRA's regulariser summed over layers: ``sum_l ||I - Ũ_l^T Ũ_l||_F^2`` (``Ũ`` unit columns).

    Add ``weight * orthogonality_loss(model)`` to the loss (the HRA paper's lambda); zero when every
    layer's reflection planes are mutually orthogonal. ``model`` is an OrthoModel.
    """
    name = adapter_name or model.active_adapter
    terms = [
        orthogonality_penalty(layer.adapters[name].transform.u)
        for _, layer in model.adapter_layers()
        if isinstance(layer.adapters[name] if name in layer.adapters else None, HRA)
    ]
    if not terms:
        raise ValueError(f"adapter {name!r} has no HRA layers")
    return torch.stack(terms).sum()
