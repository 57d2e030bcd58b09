"""Low-rank skew-symmetric exponentials and their chains (the math of LoCO).

A generator ``S = U V^T - V U^T`` (``U, V`` of shape (d, r)) factors as ``S = A B^T`` with
``A = [U, V]``, ``B = [V, -U]`` (d x 2r), and ``exp(A B^T) = I + A phi(B^T A) B^T`` where
``phi(Z) = sum_j Z^j / (j+1)!``: a 2r x 2r computation. A chain ``exp(S_1) ... exp(S_k)`` is then,
exactly, ``I + A M B^T`` with stacked factors and ``M = C (I - G C)^{-1}`` (see :func:`chain_core`).

Shapes: factor stacks are (..., k, d, m); cores are (..., m, m); leading dims batch layers.

Small constants (identities, the chain's block mask) are built in every call, never cached: a cached
tensor first made while ``torch.compile(mode="reduce-overhead")`` warms a CUDA graph up lives in that
graph's memory pool untracked, and the capture fails (``benchmarks/results/compiled/call7_ro_all``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .lowrank import lowrank_norm


def expm(X: Tensor, max_squarings: int | None = None) -> Tensor:
    """``exp(X)`` for a batch of small square matrices (..., n, n): scaling and squaring, exact for any norm.

    Each matrix is scaled by ``2^-s`` (its own ``s``) to 1-norm <= 1, where a Taylor polynomial of
    degree 12 (float32) or 18 (float64) is exact to the dtype's rounding (remainder below
    ``1.1/13!`` = 2e-10, ``1.1/19!`` = 1e-17), evaluated by Horner in one batched ``baddbmm`` per
    degree; then squared ``s`` times. Unlike ``torch.linalg.matrix_exp`` (on CUDA a host sync and a
    data-dependent loop per call, again in backward), this costs one host read of ``max s`` per
    call and a fixed, short list of batched kernels; backward is plain autograd. Under
    ``torch.compile`` it is the custom op ``orthotune::expm`` (:func:`expm_op`): the same computation,
    opaque to the compiler, so the graph stays whole and the squaring count is still read once per
    call (``torch.linalg.matrix_exp`` would cost ~3 host syncs per call, ``benchmarks/NOTES.md``).
    ``max_squarings`` fixes the loop instead (squarings masked per matrix, no host read; a matrix whose
    1-norm needs more comes out NaN, never silently inexact): used while a CUDA graph is captured,
    with :data:`CAPTURED_SQUARINGS`.
    """
    if torch.compiler.is_compiling() and max_squarings is None:
        return expm_op(X)
    return taylor_expm(X, max_squarings)


@torch.library.custom_op("orthotune::expm", mutates_args=())
def expm_op(X: Tensor) -> Tensor:
    """:func:`taylor_expm` as one opaque op for compiled graphs; backward is the exact Fréchet derivative."""
    return taylor_expm(X)


@expm_op.register_fake
def _(X: Tensor) -> Tensor:
    return X.new_empty(X.shape)  # contiguous, as the eager result is whatever X's strides


def expm_frechet(X: Tensor, E: Tensor) -> Tensor:
    """The Fréchet derivative ``L(X, E)`` of ``exp`` at ``X`` in direction ``E`` (..., n, n): the top-right
    block of ``exp([[X, E], [0, X]])`` (Higham, Functions of Matrices, 2008, eq. 3.16).

    ``E`` is scaled down to ``X``'s 1-norm (at least 1) first (``L`` is linear in ``E``), so the block
    needs no more squarings than ``X`` itself.
    """
    n = X.shape[-1]
    x_norm, e_norm = (T.abs().sum(-2).amax(-1, keepdim=True)[..., None] for T in (X, E))
    scale = (x_norm.clamp(min=1.0) / e_norm).clamp(max=1.0)  # only ever scaled down (E = 0: 1)
    top = torch.cat([X, E * scale], -1)
    bottom = torch.cat([torch.zeros_like(X), X], -1)
    return expm_op(torch.cat([top, bottom], -2))[..., :n, n:] / scale


def _expm_setup(ctx, inputs: tuple[Tensor], output: Tensor) -> None:
    ctx.save_for_backward(inputs[0])


def _expm_backward(ctx, grad: Tensor) -> Tensor:
    """``dL/dX = L(X^T, dL/dexp(X))``: the adjoint of the Fréchet derivative."""
    (X,) = ctx.saved_tensors
    return expm_frechet(X.transpose(-1, -2), grad)


expm_op.register_autograd(_expm_backward, setup_context=_expm_setup)


def taylor_expm(X: Tensor, max_squarings: int | None = None) -> Tensor:
    """:func:`expm` by scaling and squaring whatever the context; with ``max_squarings`` it never reads
    the host, so it also traces into a compiled graph (``benchmarks/compile_profile.py``)."""
    n = X.shape[-1]
    batch = X.reshape(-1, n, n)
    degree = 18 if X.dtype == torch.float64 else 12
    s = torch.ceil(torch.log2(batch.abs().sum(-2).amax(-1))).clamp_(min=0.0)
    s = torch.nan_to_num(s, nan=0.0, posinf=0.0)  # non-finite input: NaN out, no squaring loop
    if max_squarings is None and _capturing(batch):
        max_squarings = CAPTURED_SQUARINGS
    if max_squarings is not None:
        too_large = s > max_squarings
        s = s.clamp(max=max_squarings)
        squarings = max_squarings
    else:
        squarings = int(s.max()) if s.numel() else 0
    Y = batch * torch.exp2(-s)[:, None, None]
    eye = torch.eye(n, dtype=X.dtype, device=X.device).expand_as(Y)
    P = torch.baddbmm(eye, Y, eye, alpha=1.0 / degree)
    for j in range(degree - 1, 0, -1):
        P = torch.baddbmm(eye, Y, P, alpha=1.0 / j)  # I + Y P / j
    if squarings:
        active = (s[:, None] > torch.arange(squarings, device=s.device, dtype=s.dtype))[..., None, None]  # one kernel
        for i in range(squarings):
            P = torch.where(active[:, i], P @ P, P)
    if max_squarings is not None:
        P = P.masked_fill(too_large[:, None, None], float("nan"))
    return P.reshape(X.shape)


#: Squarings applied (masked per matrix) while a CUDA graph is captured: generators up to 1-norm 2^20.
CAPTURED_SQUARINGS = 20


def _capturing(t: Tensor) -> bool:
    """Whether ``t``'s kernels are being recorded into a CUDA graph (host reads would fail)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def phi(Z: Tensor) -> Tensor:
    """``phi(Z) = sum_{j>=0} Z^j/(j+1)!`` (= ``Z^{-1}(e^Z - I)``), exact for any norm.

    Read off the top-right block of ``exp([[Z, I], [0, 0]])`` (:func:`expm`: scaling and squaring,
    so there is no truncated series to go wrong for large generators).
    """
    n = Z.shape[-1]
    aug = torch.nn.functional.pad(torch.cat([Z, torch.eye(n, dtype=Z.dtype, device=Z.device).expand_as(Z)], -1), (0, 0, 0, n))
    return expm(aug)[..., :n, n:]


