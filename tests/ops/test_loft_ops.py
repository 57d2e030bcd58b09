"""LOFT's tensor math against float64 dense references and peft 0.21's own helpers."""

from __future__ import annotations

import math

import pytest
import torch

from orthotune.ops import butterfly, cayley, givens, householder

f64 = torch.float64


def skew_batch(n: int, b: int, scale: float) -> torch.Tensor:
    X = torch.randn(n, b, b, dtype=f64) * scale
    return X - X.transpose(-1, -2)


def test_cayley_is_exact_and_orthogonal() -> None:
    Q = skew_batch(3, 5, 0.7)
    eye = torch.eye(5, dtype=f64)
    R = cayley.cayley(Q)
    assert torch.allclose(R, (eye + Q) @ torch.linalg.inv(eye - Q), atol=1e-12)
    assert (R.transpose(-1, -2) @ R - eye).abs().max() < 1e-12


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 7])
def test_cayley_neumann_is_peft_series_and_approximates_cayley(terms: int) -> None:
    from peft.tuners.oft.layer import OFTRotationModule

    b = 6
    module = OFTRotationModule(2, b * (b - 1) // 2, b, 2 * b)
    vec = torch.randn(2, b * (b - 1) // 2) * 0.05
    rows, cols = torch.triu_indices(b, b, 1)
    Q = cayley.skew_from_triu(vec, rows, cols, b)
    assert torch.equal(Q, module._pytorch_skew_symmetric(vec, b))
    assert torch.allclose(cayley.cayley_neumann(Q, terms), module._cayley_batch(vec, b, True, terms), atol=1e-7)
    # peft's exact branch is (I - Q)(I + Q)^{-1}: the transpose of orthotune's cayley(Q)
    assert torch.allclose(cayley.cayley(Q), module._cayley_batch(vec, b, False).transpose(-1, -2), atol=1e-6)
    if terms >= 4:  # the series approximates orthotune's exact rotation, not its transpose
        gap = (cayley.cayley_neumann(Q.double(), terms) - cayley.cayley(Q.double())).abs().max()
        assert gap < 20 * float(torch.linalg.matrix_norm(Q, ord=2).max()) ** (terms - 1)


def test_apply_blocks_equals_dense_block_diagonal() -> None:
    blocks = torch.randn(4, 3, 3, dtype=f64)
    z = torch.randn(5, 2, 12, dtype=f64)
    dense = torch.block_diag(*blocks)
    assert torch.allclose(cayley.apply_blocks(z, blocks), z @ dense.T)
    assert torch.allclose(cayley.apply_blocks(z, blocks, transpose=True), z @ dense)
    shared = cayley.apply_blocks(z, blocks[:1])
    assert torch.allclose(shared, z @ torch.block_diag(*[blocks[0]] * 4).T)


def test_drop_blocks_replaces_a_share_of_one_factor() -> None:
    torch.manual_seed(0)
    blocks = torch.randn(3, 8, 2, 2)
    dropped = cayley.drop_blocks(blocks, 0.5)
    is_eye = (dropped == torch.eye(2)).all(-1).all(-1)
    changed = ~(dropped == blocks).all(-1).all(-1)
    assert int(is_eye.sum()) == 4 and torch.equal(is_eye, changed)
    assert int(changed.any(-1).sum()) == 1  # one factor only
    assert torch.equal(cayley.drop_blocks(blocks, 0.1), blocks)  # int(0.1 * 8) = 0 blocks


@pytest.mark.parametrize("n,block_num,half", [(16, 8, 1), (16, 4, 1), (24, 6, 2), (32, 4, 2), (48, 12, 1), (64, 2, 8)])
def test_butterfly_permutation_is_peft_s(n: int, block_num: int, half: int) -> None:
    from peft.tuners.boft.layer import BOFTLayer

    expected = BOFTLayer.block_butterfly_perm(None, n, block_num, half, n_butterfly_factor=1)
    assert torch.equal(butterfly.butterfly_permutation(n, block_num, half), expected)


def butterfly_blocks(dim: int, b: int, m: int, *lead: int) -> torch.Tensor:
    """Random exact Cayley blocks (*lead, m, dim/b, b, b) of butterfly factors."""
    return cayley.cayley(skew_batch(math.prod(lead) * m * (dim // b), b, 0.5)).reshape(*lead, m, dim // b, b, b)


def butterfly_dense(blocks: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """``R = F_0 F_1 ... F_{m-1}``, ``F_i = P_i D_i P_i^T`` with ``P_i[j, perm[j]] = 1``, as dense matrices."""
    dim = perms.shape[-1]
    R = torch.eye(dim, dtype=f64)
    for i in range(blocks.shape[0]):
        P = torch.zeros(dim, dim, dtype=f64)
        P[torch.arange(dim), perms[i]] = 1.0
        R = R @ (P @ torch.block_diag(*blocks[i]) @ P.T)
    return R


@pytest.mark.parametrize("dim,b,m", [(16, 2, 3), (24, 3, 1), (24, 2, 2), (32, 4, 3)])
def test_butterfly_apply_equals_dense_product(dim: int, b: int, m: int) -> None:
    perms = butterfly.butterfly_permutations(dim, b, m)
    blocks = butterfly_blocks(dim, b, m)
    R = butterfly_dense(blocks, perms)
    z = torch.randn(3, dim, dtype=f64)
    inv = torch.argsort(perms, -1)
    assert torch.allclose(butterfly.apply_rows(z, blocks, perms, inv), z @ R.T, atol=1e-12)
    assert torch.allclose(butterfly.apply_rows(z, blocks, perms, inv, transpose=True), z @ R, atol=1e-12)
    assert (R.T @ R - torch.eye(dim, dtype=f64)).abs().max() < 1e-12


BUTTERFLY_SHAPES = [(24, 3, 1), (16, 2, 3), (48, 2, 4), (32, 4, 3), (16, 4, 3), (64, 8, 2)]  # (16, 4, 3): span = dim


@pytest.mark.parametrize("dim,b,m", BUTTERFLY_SHAPES)
def test_butterfly_product_is_block_diagonal_in_contiguous_spans(dim: int, b: int, m: int) -> None:
    s = butterfly.block_span(b, m)
    perms = butterfly.butterfly_permutations(dim, b, m)
    chunk = torch.arange(dim // s)[:, None] * s
    # every factor's permutation keeps each aligned s-chunk to itself, with chunk 0's pattern
    assert torch.equal(perms.reshape(m, dim // s, s), perms[:, None, :s] + chunk)
    R = butterfly_dense(butterfly_blocks(dim, b, m), perms)
    inside = torch.block_diag(*[torch.ones(s, s)] * (dim // s)).bool()
    assert torch.all(R[~inside] == 0)


@pytest.mark.parametrize("dim,b,m", BUTTERFLY_SHAPES)
def test_butterfly_compose_equals_dense_product_and_factors(dim: int, b: int, m: int) -> None:
    s = butterfly.block_span(b, m)
    perms = butterfly.butterfly_permutations(dim, b, m)
    inv = torch.argsort(perms, -1)
    blocks = butterfly_blocks(dim, b, m, 2)  # two layers stacked, as Butterfly.cores does
    composed = butterfly.compose(blocks, perms, s)
    assert composed.shape == (2, dim // s, s, s)
    z = torch.randn(3, dim, dtype=f64)
    for layer in range(2):
        R = butterfly_dense(blocks[layer], perms)
        assert torch.allclose(torch.block_diag(*composed[layer]), R, atol=1e-12)
        for transpose in (False, True):
            expected = butterfly.apply_rows(z, blocks[layer], perms, inv, transpose=transpose)
            assert torch.allclose(cayley.apply_blocks(z, composed[layer], transpose=transpose), expected, atol=1e-12)


def givens_dense(theta: torch.Tensor, dim: int) -> torch.Tensor:
    """``G_{L-1} ... G_0`` built rotation by rotation: layer l rotates (i, i + 2^l), i = 0, 2^(l+1), ..."""
    T = torch.eye(dim, dtype=f64)
    k = 0
    for l in range(math.ceil(math.log2(dim))):
        G = torch.eye(dim, dtype=f64)
        for a in range(0, dim - 2**l, 2 ** (l + 1)):
            b = a + 2**l
            c, s = torch.cos(theta[k]), torch.sin(theta[k])
            G[a, a], G[a, b], G[b, a], G[b, b] = c, -s, s, c
            k += 1
        T = G @ T
    assert k == dim - 1
    return T


@pytest.mark.parametrize("dim", [2, 5, 8, 13, 36])
def test_givens_equals_dense_product(dim: int) -> None:
    theta = torch.randn(dim - 1, dtype=f64)
    partner, index, sign = givens.tree_layout(dim)
    assert partner.shape[0] == math.ceil(math.log2(dim))  # log-depth: every layer is parallel
    C, S = givens.coefficients(theta, index, sign)
    T = givens_dense(theta, dim)
    z = torch.randn(4, dim, dtype=f64)
    assert torch.allclose(givens.apply_rows(z, C, S, partner), z @ T.T, atol=1e-12)
    assert torch.allclose(givens.apply_rows(z, C, S, partner, transpose=True), z @ T, atol=1e-12)



@pytest.mark.parametrize("dim, block", [(5, 1), (36, 4), (48, 16), (96, 32), (704, 64), (7, 1)])
def test_givens_compact_equals_the_layers(dim: int, block: int) -> None:
    """Block-diagonal + small dense regrouping == the layer-by-layer product (batched cores too)."""
    assert givens.compact_block(dim) == block
    theta = torch.randn(2, dim - 1, dtype=f64)
    partner, index, sign = givens.tree_layout(dim)
    C, S = givens.coefficients(theta, index, sign)
    blocks, high = givens.compact(C, S, partner, block)
    assert blocks.shape == (2, dim // block, block, block) and high.shape == (2, dim // block, dim // block)
    z = torch.randn(3, dim, dtype=f64)
    idx = torch.arange(0, dim, block)
    for i in range(2):
        T = givens_dense(theta[i], dim)
        assert torch.allclose(givens.apply_compact(z, blocks[i], high[i], idx), z @ T.T, atol=1e-12)
        assert torch.allclose(givens.apply_compact(z, blocks[i], high[i], idx, transpose=True), z @ T, atol=1e-12)


def test_givens_compact_gradients() -> None:
    """Gradients through the compact path (block-diagonal part, then the dense part on every B-th coordinate)."""
    dim, block = 48, 16
    partner, index, sign = givens.tree_layout(dim)
    idx = torch.arange(0, dim, block)
    theta = torch.randn(dim - 1, dtype=f64, requires_grad=True)
    z = torch.randn(3, dim, dtype=f64, requires_grad=True)

    def f(theta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        C, S = givens.coefficients(theta, index, sign)
        blocks, high = givens.compact(C, S, partner, block)
        return givens.apply_compact(z, blocks, high, idx)

    assert torch.autograd.gradcheck(f, (theta, z))
    assert torch.allclose(f(theta, z), z @ givens_dense(theta.detach(), dim).T, atol=1e-12)


def test_givens_compact_block_leaves_large_dense_parts_layered() -> None:
    assert givens.compact_block(2 * 1001) == 0 and givens.compact_block(100_000) == 0
    assert givens.compact_block(5632) == 64 and givens.compact_block(14336) == 64 and givens.compact_block(1000) == 8

def test_reflection_core_is_the_householder_product() -> None:
    u = torch.randn(20, 5, dtype=f64)
    eye = torch.eye(20, dtype=f64)
    H = eye.clone()
    for i in range(5):
        H = H @ (eye - 2 * torch.outer(u[:, i], u[:, i]) / u[:, i].dot(u[:, i]))
    U, M, V = householder.reflection_core(u)
    assert torch.allclose(eye + U @ M @ V.T, H, atol=1e-12)
    Q, M, _ = householder.gram_schmidt_core(u)
    assert torch.allclose(eye + Q @ M @ Q.T, eye - 2 * Q @ Q.T) and torch.allclose(Q.T @ Q, torch.eye(5, dtype=f64))


def test_orthogonality_penalty() -> None:
    u = torch.randn(10, 3, dtype=f64)
    unit = u / u.norm(dim=0)
    expected = ((unit.T @ unit - torch.eye(3, dtype=f64)) ** 2).sum()
    assert torch.allclose(householder.orthogonality_penalty(u), expected)
    orthogonal = torch.linalg.qr(u).Q * torch.tensor([2.0, 3.0, 0.5], dtype=f64)
    assert householder.orthogonality_penalty(orthogonal) < 1e-24
