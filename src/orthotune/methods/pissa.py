"""PiSSA (Meng, Wang, Zhang; 2024, arXiv:2404.02948): LoRA started on the principal singular directions.

With ``W0 = U S V^T``: ``A0 = sqrt(S_r / s) V_r^T``, ``B0 = U_r sqrt(S_r / s)`` (``s`` the LoRA
scale, so ``s B0 A0`` is the rank-r principal part of ``W0``), exactly as peft 0.21's
``init_lora_weights="pissa"`` (full SVD) and ``"pissa_niter_K"`` (``torch.svd_lowrank``, K
subspace iterations). The paper trains ``A, B`` on top of the residual ``W0 - s B0 A0``; by default
the base weight is never modified: ``A0, B0`` are kept as buffers and the layer computes

    ``y = W0 x + s (B A - B0 A0) x = W0 x + s [B, B - B0] [A - A0; A0] x``,

which is the same model (``(W0 - s B0 A0) + s B A``), is exactly the identity at step 0 (both
differences are exact zeros), keeps ``disable_adapter`` returning the true base model and makes an
adapter folder self-contained. The difference form is one rank-2r pass like the plain
``[B, -B0][A; A0]``, but it never subtracts two large principal terms, so no precision is lost
to cancellation in bf16/fp16 activations.

``residual_base=True`` is peft's own form: the layer rewrites its frozen weight once to the residual
``W0 - s B0 A0`` and the adapter is a plain rank-r LoRA ``s B A`` on it (LoRA's speed; the difference form
costs a rank-2r pass). ``A0, B0`` stay saved, so a folder still loads onto an untouched base (the residual
is reapplied there); the layer adds ``s B0 A0 x`` back whenever the adapter is off, and ``unload`` /
``delete_adapter`` write ``W0`` back (see :mod:`orthotune.layer.residual`).

``factorization="qr"`` is OLoRA (peft's ``init_lora_weights="olora"``): the same residual start from
``W0 = Q R`` with ``A0 = R[:r]``, ``B0 = Q[:, :r]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import AdapterMethod, Base, Core, cast_to, each
from .config import check_choice
from .lora import LoRA, LoRAConfig


@dataclass
class PiSSAConfig(LoRAConfig):
    """LoRA's hyperparameters (peft names) plus the SVD: ``r * (d_in + d_out)`` parameters per layer."""

    method = "pissa"

    svd_niter: int | None = field(
        default=None,
        metadata={
            "help": "None: exact SVD of W0 (peft's init_lora_weights='pissa'). K >= 0: randomized torch.svd_lowrank "
            "with K subspace iterations (peft's 'pissa_niter_K'), much faster on large layers."
        },
    )

    factorization: str = field(
        default="svd",
        metadata={
            "help": "'svd': PiSSA's principal singular factors. 'qr': OLoRA (Büyükakyüz 2024, arXiv:2406.01775, peft's "
            "init_lora_weights='olora'): A0 = R[:r], B0 = Q[:, :r] of W0 = Q R, the same residual start."
        },
    )

    residual_base: bool = field(
        default=False,
        metadata={
            "help": "True: peft's PiSSA form. The frozen base weight is rewritten in place, once at injection, to the "
            "residual W0 - s B0 A0 (computed in float64, rounded once to the base dtype, so a bf16 base carries one "
            "bf16 rounding of the residual), and the adapter computes plain rank-r LoRA s B A on it: LoRA's speed, "
            "where the default difference form runs rank 2r. disable_adapter() and inactive adapters add s B0 A0 x "
            "back (the original W0 to that rounding); unload() and delete_adapter() write W0 back into the weight. "
            "The layer cannot carry any other adapter. save_pretrained stores A0, B0 with A, B, and loading reapplies "
            "the residual to an untouched base; the base weight itself is never saved. Linear and GPT-2 Conv1D "
            "layers in float weights only. False (default): W0 is never modified, y = W0 x + s (B A - B0 A0) x."
        },
    )

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.residual_base, bool):
            raise ValueError(f"residual_base must be True or False, got {self.residual_base!r}")
        check_choice("factorization", self.factorization, ("svd", "qr"))
        if self.factorization == "qr" and self.svd_niter is not None:
            raise ValueError("svd_niter applies to factorization='svd'; leave it unset with factorization='qr' (OLoRA)")
        if self.svd_niter is not None and (isinstance(self.svd_niter, bool) or not isinstance(self.svd_niter, int) or self.svd_niter < 0):
            raise ValueError(f"svd_niter must be None (exact SVD) or an integer >= 0, got {self.svd_niter!r}")


def principal_factors(
    weight: Tensor, r: int, scaling: float, niter: int | None = None, factorization: str = "svd"
) -> tuple[Tensor, Tensor]:
    """``(A0, B0)`` in float32 with ``scaling * B0 @ A0`` the rank-r principal part of ``weight`` (d_out, d_in);
    with ``factorization="qr"`` OLoRA's ``(R[:r], Q[:, :r])``, unscaled, exactly as peft's ``olora_init``."""
    W = weight.float()
    if factorization == "qr":
        Q, R = torch.linalg.qr(W)
        return R[:r].contiguous(), Q[:, :r].contiguous()
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
        Vh = V.T
    root = torch.sqrt(S / scaling)
    # contiguous, as a loaded folder's tensors are (LAPACK's factors are transposed views, which a product keeps):
    # parameters made from them then run the same kernels as reloaded ones, so the outputs are bit-identical
    return (root[:, None] * Vh).contiguous(), (U * root[None, :]).contiguous()


