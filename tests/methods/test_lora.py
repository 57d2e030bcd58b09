"""LoRA's per-step cores: the parameters themselves where nothing needs computing, one batched call otherwise."""

from __future__ import annotations

import pytest
import torch

from orthotune.methods.lora import LoRA, LoRAConfig


def _modules(alpha: int) -> list[LoRA]:
    torch.manual_seed(0)
    return [LoRA(LoRAConfig(r=2, lora_alpha=alpha, init_identity=False), 8, 6, torch.zeros(6, 8)) for _ in range(3)]


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_cores_in_the_parameters_dtype_are_the_parameters(dtype: torch.dtype | None) -> None:
    """A quantised layer's float32 activations (s = 1): nothing is copied or held beyond the parameters, and the
    gradients reach the parameters in each layer's own backward."""
    modules = _modules(alpha=2)
    cores = LoRA.cores(modules, dtype)
    assert all(A is m.lora_A and B is m.lora_B for m, (A, B) in zip(modules, cores))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_or_cast_cores_fold_the_scale_into_B(dtype: torch.dtype) -> None:
    modules = _modules(alpha=4)  # s = 2
    cores = LoRA.cores(modules, dtype)
    for m, (A, B) in zip(modules, cores):
        assert A.dtype == B.dtype == dtype
        assert torch.equal(A, m.lora_A.to(dtype)) and torch.equal(B, (2 * m.lora_B).to(dtype))
        assert (A is m.lora_A) == (dtype == torch.float32)  # at the parameters' dtype only B is computed
    sum((A.float().sum() + B.float().sum()) for A, B in cores).backward()
    assert all(torch.equal(m.lora_B.grad, torch.full_like(m.lora_B, 2.0)) for m in modules)
