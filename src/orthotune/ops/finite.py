"""Whether tensors are finite, in one fused reduction (``x * 0`` is 0 for every finite ``x`` and NaN otherwise,
so the reduction cannot overflow, even in float16)."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of every tensor is finite: one fused reduction per device, one sync each."""
    if not tensors:
        return True
    norms = torch._foreach_norm(torch._foreach_mul(tensors, 0.0))
    by_device: dict[torch.device, list[Tensor]] = {}
    for n in norms:
        by_device.setdefault(n.device, []).append(n)
    return all(bool(torch.isfinite(torch.stack(group).float()).all()) for group in by_device.values())
