"""GOFT (Ma et al., ICML 2024, arXiv:2404.04316) as a LOFT preset: the full support and ``d_in - 1``
Givens rotations in ``ceil(log2 d_in)`` parallel layers (:mod:`orthotune.ops.givens`).

The strictly orthogonal GOFT; the paper's quasi-orthogonal qGOFT (free norms and angles under a
soft penalty) is not included. peft has no GOFT: tests compare with a dense float64 product.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .config import AdapterConfig
from .loft.rotation import SupportRotation, FoldOption
from .loft.supports import FullSupport
from .loft.transforms import Givens, Transform


@dataclass
class GOFTConfig(FoldOption, AdapterConfig):
    """GOFT: ``d_in - 1`` angles per layer, no hyperparameters beyond the targets."""

    method = "goft"


class GOFT(SupportRotation):
    """A product of Givens rotations on the input: one gather and two multiply-adds per layer."""

    config_class = GOFTConfig

    @staticmethod
    def build(config: GOFTConfig, d_in: int, d_out: int, weight: Tensor, like: Tensor) -> tuple[FullSupport, Transform]:
        return FullSupport(d_in), Givens(d_in, like)

    @classmethod
    def check_layer(cls, config: GOFTConfig, d_in: int, d_out: int, name: str) -> None:
        Givens.check(d_in, name)
