"""FourierFT (Gao et al., ICML 2024, arXiv:2405.03003): ``W = W0 + s * Re(iDFT2(C))``, as in peft 0.21.

``C`` holds n trainable coefficients at n random cells fixed by ``random_loc_seed`` (peft's draw:
the first n entries of a seeded permutation of the d_out*d_in cells), and ``iDFT2`` is
``torch.fft.ifft2`` (normalised by ``1/(d_out d_in)``). peft builds the dense spectrum and runs a
full 2-D inverse FFT on every forward; here the real part of the sparse inverse DFT is the rank-2n
product ``P^T diag([c, -c]) Q / (d_out d_in)`` of cosine and sine rows
(:func:`orthotune.ops.spectral.dft_factors`), applied to activations or formed once per call,
whichever costs fewer FLOPs. Same numbers, same parameters: peft adapters map across one to one.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..ops import spectral
from .config import AdapterConfig, check_choice, check_positive_int
from .spectral import COMPUTE, SparseSpectrum


@dataclass
class FourierFTConfig(AdapterConfig):
    """FourierFT hyperparameters, named as in peft: ``n_frequency`` trainable coefficients per layer."""

    method = "fourierft"
    patterns = {"n_frequency_pattern": "n_frequency"}

    n_frequency: int = field(default=1000, metadata={"help": "Number n of learnable Fourier coefficients per layer."})
    scaling: float = field(default=150.0, metadata={"help": "s: dW = s * Re(ifft2(C)) (peft: 100-150 RoBERTa, 300 LLaMA/ViT)."})
    random_loc_seed: int = field(default=777, metadata={"help": "Seed of the random cells (peft's draw, same for every layer)."})
    compute: str = field(
        default="auto",
        metadata={"help": "'lowrank' (rank-2n on activations), 'dense' (form dW once per call) or 'auto' (cheaper by FLOPs)."},
    )
    n_frequency_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Module name (regex, matched on the name or a dotted suffix) -> n_frequency there (peft's)."},
    )

    def validate(self) -> None:
        check_positive_int("n_frequency", self.n_frequency)
        check_choice("compute", self.compute, COMPUTE)
        if not math.isfinite(self.scaling):
            raise ValueError(f"scaling must be a finite number, got {self.scaling!r}")
        if isinstance(self.random_loc_seed, bool) or not isinstance(self.random_loc_seed, int):
            raise ValueError(f"random_loc_seed must be an integer, got {self.random_loc_seed!r}")


@functools.lru_cache(maxsize=64)
def fourier_locations(d_out: int, d_in: int, n: int, seed: int) -> Tensor:
    """peft's cells: ``randperm(d_out * d_in, seed)[:n]`` as (row, col), identical for layers of one shape."""
    flat = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // d_in, flat % d_in])


class FourierFT(SparseSpectrum):
    """Additive sparse-spectrum update: ``y = W0 x + s Re(iDFT2(C)) x``."""

    config_class = FourierFTConfig
    label = "FourierFT"
    perturbed_std = 1.0  # peft's default init (init_weights=False): standard normal; identity is its init_weights=True

    def __init__(self, config: FourierFTConfig, d_in: int, d_out: int, weight: Tensor) -> None:
        cells = fourier_locations(d_out, d_in, config.n_frequency, config.random_loc_seed)
        super().__init__(config, d_in, d_out, weight, cells.clone())

    def factors(self, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Cosine and sine rows, and ``[c, -c] s / (d_out d_in)``: ``Re(e^{i(a+b)}) = cos a cos b - sin a sin b``."""
        rows, cols = self.locations
        P, Q = spectral.dft_factors(rows, cols, (self.d_out, self.d_in), c.dtype)
        return P, Q, torch.cat([c, -c]) * (self.config.scaling / (self.d_out * self.d_in))
