"""Merging in float64, rounded once: the merged weight is the exact ``merged_weight(W0)`` to half an ulp.

A float32 merge (``W0 R`` from a float32 core, e.g. HRA's compact WY ``M`` or GOFT's Givens layers)
carries several float32 roundings per entry; on peft's MLP test model (integer inputs up to 89,
pre-activations near 100) that error alone moved outputs by up to 2.4e-5, beyond peft's 1e-6 safe-merge
tolerance. Evaluating the adapter's cores and the map in float64 leaves only the one final rounding.
Only one layer's weight and one adapter's parameters exist in float64 at a time, and only while merging.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


@contextmanager
def in_float64(module: nn.Module) -> Iterator[None]:
    """Temporarily hold ``module``'s floating parameters and buffers in float64 (the same Parameter objects,
    so optimizers keep their references); the original tensors are put back bit for bit on exit."""
    saved: list[tuple[Tensor, Tensor]] = []
    try:
        with torch.no_grad():
            for t in (*module.parameters(), *module.buffers()):
                if t.is_floating_point() and t.dtype != torch.float64 and t.device.type != "meta":
                    saved.append((t, t.data))
                    t.data = t.data.to(torch.float64)
        yield
    finally:
        for t, original in saved:
            t.data = original


def merge_dtype(weight: Tensor) -> torch.dtype:
    """The dtype merges compute in: float64 (MPS has none, so float32 there)."""
    return torch.float32 if weight.device.type == "mps" else torch.float64