def skew_factors(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """``A = [U, V]``, ``B = [V, -U]`` so that ``A B^T = U V^T - V U^T``."""
    return torch.cat([U, V], -1), torch.cat([V, -U], -1)


def skew_exp_factors(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(A, B, C)`` with ``exp(U V^T - V U^T) = I + A C B^T``, ``C = phi(B^T A)``; batched."""
    A, B = skew_factors(U, V)
    return A, B, phi(B.transpose(-1, -2) @ A)


def jt_rows(M: Tensor, r: int) -> Tensor:
    """``J^T M`` for ``J = diag(J_r, ..., J_r)``, ``J_r = [[0, -I_r], [I_r, 0]]``: each 2r-row block ``[M_1; M_2]``
    becomes ``[M_2; -M_1]``. ``B = A J`` turns the stacked factors ``A = [U_i, V_i]`` into ``B = [V_i, -U_i]``, so
    ``B^T A = J^T (A^T A)`` and ``C B^T = (C J^T) A^T``: products with ``B`` from ``A`` alone (:func:`jt_cols`)."""
    blocks = M.unflatten(-2, (-1, 2, r))
    return torch.stack([blocks[..., 1, :, :], -blocks[..., 0, :, :]], -3).flatten(-4, -2)


def jt_cols(M: Tensor, r: int) -> Tensor:
    """``M J^T`` (:func:`jt_rows`): each 2r-column block ``[M_1, M_2]`` becomes ``[-M_2, M_1]``."""
    blocks = M.unflatten(-1, (-1, 2, r))
    return torch.stack([-blocks[..., 1, :], blocks[..., 0, :]], -2).flatten(-3)


def stack_factors(A: Tensor) -> Tensor:
    """(..., k, d, m) -> (..., d, k*m): the factors side by side, first factor leftmost."""
    *lead, k, d, m = A.shape
    return A.transpose(-3, -2).reshape(*lead, d, k * m)


def _block_diag(C: Tensor) -> Tensor:
    """(..., k, m, m) -> (..., k*m, k*m) block-diagonal, batched (one kernel)."""
    *lead, k, m, _ = C.shape
    return torch.diag_embed(C.movedim(-3, -1), dim1=-4, dim2=-2).reshape(*lead, k * m, k * m)


def _strict_block_upper_mask(k: int, m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    blocks = torch.ones(k, k, dtype=dtype, device=device).triu(1)
    return blocks.repeat_interleave(m, 0).repeat_interleave(m, 1)


def diagonal_blocks(X: Tensor, k: int) -> Tensor:
    """(..., k*m, k*m) -> (..., k, m, m): the k diagonal blocks (a view)."""
    *lead, n, _ = X.shape
    m = n // k
    return torch.diagonal(X.reshape(*lead, k, m, k, m), dim1=-4, dim2=-2).movedim(-1, -3)


def chain_from_gram(gram: Tensor, C: Tensor) -> Tensor:
    """``M = C (I - G C)^{-1}`` of :func:`chain_core`, from the Gram matrix ``V^T U`` (..., km, km) and the C_i.

    ``G`` is the strictly block-upper part of ``gram``; ``N = G C`` is nilpotent of order k, so
    ``(I - N)^{-1} = I + N + ... + N^{k-1}`` exactly, evaluated by Horner in k - 1 batched products:
    no solve, no approximation.
    """
    k, m = C.shape[-3], C.shape[-1]
    Cb = _block_diag(C)
    N = (gram * _strict_block_upper_mask(k, m, gram.dtype, gram.device)) @ Cb
    eye = torch.eye(k * m, dtype=gram.dtype, device=gram.device)
    S = eye + N
    for _ in range(k - 2):
        S = eye + N @ S
    return Cb @ S


def chain_core(A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact product ``prod_i (I + A_i C_i B_i^T) = I + U M V^T`` (factor 1 leftmost).

    ``U``/``V`` stack the ``A_i``/``B_i``; ``M = C (I - G C)^{-1}`` with ``C = blockdiag(C_i)`` and
    ``G`` strictly block-upper-triangular, ``G_ij = B_i^T A_j`` (i < j). ``G C`` is nilpotent, so
    ``I - G C`` is unit upper triangular and its inverse a finite series (:func:`chain_from_gram`).
    Serves LoCO chains (``C_i = phi(B_i^T A_i)``) and Householder products (compact WY form).
    """
    U, V = stack_factors(A), stack_factors(B)
    return U, V, chain_from_gram(V.transpose(-1, -2) @ U, C)


def sum_exp_core(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``exp(S_1 + ... + S_k) = I + U phi(V^T U) V^T``: the first-order (BCH) parallel form.

    Exactly orthogonal (it is the exponential of one skew matrix of rank <= 2kr) and equal to the
    chain up to commutator terms; see :func:`trotter_bound`.
    """
    U, V = stack_factors(A), stack_factors(B)
    return U, V, phi(V.transpose(-1, -2) @ U)


def trotter_bound(A: Tensor, B: Tensor) -> Tensor:
    """Upper bound on ``||exp(S_1)...exp(S_k) - exp(S_1 + ... + S_k)||_2`` for skew ``S_i = A_i B_i^T``.

    For skew-symmetric (anti-Hermitian) generators the first-order product formula obeys
    ``||e^{X+Y} - e^X e^Y||_2 <= ||[X, Y]||_2 / 2``; telescoping over the chain gives
    ``(1/2) sum_i ||[S_i, S_{i+1} + ... + S_k]||_2`` (Childs et al., 2021, Theory of Trotter error).
    Each commutator is low-rank, so this costs O(d k^2 r^2).
    """
    if A.dim() != 3:
        raise ValueError(f"trotter_bound expects factors of shape (k, d, m) for one layer, got {tuple(A.shape)}")
    k = A.shape[0]
    total = A.new_zeros(())
    for i in range(k - 1):
        Ai, Bi = A[i], B[i]
        At, Bt = stack_factors(A[i + 1 :]), stack_factors(B[i + 1 :])
        # [S_i, T] = A_i (B_i^T A_t) B_t^T - A_t (B_t^T A_i) B_i^T, with T = A_t B_t^T
        K = torch.block_diag(Bi.T @ At, -(Bt.T @ Ai))
        total = total + 0.5 * lowrank_norm(torch.cat([Ai, At], -1), K, torch.cat([Bt, Bi], -1), ord=2)
    return total
