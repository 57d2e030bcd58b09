"""The model's per-step plan (orthotune.layer.plan) against the per-layer path, and the fused one form.

The planned (batched) cores must compute the same function with the same gradients as each layer's
own ``core()``, for every method that batches; the plan must never serve stale cores.
"""

from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch
from torch import nn

import orthotune
from orthotune.layer import plan as plans
from orthotune.layer.adapter_layer import FrozenBase
from orthotune.methods.base import Base
from orthotune.methods.loco import LoCO
from orthotune.ops import lowrank, skew

f64 = torch.float64


class Stack(nn.Module):
    """Layers sharing shapes (batched together) and one of another shape."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(12, 12) for _ in range(3)])
        self.wide = nn.Linear(12, 20)
        self.out = nn.Linear(20, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.out(torch.tanh(self.wide(x)))


TARGETS = ["blocks.0", "blocks.1", "blocks.2", "wide", "out"]
CONFIGS = {
    "loco-exact": lambda: orthotune.LoCOConfig(target_modules=TARGETS, rank=2, chain_length=3, init_identity=False),
    "loco-sequential": lambda: orthotune.LoCOConfig(target_modules=TARGETS, rank=1, chain_length=3, mode="sequential", init_identity=False),
    "loco-approx": lambda: orthotune.LoCOConfig(target_modules=TARGETS, rank=2, chain_length=2, mode="approx", init_identity=False),
    "lora": lambda: orthotune.LoRAConfig(target_modules=TARGETS, r=3, lora_alpha=6, init_identity=False),
    "oft": lambda: orthotune.OFTConfig(target_modules=TARGETS, r=0, oft_block_size=4, init_identity=False),
    "oft-neumann": lambda: orthotune.OFTConfig(target_modules=TARGETS, r=0, oft_block_size=4, use_cayley_neumann=True, init_identity=False),
    "boft": lambda: orthotune.BOFTConfig(target_modules=TARGETS, boft_block_size=2, boft_n_butterfly_factor=2, init_identity=False),
    "hra": lambda: orthotune.HRAConfig(target_modules=TARGETS, r=2, init_identity=False),
    "hra-gs": lambda: orthotune.HRAConfig(target_modules=TARGETS, r=2, apply_GS=True, init_identity=False),
    "goft": lambda: orthotune.GOFTConfig(target_modules=TARGETS, init_identity=False),
    "psoft": lambda: orthotune.PSOFTConfig(target_modules=TARGETS, r=4, init_identity=False),
    "psoft-neumann": lambda: orthotune.PSOFTConfig(target_modules=TARGETS, r=4, use_cayley_neumann=True, cayley_neumann_eps=0.5,
                                                   psoft_mag_a=False, init_identity=False),
    "loft-principal": lambda: orthotune.LOFTConfig(target_modules=TARGETS, support="principal", r=4, init_identity=False),
    "loft-random-givens": lambda: orthotune.LOFTConfig(target_modules=TARGETS, support="random", r=4, transform="givens", init_identity=False),
    "loca": lambda: orthotune.LoCAConfig(target_modules=TARGETS, n_frequency=20, init_identity=False),
    "loft-full-exp": lambda: orthotune.LOFTConfig(target_modules=TARGETS, support="full", transform="exp", generator_rank=2,
                                                  chain_length=2, init_identity=False),
}
#: batched calls per forward on Stack (blocks 12->12 x3, wide 12->20, out 20->12): one per core key
CALLS = {"lora": 3, "loca": 1, "loco-exact": 1, "loco-sequential": 1, "loco-approx": 1, "loft-principal": 2, "loft-random-givens": 2}


def pair(name: str):
    """(batched model, per-layer model): identical parameters, the second without the hook."""
    torch.manual_seed(0)
    model = orthotune.get_model(Stack().double(), CONFIGS[name]())
    model.double()
    reference = copy.deepcopy(model)
    reference.base_model._forward_pre_hooks.clear()
    reference.base_model._forward_hooks.clear()
    return model, reference


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batched_equals_per_layer_outputs_and_gradients(name: str) -> None:
    model, reference = pair(name)
    x = torch.randn(2, 5, 12, dtype=f64)
    # LoCO, LoCA: one call for every width; LoRA: one per shape; LOFT: one per transform shape and width
    assert model.plan.start(model.base_model) == CALLS.get(name, 2)
    y, y_ref = model(x), reference(x)
    assert torch.equal(y, y_ref)
    y.pow(2).sum().backward()
    y_ref.pow(2).sum().backward()
    g, g_ref = grads(model), grads(reference)
    assert g.keys() == g_ref.keys() and len(g) >= 5
    for n in g:
        assert torch.equal(g[n], g_ref[n]), n
        assert g[n].abs().sum() > 0, n


@pytest.mark.parametrize("mode", ["exact", "approx", "sequential"])
def test_batched_loco_cores_match_the_chain_reference(mode: str) -> None:
    """Gram matrices per width, phi and the chain once for all: equal to each layer's closed-form core."""
    torch.manual_seed(1)
    cfg = orthotune.LoCOConfig(rank=2, chain_length=3, mode=mode, init_identity=False)
    mods = [LoCO(cfg, d, d, torch.empty(d, d, dtype=f64)).double() for d in (10, 16, 10, 7)]
    with torch.no_grad():
        for i, m in enumerate(mods):
            m.U.mul_(3.0 * i)  # generator norms from 0 to ~10
    cores = LoCO.cores(mods)
    assert len(cores) == len(mods)
    for m, core in zip(mods, cores):
        U, MVt = m.one_form(core)
        A, B, C = m.factors()
        if mode == "sequential":
            assert torch.allclose(U, A) and torch.allclose(MVt, C @ B.transpose(-1, -2), atol=1e-12)
        else:
            Uc, Vc, M = skew.sum_exp_core(A, B) if mode == "approx" else skew.chain_core(A, B, C)
            assert torch.allclose(U, Uc) and torch.allclose(MVt, M @ Vc.T, atol=1e-12)


