"""LoCO against closed forms and float64 references (docs/loco.md)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import orthotune
from orthotune.methods.base import Base
from orthotune.methods.loco import LoCO, LoCOConfig, _Grams, approximation_error, factor_matrix
from orthotune.ops import lowrank, skew

from ..method_cases import run
from ..oracles import sequential_apply_rows, skew_dense

f64 = torch.float64


def generators(k: int, d: int, r: int, scale: float, dtype=f64):
    U = torch.randn(k, d, r, dtype=dtype) * scale / math.sqrt(d)
    V = torch.randn(k, d, r, dtype=dtype) * scale / math.sqrt(d)
    return U, V


def dense_chain(U, V):
    S = skew_dense(U, V)
    R = torch.eye(U.shape[1], dtype=U.dtype)
    for i in range(U.shape[0]):
        R = R @ torch.linalg.matrix_exp(S[i])
    return R


@pytest.mark.parametrize("scale", [0.01, 0.5, 3.0, 20.0])
def test_closed_form_exponential_matches_matrix_exp(scale: float) -> None:
    U, V = generators(3, 40, 3, scale)
    A, B, C = skew.skew_exp_factors(U, V)
    S = skew_dense(U, V)
    for i in range(3):
        closed = torch.eye(40, dtype=f64) + A[i] @ C[i] @ B[i].T
        assert (closed - torch.linalg.matrix_exp(S[i])).abs().max() < 1e-10 * max(1.0, scale)


@pytest.mark.parametrize("k,d,r", [(1, 8, 1), (5, 64, 3), (4, 256, 4), (3, 33, 5)])
def test_exact_chain_equals_product_of_exponentials(k: int, d: int, r: int) -> None:
    U, V = generators(k, d, r, 2.0)
    A, B, C = skew.skew_exp_factors(U, V)
    ref = dense_chain(U, V)
    Uc, Vc, M = skew.chain_core(A, B, C)
    assert (lowrank.materialize(Uc, M, Vc) - ref).abs().max() < 1e-10
    x = torch.randn(7, d, dtype=f64)
    assert (sequential_apply_rows(x, A, B, C) - x @ ref.T).abs().max() < 1e-10
    assert (lowrank.apply_rows(x, Uc, M, Vc) - x @ ref.T).abs().max() < 1e-10


def test_phi_is_exact_for_large_generators() -> None:
    Z = torch.randn(6, 6, dtype=f64) * 8.0  # a fixed 20-term Taylor series is off by ~1e-4 here
    ref = torch.linalg.solve(Z, torch.linalg.matrix_exp(Z) - torch.eye(6, dtype=f64))
    assert (skew.phi(Z) - ref).abs().max() / ref.abs().max() < 1e-11


@pytest.mark.parametrize("scale", [0.05, 0.5, 2.0])
def test_approximation_within_first_order_bound(scale: float) -> None:
    U, V = generators(4, 64, 2, scale)
    A, B, _ = skew.skew_exp_factors(U, V)
    exact = dense_chain(U, V)
    Ua, Va, Ma = skew.sum_exp_core(A, B)
    approx = lowrank.materialize(Ua, Ma, Va)
    assert (approx - torch.linalg.matrix_exp(skew_dense(U, V).sum(0))).abs().max() < 1e-10
    gap = torch.linalg.matrix_norm(approx - exact, ord=2)
    assert gap <= skew.trotter_bound(A, B) + 1e-12
    assert gap > 0  # the approximation is an approximation
    eye = torch.eye(64, dtype=f64)
    assert (approx.T @ approx - eye).norm() / 8 < 1e-12


def test_approximation_error_report_matches_dense() -> None:
    module = LoCO(LoCOConfig(rank=2, chain_length=3, init_identity=False), 32, 32, torch.zeros(32, 32))
    module.double()
    report = approximation_error(module)
    with torch.no_grad():
        A, B, C = module.factors()
        exact = lowrank.materialize(*_utm(skew.chain_core(A, B, C)))
        approx = lowrank.materialize(*_utm(skew.sum_exp_core(A, B)))
    assert report["approx_error_2norm"] == pytest.approx(float(torch.linalg.matrix_norm(exact - approx, ord=2)), rel=1e-9)
    moved = (exact - torch.eye(32, dtype=f64)).norm()
    assert report["approx_error_relative"] == pytest.approx(float((exact - approx).norm() / moved), rel=1e-9)
    assert report["approx_error_2norm"] <= report["approx_error_bound"]


def _utm(core):
    U, V, M = core
    return U, M, V


def _layer_model(d: int, mode: str, **kw) -> tuple[nn.Module, orthotune.OrthoModel]:
    base = nn.Sequential(nn.Linear(d, d))
    cfg = LoCOConfig(target_modules=["0"], mode=mode, **kw)
    return base, orthotune.get_model(base, cfg)


@pytest.mark.parametrize("mode", ["exact", "sequential", "approx"])
def test_orthogonality_float32_after_training(mode: str) -> None:
    _, model = _layer_model(48, mode, rank=4, chain_length=4)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    x, t = torch.randn(64, 48), torch.randn(64, 48)
    for _ in range(50):
        loss = (model(x) - t).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer = dict(model.adapter_layers())["0"].adapters["default"]
    R = layer.rotation()
    assert layer.diagnostics()["orthogonality_error"] < 1e-5
    assert (R.T @ R - torch.eye(48)).norm() / 48**0.5 < 1e-5
    assert (R - torch.eye(48)).norm() > 0.1  # it really rotated


def test_modes_agree_exactly_and_approx_reports_gap() -> None:
    torch.manual_seed(3)
    _, exact = _layer_model(24, "exact", rank=2, chain_length=3, init_identity=False)
    seq_base, seq = _layer_model(24, "sequential", rank=2, chain_length=3)
    seq.load_state_dict(exact.state_dict())
    x = torch.randn(5, 24)
    assert torch.allclose(exact(x), seq(x), atol=1e-5)
    report = orthotune.loco_approximation_error(exact)
    assert set(report) == {"0"} and 0 < report["0"]["approx_error_2norm"] <= report["0"]["approx_error_bound"]


@pytest.mark.parametrize("mode", ["exact", "sequential", "approx"])
def test_gradcheck_layer_float64(mode: str) -> None:
    module = LoCO(LoCOConfig(rank=1, chain_length=3, mode=mode, init_identity=False), 6, 4, torch.zeros(4, 6)).double()
    W = torch.randn(4, 6, dtype=f64)
    x = torch.randn(3, 6, dtype=f64, requires_grad=True)

    def f(U, V, x):
        with torch.nn.utils.stateless._reparametrize_module(module, {"U": U, "V": V}):
            return run(module, x, lambda z: z @ W.T)

    U = module.U.detach().clone().requires_grad_()
    V = module.V.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (U, V, x))
    # the gradient at the identity (U = 0) is non-zero, and merging is differentiable too
    U0 = torch.zeros_like(U, requires_grad=True)
    f(U0, V, x).sum().backward()
    assert U0.grad.abs().sum() > 0
    merged = MergedView(module)
    assert torch.autograd.gradcheck(lambda U, V: torch.func.functional_call(merged, {"m.U": U, "m.V": V}, (W,)), (U, V))


class MergedView(nn.Module):
    """Exposes ``merged_weight`` as forward, so functional_call can swap the parameters."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return self.m.merged_weight(W)


