"""Cayley transforms of batched skew-symmetric blocks, and rows through block-diagonal matrices.

Convention (column vectors, as everywhere in orthotune): ``cayley(Q) = (I + Q)(I - Q)^{-1}``, an
exactly orthogonal matrix for skew ``Q``. The truncated Neumann series of ``(I - Q)^{-1}`` gives
``cayley_neumann(Q, k) = I + 2Q + 2Q^2 + ... + 2Q^{k-2} + Q^{k-1}`` (OFTv2, Qiu et al. 2025,
arXiv:2506.19847; the series and its last coefficient exactly as peft 0.21 computes it), which
approximates the same ``cayley(Q)``: switching between the two keeps the rotation's direction.

Shapes: skew blocks are (..., n, b, b); activations are row vectors (..., n * b).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor


def skew_from_triu(vec: Tensor, rows: Tensor, cols: Tensor, size: int) -> Tensor:
    """(..., size*(size-1)/2) strictly-upper-triangular entries -> (..., size, size) skew matrices.

    ``rows, cols = torch.triu_indices(size, size, 1)`` (peft's OFT/PSOFT layout), kept as buffers by
    the caller so the index tensors live on the parameters' device.
    """
    flat = vec.new_zeros(*vec.shape[:-1], size * size).index_copy(-1, rows * size + cols, vec)
    Q = flat.reshape(*vec.shape[:-1], size, size)
    return Q - Q.transpose(-1, -2)


def skew_from_square(X: Tensor) -> Tensor:
    """``(X - X^T) / 2``: BOFT's layout, a full (..., b, b) block made skew."""
    return 0.5 * (X - X.transpose(-1, -2))


def cayley(Q: Tensor) -> Tensor:
    """Exact ``(I + Q)(I - Q)^{-1}`` for a batch of skew matrices (one LU solve each).

    With autograd it is the custom op ``orthotune::cayley`` (:func:`cayley_op`), eager and compiled alike: its
    backward keeps only the result (plain autograd through the solve keeps ``I - Q``, ``I + Q``, the LU factors
    and the result until the backward, and solves again there).
    """
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and Q.requires_grad):
        return cayley_op(Q)
    return _solve_cayley(Q)


def _solve_cayley(Q: Tensor) -> Tensor:
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    # (I-Q)^{-1}(I+Q): the two factors commute. solve_ex: I - Q is never singular for skew Q, and
    # skipping the error check spares a host sync per call on CUDA.
    return torch.linalg.solve_ex(eye - Q, eye + Q).result


@torch.library.custom_op("orthotune::cayley", mutates_args=())
def cayley_op(Q: Tensor) -> Tensor:
    """:func:`cayley` as one opaque op for compiled graphs: the batched LU through cuSOLVER/cuBLAS on CUDA
    (capture-safe under ``mode="reduce-overhead"``, see :func:`cusolver_linalg`), and a backward of
    matmuls only: with ``R = 2 (I - Q)^{-1} - I``, ``dL/dQ = (R + I)^T G (R + I)^T / 2``, no second solve."""
    with cusolver_linalg() if Q.is_cuda else contextlib.nullcontext():
        return _solve_cayley(Q).contiguous()


@cayley_op.register_fake
def _(Q: Tensor) -> Tensor:
    return Q.new_empty(Q.shape)


def _cayley_setup(ctx, inputs: tuple[Tensor], output: Tensor) -> None:
    ctx.save_for_backward(output)


def _cayley_backward(ctx, grad: Tensor) -> Tensor:
    (R,) = ctx.saved_tensors
    K = (R + torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)).mT  # 2 (I - Q)^{-T}
    return 0.5 * (K @ grad @ K)


cayley_op.register_autograd(_cayley_backward, setup_context=_cayley_setup)


@contextlib.contextmanager
def cusolver_linalg() -> Iterator[None]:
    """cuSOLVER/cuBLAS for batched solves (the Cayley transforms of OFT, BOFT, PSOFT, LOFT): the default
    heuristic picks MAGMA for batches of more than 8 matrices, whose batched LU is not capture-safe at
    every size (OFT b32 failed to capture in a CUDA graph on an H100, b16 did not)."""
    previous = torch.backends.cuda.preferred_linalg_library()
    torch.backends.cuda.preferred_linalg_library("cusolver")
    try:
        yield
    finally:
        torch.backends.cuda.preferred_linalg_library(previous)


def cayley_neumann(Q: Tensor, terms: int) -> Tensor:
    """peft's truncated series ``I + 2Q + 2Q^2 + ... + Q^{k-1}`` for ``(I + Q)(I - Q)^{-1}``.

    Not exactly orthogonal: the error grows like ``||Q||^k``. Reproduces peft 0.21's control flow
    term for term (for k = 3 it also stops at ``Q^3``, as peft does).
    """
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device).expand_as(Q)
    if terms <= 1:
        return eye.clone()
    R = eye + 2.0 * Q
    if terms == 2:
        return R
    power = Q @ Q
    R = R + 2.0 * power
    for _ in range(3, terms - 1):
        power = power @ Q
        R = R + 2.0 * power
    return R + power @ Q


def apply_blocks(z: Tensor, blocks: Tensor, transpose: bool = False) -> Tensor:
    """Rows through a block-diagonal matrix ``B = blockdiag(B_1..B_n)``: ``z B^T`` (or ``z B``).

    ``z`` (..., n*b) is viewed as (..., n, b) and each chunk meets its own (b, b) block in one
    batched contraction; ``blocks`` may be (1, b, b), shared by every chunk.
    """
    b = blocks.shape[-1]
    n = z.shape[-1] // b
    zz = z.reshape(*z.shape[:-1], n, b)
    blocks = blocks.expand(n, b, b)
    out = torch.einsum("...nk,nkc->...nc" if transpose else "...nk,nck->...nc", zz, blocks)
    return out.reshape(z.shape)


def drop_blocks(blocks: Tensor, p: float) -> Tensor:
    """Multiplicative dropout (BOFT, Liu et al. 2024): in one randomly chosen factor of ``blocks``
    (m, n, b, b), ``int(p * n)`` random blocks become the identity. Identity-preserving, as in peft.
    """
    m, n, b, _ = blocks.shape
    k = int(p * n)
    if k == 0:
        return blocks
    # drawn on the device, no host read: the step stays capturable in a CUDA graph (orthotune.GraphedStep)
    factor = torch.randint(m, (1,), device=blocks.device)
    chosen = torch.zeros(n, dtype=torch.bool, device=blocks.device).index_fill_(0, torch.randperm(n, device=blocks.device)[:k], True)
    mask = (torch.arange(m, device=blocks.device)[:, None] == factor) & chosen
    eye = torch.eye(b, dtype=blocks.dtype, device=blocks.device)
    return torch.where(mask[..., None, None], eye, blocks)