def test_gradient_accumulation_and_spent_cores() -> None:
    model, reference = pair("loco-exact")
    xs = [torch.randn(4, 12, dtype=f64) for _ in range(2)]
    for x in xs:  # two micro-batches: every forward computes its own cores
        model(x).sum().backward()
        reference(x).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(grads(model).values(), grads(reference).values()))
    # a direct layer call after backward must not reuse the spent (freed) graph
    layer = model.base_model.blocks[0]
    layer(xs[0]).sum().backward()


def test_inference_reuses_cores_until_parameters_change() -> None:
    model, _ = pair("loco-exact")
    x = torch.randn(3, 12, dtype=f64)
    with torch.no_grad():
        assert model.plan.start(model.base_model) == 1
        assert model.plan.start(model.base_model) == 0
        before = model(x)
        method = model.base_model.blocks[1].adapters["default"]
        method.U.add_(0.1)  # any in-place update bumps the version counter
        assert model.plan.start(model.base_model) == 1
        after = model(x)
    assert not torch.allclose(before, after)
    model.base_model._forward_pre_hooks.clear()
    plans.clear(model.base_model)
    with torch.no_grad():
        assert torch.equal(model(x), after)


def test_direct_layer_call_after_an_update_sees_new_parameters() -> None:
    model, _ = pair("loco-exact")
    x = torch.randn(3, 12, dtype=f64)
    layer = model.base_model.blocks[1]
    with torch.no_grad():
        model(x)  # caches the cores
        layer.adapters["default"].U.add_(0.1)  # an update after the forward
        direct = layer(x)  # no hook runs here: the kept core must not be served
        plans.clear(model.base_model)
        assert torch.equal(layer(x), direct)


@pytest.mark.parametrize("fused", [False, True])
def test_training_step_then_eval_sees_new_parameters(fused: bool) -> None:
    """A fused optimizer updates parameters without bumping their version counters: still no stale core."""
    model, reference = pair("lora")
    x = torch.randn(3, 12, dtype=f64)
    for m in (model, reference):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.1, fused=fused)
        with torch.no_grad():
            m(x)  # an evaluation first: its cores are reusable for inference
        m(x).pow(2).sum().backward()
        opt.step()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("scale", [1e-3, 0.5, 4.0, 60.0])
def test_expm_matches_matrix_exp(scale: float) -> None:
    X = torch.randn(5, 9, 9, dtype=f64) * scale / 3
    ref = torch.linalg.matrix_exp(X)
    assert ((skew.expm(X) - ref).abs().max() / ref.abs().max()) < 1e-12
    S = X - X.transpose(-1, -2)  # skew: exp is orthogonal, float32 keeps it to rounding
    E = skew.expm(S.float()).double()
    assert (E.transpose(-1, -2) @ E - torch.eye(9, dtype=f64)).abs().max() < 1e-5 * max(1.0, scale)
    assert skew.expm(torch.full((2, 3, 3), float("nan"))).isnan().all()


