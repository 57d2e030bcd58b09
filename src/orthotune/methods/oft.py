"""OFT (Qiu et al., NeurIPS 2023; OFTv2, arXiv:2506.19847) as a LOFT preset: the full support and a
block-diagonal Cayley transform, ``R = blockdiag(cayley(Q_1), ..., cayley(Q_n))``.

Parameters, their layout (``(n_blocks, b(b-1)/2)`` upper-triangular entries) and the ``r`` /
``oft_block_size`` convention are peft 0.21's. Unlike peft, the exact Cayley transform is the
default (``use_cayley_neumann=False``): exactly orthogonal. peft's Neumann branch approximates the
transpose of its exact branch; orthotune's Neumann option approximates its own exact rotation, so
a peft Neumann adapter maps across with its parameters negated (``docs/loft.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .config import AdapterConfig, check_dropout, check_positive_int
from .loft.rotation import SupportRotation, FoldOption
from .loft.supports import FullSupport
from .loft.transforms import BlockCayley, Transform


@dataclass
class OFTConfig(FoldOption, AdapterConfig):
    """OFT, named as in peft: ``n_blocks * b(b-1)/2`` parameters per layer (``b(b-1)/2`` with block_share)."""

    method = "oft"

    r: int = field(default=0, metadata={"help": "Number of blocks; set exactly one of r and oft_block_size (r * block = d_in)."})
    oft_block_size: int = field(default=32, metadata={"help": "Block size b; set exactly one of r and oft_block_size."})
    use_cayley_neumann: bool = field(
        default=False,
        metadata={"help": "Approximate the Cayley inverse with a Neumann series (faster, only approximately orthogonal)."},
    )
    num_cayley_neumann_terms: int = field(default=5, metadata={"help": "Terms of the Neumann series."})
    block_share: bool = field(default=False, metadata={"help": "One block shared by all (b(b-1)/2 parameters)."})
    module_dropout: float = field(
        default=0.0,
        metadata={"help": "Multiplicative dropout: in training, this share of the blocks is replaced by the identity "
                  "(peft 0.21 accepts the field but never applies it)."},
    )

    def validate(self) -> None:
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ValueError(
                f"set exactly one of r (number of blocks) and oft_block_size, got r={self.r}, "
                f"oft_block_size={self.oft_block_size}; e.g. OFTConfig(r=0, oft_block_size=32)"
            )
        check_positive_int("r or oft_block_size", self.r or self.oft_block_size)
        check_positive_int("num_cayley_neumann_terms", self.num_cayley_neumann_terms)
        check_dropout("module_dropout", self.module_dropout)

    def block(self, d_in: int) -> int:
        return self.oft_block_size or d_in // self.r


class OFT(SupportRotation):
    """Block-diagonal Cayley rotation of the input, applied as one batched contraction over blocks."""

    config_class = OFTConfig

    @staticmethod
    def build(config: OFTConfig, d_in: int, d_out: int, weight: Tensor, like: Tensor) -> tuple[FullSupport, Transform]:
        terms = config.num_cayley_neumann_terms if config.use_cayley_neumann else None
        transform = BlockCayley(d_in, config.block(d_in), like, neumann_terms=terms, share=config.block_share,
                                dropout=config.module_dropout)
        return FullSupport(d_in), transform

    @classmethod
    def check_layer(cls, config: OFTConfig, d_in: int, d_out: int, name: str) -> None:
        if config.r and d_in % config.r:
            raise ValueError(f"OFT r={config.r} blocks do not divide d_in={d_in} of {name!r}; use a divisor of {d_in}")
        BlockCayley.check(d_in, config.block(d_in), name)