def test_training_path_never_forms_d_by_d() -> None:
    d = 200_000  # a d x d float32 matrix would need 160 GB
    module = LoCO(LoCOConfig(rank=2, chain_length=2, init_identity=False), d, 4, torch.zeros(4, d))
    W = torch.randn(4, d) / d**0.5
    x = torch.randn(3, d)
    y = run(module, x, lambda z: z @ W.T)
    y.sum().backward()
    assert module.U.grad is not None and y.shape == (3, 4)
    merged = module.merged_weight(W)  # merging goes through W U, also O(d)
    assert merged.shape == W.shape


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LoCOConfig(rank=0)
    with pytest.raises(ValueError, match="chain_length"):
        LoCOConfig(chain_length=-1)
    with pytest.raises(ValueError, match="mode='fast' is not supported"):
        LoCOConfig(mode="fast")
    with pytest.raises(ValueError, match="init_std"):
        LoCOConfig(init_std=0.0)
    base = nn.Sequential(nn.Linear(6, 6))
    with pytest.raises(ValueError, match="rank=4 is too large for '0'"):
        orthotune.get_model(base, LoCOConfig(target_modules=["0"], rank=4))


@pytest.mark.parametrize("mode", ["exact", "approx", "sequential"])
def test_bf16_cores_pad_rank_to_aligned_width_with_same_output(mode: str) -> None:
    """In 16-bit activations the rank 2kr = 36 of ``R = I + A K A^T`` is zero-padded to 40 (GEMM alignment); same values."""
    torch.manual_seed(0)
    m = LoCO(LoCOConfig(target_modules=["x"], rank=3, chain_length=3, mode=mode), 64, 32, torch.zeros(32, 64))
    with torch.no_grad():
        m.U.normal_(std=0.1)
    (core,) = LoCO.cores([m], torch.bfloat16)
    (core32,) = LoCO.cores([m], torch.float32)
    A, K = m.rotation_factors(core)
    A32, K32 = m.rotation_factors(core32)
    assert A.dtype == K.dtype == torch.bfloat16 and A.shape[-1] % 8 == 0 and K.shape[-2:] == (A.shape[-1],) * 2
    assert A32.shape[-1] == (6 if mode == "sequential" else 18)  # float32 cores are left as they are
    x = torch.randn(5, 64)
    want = m.forward(x, Base(lambda z: z), core32)
    got = m.forward(x.bfloat16(), Base(lambda z: z), core).float()
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    width = 18 if mode != "sequential" else 6
    assert A[..., width:].abs().sum() == 0 and K[..., width:, :].abs().sum() == 0 and K[..., :, width:].abs().sum() == 0