def test_expm_with_fixed_squarings_as_under_graph_capture() -> None:
    """The capture path (no host read): the same values within its bound, NaN (not a wrong value) beyond it."""
    X = torch.randn(4, 7, 7, dtype=f64) * torch.tensor([1e-3, 1.0, 30.0, 1e3], dtype=f64)[:, None, None]
    ref = torch.linalg.matrix_exp(X[:3])
    out = skew.expm(X, max_squarings=8)
    assert ((out[:3] - ref).abs().amax((-1, -2)) / ref.abs().amax((-1, -2))).max() < 1e-12
    assert out[3].isnan().all()  # 1-norm ~ 1e3 * 7 needs 13 squarings: flagged, not truncated
    assert torch.equal(skew.expm(X[:3], max_squarings=skew.CAPTURED_SQUARINGS), skew.expm(X[:3]))  # masked: bit-identical


def test_the_loco_math_keeps_no_tensor_after_it_returns() -> None:
    """What ``orthotune.ops.skew`` makes in a call dies with the call: a cached constant first made while a CUDA-graph
    tree warms up lives in that graph's pool untracked and breaks the capture (``benchmarks/results/compiled/README.md``,
    calls 7 and 8: a fresh process's first LoCO step under ``reduce-overhead`` failed so)."""
    U, V = torch.randn(2, 3, 17, 5, dtype=f64).unbind(0)
    X = torch.randn(4, 11, 11, dtype=f64)
    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}
    out = [skew.expm(X), skew.phi(X), skew.chain_core(*skew.skew_factors(U, V), skew.phi(torch.randn(3, 10, 10, dtype=f64)))]
    del out
    gc.collect()
    assert [tuple(o.shape) for o in gc.get_objects() if isinstance(o, torch.Tensor) and id(o) not in before] == []


def test_disabled_merged_and_unloaded_models() -> None:
    model, _ = pair("loco-exact")
    x = torch.randn(3, 12, dtype=f64)
    plain = copy.deepcopy(model.base_model)
    with model.disable_adapter():
        assert model.plan.start(model.base_model) == 0
    model.merge()
    assert model.plan.start(model.base_model) == 0
    y = model(x)
    base = model.merge_and_unload()
    assert any(getattr(fn, "__self__", None) is model.plan for fn in base._forward_pre_hooks.values())
    assert torch.allclose(base(x), y)  # the hook finds no adapter layer and removes itself
    assert not base._forward_pre_hooks and not base._forward_hooks
    del plain


def test_two_adapters_and_pickling() -> None:
    model, _ = pair("loco-exact")
    model.add_adapter("other", CONFIGS["lora"]())
    model.set_adapter(["default", "other"])
    model.double()
    x = torch.randn(3, 12, dtype=f64)
    assert model.plan.start(model.base_model) == 4
    y = model(x)
    again = pickle.loads(pickle.dumps(model))
    assert torch.equal(again(x), y)
    assert torch.equal(copy.deepcopy(model)(x), y)


@pytest.mark.parametrize("shape", [(7, 10), (2, 3, 10)])
def test_one_form_matches_reference_and_gradcheck(shape: tuple[int, ...]) -> None:
    d, m = 10, 4
    x = torch.randn(*shape, dtype=f64, requires_grad=True)
    U, V, M = (torch.randn(d, m, dtype=f64), torch.randn(d, m, dtype=f64), torch.randn(m, m, dtype=f64))
    MVt = M @ V.T
    assert torch.allclose(lowrank.rotate_rows(x, U, MVt), lowrank.apply_rows(x, U, M, V), atol=1e-12)
    params = (x, U.requires_grad_(), MVt.requires_grad_())
    assert torch.autograd.gradcheck(lowrank.rotate_rows, params)
    y = torch.randn(*shape[:-1], 6, dtype=f64, requires_grad=True)
    A, B = torch.randn(m, d, dtype=f64, requires_grad=True), torch.randn(6, m, dtype=f64, requires_grad=True)
    assert torch.allclose(lowrank.add_lowrank(y, x, A, B), y + (x @ A.T) @ B.T, atol=1e-12)
    assert torch.autograd.gradcheck(lowrank.add_lowrank, (y, x, A, B))
    xt = torch.randn(10, 5, dtype=f64).T  # non-contiguous input
    assert torch.allclose(lowrank.rotate_rows(xt, U, MVt), xt + (xt @ MVt.T) @ U.T, atol=1e-12)


