"""Products of Givens rotations in parallel layers (GOFT, Ma et al., ICML 2024, arXiv:2404.04316).

GOFT composes ``d - 1`` Givens rotations, arranged so that each layer's rotations act on disjoint
coordinate pairs and the whole product takes ``ceil(log2 d)`` parallel steps. orthotune pairs
coordinates as a binary reduction tree: layer ``l`` rotates ``(i, i + 2^l)`` for every ``i``
divisible by ``2^(l+1)``. (The paper's exact pairing could not be read here; any tree of ``d - 1``
rotations has the same count and depth.)

A layer ``G`` rotates each pair ``(a, b)`` by its angle: ``(G v)_a = c v_a - s v_b``,
``(G v)_b = s v_a + c v_b``. The transform is ``T = G_{L-1} ... G_1 G_0`` (layer 0 acts first on a
column vector). On row vectors a layer is one gather and two multiply-adds:
``z' = C * z + S * z[..., partner]``, with ``C``, ``S`` (L, d) built once per step from the angles.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def tree_layout(dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(partner, angle_index, sign)``, each (L, dim): the tree pairing of ``dim`` coordinates.

    ``partner[l, i]`` is the coordinate ``i`` meets in layer ``l`` (itself if unpaired),
    ``angle_index[l, i]`` the rotation's index in the flat angle vector (``dim - 1`` for unpaired
    coordinates: the caller pads the angles with a zero there), ``sign`` is -1 for the first
    coordinate of a pair, +1 for the second, 0 if unpaired.
    """
    layers = max(1, math.ceil(math.log2(dim))) if dim > 1 else 0
    partner = torch.arange(dim).repeat(layers, 1)
    angle_index = torch.full((layers, dim), dim - 1, dtype=torch.long)
    sign = torch.zeros(layers, dim)
    k = 0
    for l in range(layers):
        step = 2**l
        a = torch.arange(0, dim - step, 2 * step)
        b = a + step
        idx = torch.arange(k, k + len(a))
        partner[l, a], partner[l, b] = b, a
        angle_index[l, a], angle_index[l, b] = idx, idx
        sign[l, a], sign[l, b] = -1.0, 1.0
        k += len(a)
    return partner, angle_index, sign


def coefficients(theta: Tensor, angle_index: Tensor, sign: Tensor) -> tuple[Tensor, Tensor]:
    """``(C, S)`` (..., L, dim) from the ``dim - 1`` angles (..., dim - 1): ``C = cos``, ``S = sign * sin``."""
    padded = torch.cat([theta, theta.new_zeros(*theta.shape[:-1], 1)], -1)
    flat = angle_index.flatten()
    shape = (*theta.shape[:-1], *angle_index.shape)
    cos = torch.cos(padded).index_select(-1, flat).view(shape)
    sin = torch.sin(padded).index_select(-1, flat).view(shape)
    return cos, sign.to(theta.dtype) * sin


def apply_rows(z: Tensor, C: Tensor, S: Tensor, partner: Tensor, transpose: bool = False) -> Tensor:
    """``z T^T`` (layer 0 first), or ``z T`` with ``transpose`` (last layer first, angles negated)."""
    layers = range(C.shape[0])
    if transpose:
        for l in reversed(layers):
            z = C[l] * z - S[l] * z.index_select(-1, partner[l])
    else:
        for l in layers:
            z = C[l] * z + S[l] * z.index_select(-1, partner[l])
    return z