def test_pad_square_appends_zeros_only() -> None:
    K = torch.randn(3, 6, 6, dtype=torch.bfloat16)
    P = lowrank.pad_square(K)
    assert P.shape == (3, 8, 8) and torch.equal(P[..., :6, :6], K) and P[..., 6:, :].abs().sum() == 0
    assert P[..., :, 6:].abs().sum() == 0
    assert lowrank.pad_square(K.float()).shape[-1] == 8  # float32: 4 per 16-byte word
    assert lowrank.pad_square(torch.randn(8, 8)).shape == (8, 8)


def test_factor_matrix_layout() -> None:
    """``A = [U_1, V_1, ..., U_k, V_k]`` side by side (and per factor), as the chain's closed form stacks them."""
    U, V = torch.randn(2, 3, 5, 2), torch.randn(2, 3, 5, 2)  # two layers, k=3, d=5, r=2
    A = factor_matrix(U, V)
    assert A.shape == (2, 5, 12)
    assert torch.equal(A, skew.stack_factors(torch.cat([U, V], -1)))
    assert torch.equal(factor_matrix(U, V, per_factor=True), torch.cat([U, V], -1))


def test_products_with_b_come_from_a_alone() -> None:
    """``B = A J`` (``A = [U, V]``, ``B = [V, -U]`` per factor): ``B^T A = J^T A^T A`` and ``C B^T = (C J^T) A^T``."""
    torch.manual_seed(0)
    k, d, r = 3, 7, 2
    U, V = torch.randn(k, d, r, dtype=torch.float64), torch.randn(k, d, r, dtype=torch.float64)
    A, B = skew.skew_factors(U, V)
    Us, Vs = skew.stack_factors(A), skew.stack_factors(B)
    J_r = torch.zeros(2 * r, 2 * r, dtype=torch.float64)
    J_r[:r, r:], J_r[r:, :r] = -torch.eye(r), torch.eye(r)
    J = torch.block_diag(*[J_r] * k)
    assert torch.equal(Us @ J, Vs) and torch.equal(A @ J_r, B)
    C = torch.randn(2 * k * r, 2 * k * r, dtype=torch.float64)
    assert torch.equal(skew.jt_rows(C, r), J.T @ C) and torch.equal(skew.jt_cols(C, r), C @ J.T)
    torch.testing.assert_close(skew.jt_rows(Us.T @ Us, r), Vs.T @ Us, rtol=0, atol=1e-14)
    c = torch.randn(k, 2 * r, 2 * r, dtype=torch.float64)
    torch.testing.assert_close(skew.jt_cols(c, r) @ A.mT, c @ B.mT, rtol=0, atol=1e-14)