@pytest.mark.parametrize("method", ["loca", "fourierft"])
def test_spectral_update_folded_into_the_weight(method: str) -> None:
    torch.manual_seed(0)
    cfg_cls = orthotune.LoCAConfig if method == "loca" else orthotune.FourierFTConfig
    models = {}
    for compute in ("dense", "lowrank"):
        torch.manual_seed(0)
        base = Stack().double()
        models[compute] = orthotune.get_model(base, cfg_cls(target_modules=TARGETS, n_frequency=30, compute=compute, init_identity=False))
        models[compute].double()
    x = torch.randn(4, 12, dtype=f64)
    y_dense, y_low = models["dense"](x), models["lowrank"](x)
    assert torch.allclose(y_dense, y_low, atol=1e-12)
    y_dense.pow(2).sum().backward()
    y_low.pow(2).sum().backward()
    for (n, a), (_, b) in zip(models["dense"].named_parameters(), models["lowrank"].named_parameters()):
        if a.requires_grad:
            assert torch.allclose(a.grad, b.grad, atol=1e-10), n
    layer = models["dense"].base_model.wide
    assert FrozenBase(layer, "default").weight.data_ptr() == layer.weight.data_ptr()
    assert Base(layer._base_no_bias).weight is None


def test_training_cores_live_until_their_backward() -> None:
    """A training forward leaves its cores in the layers (checkpoint recomputes read them) until its backward."""
    model, _ = pair("loco-exact")
    x = torch.randn(3, 12, dtype=f64)
    layers = [layer for _, layer in model.adapter_layers()]
    y = model(x)
    planned = [layer.planned["default"] for layer in layers]
    assert all(len(core) == 3 for core in planned)  # (K, U, V)
    model.base_model.blocks[0](x)  # a call without the plan (a recompute) reads the same cores
    assert all(layer.planned["default"] is core for layer, core in zip(layers, planned))
    y.sum().backward()
    assert not any(layer.planned for layer in layers)  # consumed: a later call computes its own
    model(x)
    assert all(layer.planned["default"] is not core for layer, core in zip(layers, planned))  # never reused


def test_inference_cores_are_handed_out_per_forward_and_folds_memoised_in_the_layer() -> None:
    model, _ = pair("loco-exact")
    x = torch.randn(3, 12, dtype=f64)
    layer = model.base_model.blocks[1]
    with torch.no_grad():
        y = model(x)
        assert not layer.planned  # inference cores are held by the plan between forwards, not by the layers
        U, key, W0U = layer.folds["default"]
        assert torch.equal(model(x), y)
        assert layer.folds["default"][2] is W0U  # same core, same weight: the fold is reused
        layer.weight.mul_(2.0)  # the base weight changed: a new fold
        y2 = model(x)
        assert layer.folds["default"][2] is not W0U
        W0U = layer.folds["default"][2]
        layer.adapters["default"].U.add_(0.1)  # the core changed: a new fold
        y3 = model(x)
        assert layer.folds["default"][2] is not W0U
        plans.clear(model.base_model)
        assert not layer.folds and torch.equal(model(x), y3)
    assert not torch.equal(y, y2) and not torch.equal(y2, y3)


def test_a_layer_alone_computes_the_same_core_as_the_plan() -> None:
    model, _ = pair("oft")
    x = torch.randn(3, 12, dtype=f64)
    layer = model.base_model.blocks[0]
    y = model(x)  # planned
    planned = layer.planned["default"]
    own = layer.adapters["default"].core(f64)
    assert all(torch.equal(a, b) for a, b in zip(planned, own))
    y.sum().backward()


@pytest.mark.parametrize("name", ["lora", "loco", "oft", "loft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_leaves_no_hook_on_parameters_and_frees_deleted_models(name: str, dtype: torch.dtype) -> None:
    """A training forward's cores are released without keeping anything alive: no hook stays on a parameter,
    and a deleted model is collected, also after a forward whose backward never ran (the release hook lives
    in autograd's C++ hook table, where a strong reference to the layers was never collected)."""
    import gc
    import weakref

    from orthotune.layer.adapter_layer import AdapterLayer

    configs = {"lora": orthotune.LoRAConfig(target_modules=TARGETS, r=2),
               "loco": orthotune.LoCOConfig(target_modules=TARGETS, rank=2, chain_length=2),
               "oft": orthotune.OFTConfig(target_modules=TARGETS, r=0, oft_block_size=4),
               "loft": orthotune.LOFTConfig(target_modules=TARGETS, support="random", r=4)}
    torch.manual_seed(0)
    model = orthotune.get_model(Stack().to(dtype), configs[name])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(3, 12, dtype=dtype)
    for _ in range(3):
        model(x).float().sum().backward()
        opt.step()
    model(x)  # no backward follows
    assert all(not p._backward_hooks for p in model.parameters())
    layers = [weakref.ref(m) for m in model.modules() if isinstance(m, AdapterLayer)]
    del model, opt
    gc.collect()
    assert layers and all(ref() is None for ref in layers)
