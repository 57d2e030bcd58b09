"""``orthotune::expm`` and ``orthotune::cayley``: the custom ops the per-step cores use under ``torch.compile``.

``torch.linalg.matrix_exp`` syncs the host ~3 times per call on CUDA; the expm op keeps orthotune's
scaling and squaring (one host read) and is opaque to the compiler, with an exact backward. The
Cayley op pins the batched LU to cuSOLVER (capture-safe) and differentiates without a second solve.
"""

from __future__ import annotations

import pytest
import torch

from orthotune.ops import cayley, skew

f64 = torch.float64


def _mixed_norms(batch: int = 4, n: int = 6) -> torch.Tensor:
    """Generators from well below to well above 1-norm 1 (0 to 6 squarings)."""
    scales = torch.tensor([0.05, 1.0, 4.0, 20.0], dtype=f64)[:batch, None, None]
    return torch.randn(batch, n, n, dtype=f64, generator=torch.Generator().manual_seed(0)) * scales


def test_op_matches_matrix_exp_values_and_gradients() -> None:
    X = _mixed_norms().requires_grad_()
    G = torch.randn_like(X)
    ref = torch.linalg.matrix_exp(X)
    out = skew.expm_op(X)
    assert ((out - ref).abs().amax((-2, -1)) / ref.abs().amax((-2, -1))).max() < 1e-12
    (g,) = torch.autograd.grad(out, X, G)
    (g_ref,) = torch.autograd.grad(ref, X, G)
    assert ((g - g_ref).abs().amax((-2, -1)) / g_ref.abs().amax((-2, -1))).max() < 1e-11


def test_op_gradcheck_and_gradgradcheck_in_float64() -> None:
    X = (0.7 * _mixed_norms(3, 4)).requires_grad_()
    assert torch.autograd.gradcheck(skew.expm_op, (X,))
    assert torch.autograd.gradgradcheck(skew.expm_op, (X,))


def test_frechet_derivative_of_a_zero_direction_is_zero() -> None:
    """The direction is rescaled to ``X``'s norm; a zero direction (a layer without gradient) must stay 0, not NaN."""
    X = _mixed_norms()
    E = torch.zeros_like(X)
    E[1] = torch.randn(6, 6, dtype=f64)
    L = skew.expm_frechet(X, E)
    assert torch.equal(L[0], torch.zeros_like(L[0])) and L.isfinite().all()


def test_opcheck() -> None:
    torch.library.opcheck(skew.expm_op, (_mixed_norms().requires_grad_(),))
    torch.library.opcheck(skew.expm_op, (torch.randn(2, 3, 5, 5),))
    torch.library.opcheck(skew.expm_op, (torch.randn(3, 5, 5).mT,))  # a transposed input: the output is contiguous


def _compiled_targets(fn, backend: str, *args: torch.Tensor) -> tuple[torch.Tensor, list[str], object]:
    """``fn(*args)`` compiled whole (``fullgraph``) with ``backend``, the ops of the graphs it traced, the compiled ``fn``."""
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    compiled = torch.compile(fn, backend=capture, fullgraph=True)
    out = compiled(*args)
    return out, [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"], compiled


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_phi_compiles_whole_with_the_op_and_equals_eager(backend: str) -> None:
    """Under compile ``expm`` is the op (one node per batched core, no ``matrix_exp``), with no graph break."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    Z = _mixed_norms().float().requires_grad_()
    out, targets, compiled = _compiled_targets(lambda z: skew.phi(z).sum(), backend, Z)
    (g,) = torch.autograd.grad(out, Z)
    ref = skew.phi(Z).sum()
    (g_ref,) = torch.autograd.grad(ref, Z)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)
    assert sum("orthotune.expm" in t for t in targets) == 1 and not any("matrix_exp" in t for t in targets), targets
    assert not counters["graph_break"], dict(counters["graph_break"])
    compiled(Z * 2)  # new contents, same shape: no recompilation
    assert counters["stats"]["unique_graphs"] == 1


def _skew_blocks(n: int = 6, b: int = 8, dtype: torch.dtype = f64) -> torch.Tensor:
    W = torch.randn(n, b, b, dtype=dtype, generator=torch.Generator().manual_seed(1))
    return W - W.mT


def test_cayley_op_matches_the_solve_values_and_gradients() -> None:
    Q = _skew_blocks().requires_grad_()
    G = torch.randn_like(Q)
    ref = cayley._solve_cayley(Q)
    out = cayley.cayley_op(Q)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (g,), (g_ref,) = torch.autograd.grad(out, Q, G), torch.autograd.grad(ref, Q, G)
    torch.testing.assert_close(g, g_ref, rtol=1e-11, atol=1e-11)


def test_cayley_op_gradcheck_opcheck() -> None:
    X = (0.3 * torch.randn(3, 5, 5, dtype=f64)).requires_grad_()  # any I - X invertible, not only skew
    assert torch.autograd.gradcheck(cayley.cayley_op, (X,))
    assert torch.autograd.gradgradcheck(cayley.cayley_op, (X,))
    torch.library.opcheck(cayley.cayley_op, (_skew_blocks().requires_grad_(),))
    torch.library.opcheck(cayley.cayley_op, (_skew_blocks(dtype=torch.float32).mT,))


def test_eager_cayley_with_autograd_keeps_only_its_result_for_the_backward() -> None:
    """Eager training takes the op too: plain autograd through the solve kept ``I - Q``, ``I + Q``, the LU factors,
    the pivots and the result until the backward (OFT b32 peaked 3% above peft LoRA r16 for it,
    ``benchmarks/results/memory_probe/``); no grad: the plain solve."""
    Q = _skew_blocks(dtype=torch.float32).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        R = cayley.cayley(Q)
    assert [t.shape for t in saved] == [R.shape] and sum(t.numel() for t in saved) == R.numel()
    torch.testing.assert_close(R, cayley._solve_cayley(Q.detach()))
    with torch.no_grad():
        torch.testing.assert_close(cayley.cayley(Q), R)


def test_cayley_compiles_to_the_op_without_a_solve_in_the_graph() -> None:
    torch._dynamo.reset()
    Q = _skew_blocks(dtype=torch.float32).requires_grad_()
    out, targets, _ = _compiled_targets(lambda q: cayley.cayley(q).pow(2).sum(), "aot_eager", Q)
    (g,) = torch.autograd.grad(out, Q)
    ref = cayley.cayley(Q).pow(2).sum()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, torch.autograd.grad(ref, Q)[0], rtol=1e-4, atol=1e-4)
    assert sum("orthotune.cayley" in t for t in targets) == 1 and not any("solve" in t or "lu" in t for t in targets), targets


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ops_under_reduce_overhead_on_gpu() -> None:
    """Both ops inside inductor's CUDA graphs (OFT b32's batch of Cayley blocks, LoCO's cores): capturable, exact."""
    torch._dynamo.reset()
    Q = _skew_blocks(7 * 64, 32, torch.float32).cuda().mul_(0.1).requires_grad_()
    Z = _mixed_norms(4, 12).float().cuda().requires_grad_()

    def step(q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return cayley.cayley(q).pow(2).sum() + skew.phi(z).sum()

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        out = compiled(Q, Z)
        grads = torch.autograd.grad(out, (Q, Z))
    ref = step(Q, Z)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)
    for g, r in zip(grads, torch.autograd.grad(ref, (Q, Z))):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-3)