class PiSSA(AdapterMethod):
    """Additive update ``s (B A - B0 A0)`` (``s B A`` on a residual base), ``A, B`` trained from ``A0, B0``."""

    config_class = PiSSAConfig

    def __init__(self, config: PiSSAConfig, d_in: int, d_out: int, weight: Tensor) -> None:
        super().__init__(config, d_in, d_out, weight)
        self.scaling = config.scaling
        #: the layer's weight holds W0 - s B0 A0 and this adapter is plain LoRA on it (``residual_base``)
        self.residual = config.residual_base
        A0, B0 = principal_factors(weight, config.r, self.scaling, config.svd_niter, config.factorization)
        like = self._param_like(0, weight=weight)
        self.register_buffer("lora_A0", A0.to(like))
        self.register_buffer("lora_B0", B0.to(like))
        self.lora_A = nn.Parameter(torch.empty_like(self.lora_A0))
        self.lora_B = nn.Parameter(torch.empty_like(self.lora_B0))
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.reset_parameters()

    @classmethod
    def check_layer(cls, config: PiSSAConfig, d_in: int, d_out: int, name: str) -> None:
        if config.r > min(d_in, d_out):
            raise ValueError(
                f"PiSSA r={config.r} exceeds min(d_in, d_out)={min(d_in, d_out)} of {name!r}: W0 has no more "
                "singular directions; lower r"
            )

    def reset_parameters(self) -> None:
        """``A = A0``, ``B = B0`` (the identity); a perturbed ``B`` when ``init_identity`` is False."""
        with torch.no_grad():
            self.lora_A.copy_(self.lora_A0)
            self.lora_B.copy_(self.lora_B0)
            if not self.config.init_identity:
                self.lora_B.add_(torch.randn_like(self.lora_B), alpha=0.1)

    def difference_factors(self) -> tuple[Tensor, Tensor]:
        """``(left, right)`` with ``B A - B0 A0 = right @ left``: ``[A - A0; A0]`` and ``[B, B - B0]``
        (the update on the untouched W0, in either form: what a plain LoRA export stores)."""
        left = torch.cat([self.lora_A - self.lora_A0, self.lora_A0], dim=0)
        right = torch.cat([self.lora_B, self.lora_B - self.lora_B0], dim=1)
        return left, right

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(left, right)`` of the update on the layer's weight: ``(A, B)`` on the residual base, else
        :meth:`difference_factors`."""
        return (self.lora_A, self.lora_B) if self.residual else self.difference_factors()

    def principal(self) -> tuple[Tensor, Tensor, float]:
        """``(A0, B0, s)``: the principal part ``s B0 A0`` that ``residual_base`` keeps in the layer's weight."""
        return self.lora_A0, self.lora_B0, self.scaling

    def core_key(self) -> tuple | None:
        """On the residual base the cores are LoRA's, batched as LoRA batches them; else per layer."""
        if not self.residual:
            return None
        return ("residual", self.config.r, self.d_in, self.d_out, self.scaling, self.lora_A.dtype, self.lora_A.device)

    def delta_weight(self) -> Tensor:
        left, right = self.factors()
        dtype = torch.promote_types(left.dtype, torch.float32)  # float32 at least (float64 stays)
        return self.scaling * (right.to(dtype) @ left.to(dtype))

    @classmethod
    def cores(cls, modules: list[PiSSA], dtype: torch.dtype | None = None) -> list[Core]:
        """``(A, s B)`` per layer as LoRA's on the residual base (one :meth:`core_key` group is all of one
        form), else ``(left, right)`` of :meth:`difference_factors`."""
        if modules[0].residual:
            return LoRA.cores(modules, dtype)
        return each(modules, dtype, lambda m: m.difference_factors())

    def forward(self, x: Tensor, base: Base, core: Core) -> Tensor:
        if self.residual:  # peft's PiSSA: plain LoRA on W0 - s B0 A0 (its cores are LoRA's, see cores())
            return LoRA.forward(self, x, base, core)
        left, right = core
        xd = self.dropout(x)
        out = base(x) + self.scaling * ((xd @ left.T) @ right.T)
        if self.training and isinstance(self.dropout, nn.Dropout):
            # peft drops the input of the whole B A path, whose principal part s B0 A0 we keep in W0
            A0, B0 = cast_to(x, self.lora_A0, self.lora_B0)
            out = out + self.scaling * (((xd - x) @ A0.T) @ B0.T)
        return out

    def merged_weight(self, W: Tensor) -> Tensor:
        return W + self.delta_weight().to(W.dtype)

    def unmerged_weight(self, W: Tensor) -> Tensor:
        return W - self.delta_weight().to(W.dtype)

    def diagnostics(self) -> dict[str, float]:
        """How far training moved the factors from the principal start (relative Frobenius norms)."""
        with torch.no_grad():
            return {
                "A_shift": float((self.lora_A - self.lora_A0).norm() / self.lora_A0.norm().clamp_min(1e-30)),
                "B_shift": float((self.lora_B - self.lora_B0).norm() / self.lora_B0.norm().clamp_min(1e-30)),
            }
