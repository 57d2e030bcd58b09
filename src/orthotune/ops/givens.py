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

Applied to activations layer by layer, that is ``L`` memory-bound passes whose inputs autograd keeps
(measured on an H100: 4x LoRA's step and 30 GiB). :func:`compact` regroups the same product: with
``B = 2^b`` dividing ``d``, layers ``0..b-1`` act inside contiguous ``B``-blocks (a block-diagonal
matrix) and layers ``b..L-1`` only touch the coordinates ``0, B, 2B, ...`` (an ``m x m`` matrix,
``m = d / B``), both formed once per step from the angles: one batched matmul and one small one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .cayley import apply_blocks


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


def compact_block(dim: int, max_block: int = 64, max_high: int = 512, dense_up_to: int = 256) -> int:
    """The block size ``B`` of :func:`compact` for ``dim``: the largest power of two dividing it, at
    most ``max_block``; 0 (apply layer by layer) when the dense ``m x m`` part (``m = dim / B``) would
    exceed ``max_high`` (LLM widths such as 2048, 5632, 11008, 14336 stay well below it)."""
    block = min(dim & -dim, max_block)
    return block if dim // block <= max_high or dim <= dense_up_to else 0


def compact(C: Tensor, S: Tensor, partner: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """``(blocks, high)``: the product of :func:`apply_rows` as ``z -> z_k @ blocks[k]`` on each
    ``B``-chunk (``blocks`` (..., d/B, B, B)) followed by ``z[idx] -> z[idx] @ high`` on the
    coordinates ``idx = 0, B, 2B, ...`` (``high`` (..., m, m)). ``C``, ``S``: (..., L, d)."""
    lead, (layers, dim) = C.shape[:-2], C.shape[-2:]
    b = block.bit_length() - 1
    n = dim // block
    eye = torch.eye(block, dtype=C.dtype, device=C.device)
    Z = eye.repeat(1, n).expand(*lead, block, dim)  # row j = e_j in every chunk
    for l in range(min(b, layers)):
        Z = C[..., l, None, :] * Z + S[..., l, None, :] * Z.index_select(-1, partner[l])
    blocks = Z.reshape(*lead, block, n, block).transpose(-3, -2)
    idx = torch.arange(0, dim, block, device=C.device)
    high = torch.eye(n, dtype=C.dtype, device=C.device).expand(*lead, n, n)
    for l in range(b, layers):
        high = C[..., l, None, idx] * high + S[..., l, None, idx] * high.index_select(-1, partner[l, idx] // block)
    return blocks, high


def apply_compact(z: Tensor, blocks: Tensor, high: Tensor, idx: Tensor, transpose: bool = False) -> Tensor:
    """:func:`apply_rows` from :func:`compact`'s factors: ``z T^T``, or ``z T`` with ``transpose``.
    ``idx`` holds the coordinates ``0, B, 2B, ...`` that ``high`` acts on (kept by the caller)."""
    if transpose:
        if high.shape[-1] > 1:
            z = z.index_copy(-1, idx, z.index_select(-1, idx) @ high.mT)
        return apply_blocks(z, blocks)
    z = apply_blocks(z, blocks, transpose=True)
    if high.shape[-1] > 1:
        z = z.index_copy(-1, idx, z.index_select(-1, idx) @ high)
    return z
