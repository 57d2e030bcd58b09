"""Butterfly products of block-diagonal rotations (BOFT, Liu et al., ICLR 2024, arXiv:2311.06243).

A butterfly factor is a block-diagonal rotation ``D_i`` in a permuted coordinate basis,
``F_i = P_i D_i P_i^T``, and the rotation is ``R = F_0 F_1 ... F_{m-1}``. (peft multiplies row
vectors from the right by its ``B_{m-1} ... B_0``, which is this ``R^T``.) The permutations are
index gathers: no dense permutation matrix is formed, and every factor is one batched contraction
over its blocks.

``perm`` holds peft's ``block_butterfly_perm`` indices (``P[i, perm[i]] = 1``), so ``z P = z[inv]``
and ``z P^T = z[perm]`` for row vectors ``z``.

Factor ``i`` (its permutation and its blocks) acts inside aligned chunks of ``b 2^i`` coordinates, so
``R`` itself is block-diagonal with contiguous blocks of the span ``s = b 2^(m-1)``: :func:`compose`
forms those blocks once per step, and the activations then meet one ``s``-block contraction instead
of ``m`` rounds of gather, ``b``-block contraction, gather (:func:`apply_rows`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cayley import apply_blocks


def butterfly_permutation(n: int, block_num: int, half_block: int) -> Tensor:
    """peft's ``block_butterfly_perm(n, block_num, half_block)``, vectorised.

    Inside each of ``block_num`` chunks, groups of ``half_block`` consecutive indices are reordered
    even-numbered groups first, then odd-numbered ones.
    """
    if block_num * half_block * 2 > n:
        raise ValueError(f"invalid butterfly: {block_num} blocks of size {2 * half_block} exceed dimension {n}")
    chunk = n // block_num
    groups = torch.arange(chunk // half_block)
    order = torch.cat([groups[0::2], groups[1::2]])
    inside = (order[:, None] * half_block + torch.arange(half_block)).flatten()
    return (torch.arange(n // chunk)[:, None] * chunk + inside).flatten()


def butterfly_permutations(dim: int, block_size: int, factors: int) -> Tensor:
    """(factors, dim) permutations of a BOFT rotation with ``factors`` butterfly factors; factor 0
    is the identity (a plain block-diagonal OFT factor)."""
    if factors == 1:
        return torch.arange(dim)[None]
    block_num = dim // block_size
    return torch.stack(
        [butterfly_permutation(dim, block_num // 2**i, block_size // 2) for i in range(factors)]
    )


def apply_rows(z: Tensor, blocks: Tensor, perms: Tensor, inverse_perms: Tensor, transpose: bool = False) -> Tensor:
    """``z R^T`` (or ``z R`` with ``transpose``) for ``R = F_0 ... F_{m-1}``, ``F_i = P_i D_i P_i^T``.

    ``blocks`` (m, n, b, b) holds the diagonal blocks of each ``D_i``.
    """
    m = blocks.shape[0]
    order = range(m) if transpose else reversed(range(m))
    for i in order:
        z = apply_blocks(z.index_select(-1, inverse_perms[i]), blocks[i], transpose=transpose).index_select(-1, perms[i])
    return z


def block_span(block_size: int, factors: int) -> int:
    """Width ``s = b 2^(m-1)`` of the contiguous diagonal blocks of ``R = F_0 ... F_{m-1}`` (``b`` for m = 1)."""
    return block_size * 2 ** (factors - 1)


def compose(blocks: Tensor, perms: Tensor, span: int) -> Tensor:
    """The (..., dim/s, s, s) diagonal blocks of ``R = F_0 ... F_{m-1}`` from the factors' blocks (..., m, n, b, b).

    Every ``F_i = P_i D_i P_i^T`` keeps each aligned ``s``-chunk to itself, with the same chunk-local
    permutation ``perms[i, :s]`` in every chunk, so ``R``'s block of chunk ``c`` is the product of the
    factors' chunk-local ``s x s`` matrices ``D_i^c[p_i][:, p_i]``. Then
    ``cayley.apply_blocks(z, compose(...), transpose)`` equals :func:`apply_rows` in one contraction;
    forming the blocks costs ``(dim/s) m s^3``, independent of the activations.
    """
    *lead, m, n, b, _ = blocks.shape
    k = span // b  # b-blocks per chunk
    chunks = blocks.reshape(*lead, m, n // k, k, b, b)
    eye = torch.eye(k, dtype=blocks.dtype, device=blocks.device)
    D = torch.einsum("...kab,kl->...kalb", chunks, eye).reshape(*lead, m, n // k, span, span)

    def factor(i: int) -> Tensor:  # F_i's chunk-local s x s matrices
        p = perms[i, :span]
        return D[..., i, :, :, :].index_select(-2, p).index_select(-1, p)

    R = factor(0)
    for i in range(1, m):
        R = R @ factor(i)
    return R
