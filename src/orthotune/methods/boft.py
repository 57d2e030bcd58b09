"""BOFT (Liu et al., ICLR 2024, arXiv:2311.06243) as a LOFT preset: the full support and a butterfly
product of block-diagonal exact Cayley rotations, ``R = F_0 ... F_{m-1}``, plus peft's trainable
output scale ``s``: ``W = diag(s) W0 R``.

Parameters (``boft_R`` as (m, n_blocks, b, b) full blocks made skew, ``boft_s`` as (d_out, 1)), the
block size / number / factor conventions and the constraints are peft 0.21's. ``R`` is
block-diagonal in contiguous ``b 2^(m-1)`` blocks, formed once per step from the factors for all
layers, so the activations meet one batched block contraction (spans up to 256; larger ones apply
the factors one by one: :class:`orthotune.methods.loft.transforms.Butterfly`); peft builds dense d x d
permutations and rotation every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import Base, Core, cast_to
from .config import AdapterConfig, check_dropout, check_positive_int
from .loft.rotation import SupportRotation, FoldOption
from .loft.supports import FullSupport
from .loft.transforms import Butterfly, Transform


@dataclass
class BOFTConfig(FoldOption, AdapterConfig):
    """BOFT, named as in peft: ``m * n_blocks * b^2 + d_out`` parameters per layer."""

    method = "boft"

    boft_block_size: int = field(default=4, metadata={"help": "Block size b; set exactly one of boft_block_size and boft_block_num."})
    boft_block_num: int = field(default=0, metadata={"help": "Number of blocks; set exactly one of the two."})
    boft_n_butterfly_factor: int = field(default=1, metadata={"help": "Butterfly factors m (1: block-diagonal OFT with exact Cayley)."})
    boft_dropout: float = field(default=0.0, metadata={"help": "Multiplicative dropout of blocks in training."})

    def validate(self) -> None:
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ValueError(
                f"set exactly one of boft_block_size and boft_block_num, got {self.boft_block_size} and "
                f"{self.boft_block_num}; e.g. BOFTConfig(boft_block_size=4)"
            )
        check_positive_int("boft_block_size or boft_block_num", self.boft_block_size or self.boft_block_num)
        check_positive_int("boft_n_butterfly_factor", self.boft_n_butterfly_factor)
        check_dropout("boft_dropout", self.boft_dropout)

    def block(self, d_in: int) -> int:
        return self.boft_block_size or d_in // self.boft_block_num


class BOFT(SupportRotation):
    """Butterfly rotation of the input, then peft's per-output scale."""

    config_class = BOFTConfig

    def __init__(self, config: BOFTConfig, d_in: int, d_out: int, weight: Tensor) -> None:
        super().__init__(config, d_in, d_out, weight)
        self.boft_s = nn.Parameter(self._param_like(d_out, 1, weight=weight))
        with torch.no_grad():
            if config.init_identity:
                self.boft_s.fill_(1.0)
            else:
                self.boft_s.normal_(1.0, 0.1)

    @staticmethod
    def build(config: BOFTConfig, d_in: int, d_out: int, weight: Tensor, like: Tensor) -> tuple[FullSupport, Transform]:
        transform = Butterfly(d_in, config.block(d_in), config.boft_n_butterfly_factor, like, layout="square",
                              dropout=config.boft_dropout)
        return FullSupport(d_in), transform

    @classmethod
    def check_layer(cls, config: BOFTConfig, d_in: int, d_out: int, name: str) -> None:
        if config.boft_block_num and d_in % config.boft_block_num:
            raise ValueError(f"BOFT boft_block_num={config.boft_block_num} does not divide d_in={d_in} of {name!r}")
        Butterfly.check(d_in, config.block(d_in), config.boft_n_butterfly_factor, name)

    def forward(self, x: Tensor, base: Base, core: Core) -> Tensor:
        (s,) = cast_to(x, self.boft_s)
        return super().forward(x, Base(lambda z: base(z) * s.squeeze(-1), base.matmul_dtype), core)

    def merged_weight(self, W: Tensor) -> Tensor:
        return self.boft_s.to(W.dtype) * super().merged_weight(W)

    def unmerged_weight(self, W: Tensor) -> Tensor:
        return super().unmerged_weight(W / self.boft_s.to(W.dtype))