@pytest.mark.parametrize("mode", ["exact", "approx", "sequential"])
def test_batched_cores_keep_no_width_sized_tensor_for_backward(mode: str) -> None:
    """The per-step cores hold nothing width-sized: each core is ``(K, U, V)`` with the parameters themselves, and
    what the cores' backward keeps of width-sized tensors is the parameters (no stacked copy held all step)."""
    torch.manual_seed(0)
    cfg = LoCOConfig(rank=2, chain_length=3, mode=mode, init_identity=False)
    modules = [LoCO(cfg, d, 8, torch.zeros(8, d)) for d in (64, 96, 64)]
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        cores = LoCO.cores(modules)
    params = {p.untyped_storage().data_ptr() for m in modules for p in (m.U, m.V)}
    for m, (K, U, V) in zip(modules, cores):
        assert U is m.U and V is m.V and max(K.shape) <= 12
    wide = [t for t in saved if max(t.shape, default=0) >= 64]
    assert wide and all(t.untyped_storage().data_ptr() in params for t in wide)


@pytest.mark.parametrize("mode", ["exact", "approx", "sequential"])
def test_batched_cores_gradients_against_float64_reference(mode: str) -> None:
    """Gradients through the batched cores (the Gram function's own backward) and the layers' forwards equal those of
    the per-layer closed form (dense chain of matrix exponentials), in float64, for layers of two widths."""
    torch.manual_seed(3)
    cfg = LoCOConfig(rank=2, chain_length=3, mode=mode, init_identity=False)
    modules = [LoCO(cfg, d, d, torch.zeros(d, d, dtype=torch.float64)).double() for d in (7, 10, 7)]
    xs = [torch.randn(4, m.d_in, dtype=torch.float64) for m in modules]
    cores = LoCO.cores(modules)
    sum(m.forward(x, Base(lambda z: z), c).square().sum() for m, x, c in zip(modules, xs, cores)).backward()
    got = [(m.U.grad.clone(), m.V.grad.clone()) for m in modules]
    for m, x, (gU, gV) in zip(modules, xs, got):
        U, V = m.U.detach().clone().requires_grad_(), m.V.detach().clone().requires_grad_()
        A, B = skew.skew_factors(U, V)
        S = A @ B.transpose(-1, -2)
        R = torch.linalg.matrix_exp(S.sum(0)) if mode == "approx" else torch.linalg.multi_dot(list(torch.linalg.matrix_exp(S)))
        (x @ R.T).square().sum().backward()
        torch.testing.assert_close(gU, U.grad, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(gV, V.grad, rtol=1e-9, atol=1e-11)


def test_gram_function_gradcheck() -> None:
    """The Gram function's hand-written backward, by ``torch.autograd.gradcheck`` (two layers, float64)."""
    torch.manual_seed(0)
    params = [torch.randn(2, 5, 2, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    assert torch.autograd.gradcheck(lambda *p: _Grams.apply(2, *p), params)

