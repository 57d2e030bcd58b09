"""LoRA (Hu et al., 2021, arXiv:2106.09685): ``W = W0 + s B A``, ``s = alpha / r`` (or ``alpha / sqrt(r)``).

Same parameterisation and initialisation as peft 0.21 (``A`` Kaiming-uniform with a = sqrt(5),
``B`` zero), so peft LoRA adapters map across parameter for parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..ops import lowrank
from .base import AdapterMethod, Base, Core, split
from .config import AdapterConfig, check_dropout, check_finite_number, check_positive_int


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA hyperparameters, named as in peft: ``r * (d_in + d_out)`` parameters per layer."""

    method = "lora"
    patterns = {"rank_pattern": "r", "alpha_pattern": "lora_alpha"}

    r: int = field(default=8, metadata={"help": "Rank of the update B A."})
    lora_alpha: float = field(default=8.0, metadata={"help": "Scale numerator: s = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scale s = lora_alpha / sqrt(r)."})
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Module name (regex, matched on the name or a dotted suffix) -> r for that module (peft's)."},
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Module name (regex, as rank_pattern) -> lora_alpha for that module."}
    )

    def validate(self) -> None:
        check_positive_int("r", self.r)
        check_finite_number("lora_alpha", self.lora_alpha)
        check_dropout("lora_dropout", self.lora_dropout)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRA(AdapterMethod):
    """Additive low-rank update on activations: ``y = W0 x + s B (A dropout(x))``."""

    config_class = LoRAConfig

    def __init__(self, config: LoRAConfig, d_in: int, d_out: int, weight: Tensor) -> None:
        super().__init__(config, d_in, d_out, weight)
        self.lora_A = nn.Parameter(self._param_like(config.r, d_in, weight=weight))
        self.lora_B = nn.Parameter(self._param_like(d_out, config.r, weight=weight))
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.scaling = config.scaling
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if self.config.init_identity:
                nn.init.zeros_(self.lora_B)
            else:
                nn.init.normal_(self.lora_B, std=0.1)

    def delta_weight(self) -> Tensor:
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)  # float32 at least (float64 stays)
        return self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))

    def core_key(self) -> tuple:
        """LoRA layers of one shape and scale share one batched cast per step."""
        return (self.config.r, self.d_in, self.d_out, self.scaling, self.lora_A.dtype, self.lora_A.device)

    @classmethod
    def cores(cls, modules: list[LoRA], dtype: torch.dtype | None = None) -> list[Core]:
        """``(A, s B)`` per layer: the factors forward applies, the scale folded into ``B``. In the parameters' own
        dtype (a quantised layer's float32 activations) they are the parameters themselves where ``s = 1``: nothing
        copied or held all step, and each layer's backward hands its gradients straight to its parameters, as
        peft's layers do. A cast (16-bit activations) or a scale is one batched call for all layers."""
        s, own_dtype = modules[0].scaling, dtype is None or dtype == modules[0].lora_A.dtype
        if own_dtype and s == 1:
            return [(m.lora_A, m.lora_B) for m in modules]
        B = s * torch.stack([m.lora_B for m in modules])
        if own_dtype:
            return [(m.lora_A, b) for m, b in zip(modules, B.unbind(0))]
        return split((torch.stack([m.lora_A for m in modules]), B), dtype)

    def forward(self, x: Tensor, base: Base, core: Core) -> Tensor:
        A, B = core
        # dropout=0 is nn.Identity: skip the module call (host time is what these layers cost on a GPU)
        return lowrank.add_lowrank(base(x), x if self.config.lora_dropout == 0 else self.dropout(x), A, B)

    def merged_weight(self, W: Tensor) -> Tensor:
        return W + self.delta_weight().to(W.dtype)

    def unmerged_weight(self, W: Tensor) -> Tensor:
        return W - self.delta_weight().to(W.dtype)
