"""Compiled serving: a no-grad forward in eval mode reads the frozen inference cores, computes none.

``model.eval()`` computes every adapter's core (and its layer's ``W0 U`` fold) eagerly, outside any
graph (:meth:`orthotune.layer.plan.Plan.freeze`); the compiled graph takes them as inputs. These tests
check that the compiled output equals the eager one for every contract case, that no ``cores()`` call is
traced into the no-grad graph, that the frozen cores follow training steps, adapter switches and loads
without recompiling the evaluation graph, and that a grad-enabled forward in eval mode still computes
its cores in the graph with the right gradients.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import orthotune
from orthotune.layer import plan as plans
from orthotune.methods.base import AdapterMethod
from orthotune.methods.registry import METHODS

from ..method_cases import CASES

WIDTH = 16
MLP_CASES = [c for c in CASES if "mlp" in c.models]


def _mlp(layers: int) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)]).double()


def _model(cases: list, layers: int = 3, spread: bool = False) -> orthotune.OrthoModel:
    """One adapter per case (named by its index) on every layer of a float64 MLP, all active; ``spread``: case
    ``i`` on layer ``i`` only (one layer per case)."""
    model = None
    layers = len(cases) if spread else layers
    for i, case in enumerate(cases):
        targets = [str(i)] if spread else [str(j) for j in range(layers)]
        config = METHODS[case.method][0](target_modules=targets, init_identity=False, **case.kwargs)
        if model is None:
            model = orthotune.get_model(_mlp(layers), config, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", config)
    model.set_adapter([f"a{i}" for i in range(len(cases))])
    return model.double()


def _fresh(model: orthotune.OrthoModel, x: torch.Tensor) -> torch.Tensor:
    """The eager no-grad output with every core computed anew (no kept or frozen core)."""
    plans.clear(model)
    with torch.no_grad():
        return model(x)


@pytest.fixture
def core_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The names of the method classes whose ``cores()`` runs (traced into a graph or eager)."""
    calls: list[str] = []
    for cls in {cls for _, cls in METHODS.values()}:
        own = cls.cores.__func__

        def counted(cls: type, modules: list[AdapterMethod], dtype: torch.dtype | None = None, own=own) -> list:
            calls.append(cls.__name__)
            return own(cls, modules, dtype)

        monkeypatch.setattr(cls, "cores", classmethod(counted))
    yield calls


@pytest.mark.parametrize("case", MLP_CASES, ids=lambda c: f"{c.method}-{'-'.join(f'{k}={v}' for k, v in c.kwargs.items())}")
def test_compiled_inference_reads_the_frozen_cores(case, core_calls: list[str]) -> None:
    model = _model([case])
    x = torch.randn(5, WIDTH, dtype=torch.float64)
    model.eval()
    frozen = [layer.frozen for _, layer in model.adapter_layers()]
    assert all("a0" in f for f in frozen), "eval() freezes every layer's core"
    reference = _fresh(model, x)
    model.eval()
    core_calls.clear()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        ys = compiled(x), compiled(x + 1)
    assert not core_calls, f"the compiled no-grad graph computed cores: {core_calls}"
    assert torch.allclose(ys[0], reference, rtol=0, atol=1e-12)
    assert torch.allclose(ys[1], _fresh(model.eval(), x + 1), rtol=0, atol=1e-12)
    assert counter.frame_count == 1

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(x).square().sum().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        y = compiled(x)
    assert torch.allclose(y, _fresh(model.eval(), x), rtol=0, atol=1e-12), "the frozen cores follow the training step"
    assert not torch.allclose(y, reference)
    assert counter.frame_count == 1, "refreshing the frozen cores recompiled the evaluation graph"


def test_rotation_folds_are_frozen_with_their_cores() -> None:
    """LoCO's compiled inference applies ``base(x) + ((x A) K^T) (W0 A)^T`` from the fold computed at ``eval()``."""
    model = _model([MLP_CASES[0]])
    assert MLP_CASES[0].method == "loco" and "mode" not in MLP_CASES[0].kwargs
    model.eval()
    for _, layer in model.adapter_layers():
        (K, A), fold = layer.frozen["a0"]
        assert torch.allclose(fold, layer.weight_matrix() @ A, rtol=0, atol=1e-12)
        assert layer.folds["a0"][0] is A  # the eager memo holds the same fold of the same core
    model.train()
    assert not any(layer.frozen for _, layer in model.adapter_layers()), "training mode drops the frozen cores"


@pytest.mark.slow  # ~40 s of CPU: a training and an evaluation trace of every contract case
def test_training_steps_and_eval_switches_recompile_nothing() -> None:
    """Compiled training steps between compiled evaluations: the eval graph is traced once and stays exact."""
    model = _model(MLP_CASES, spread=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, fused=False)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    xs = [torch.randn(4, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    for step, x in enumerate(xs):
        model.train()
        compiled(x).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            y = compiled(x)
        assert torch.allclose(y, _fresh(model.eval(), x), rtol=0, atol=1e-10), f"step {step}"
    assert counter.frame_count == 2, "one training and one evaluation graph, none recompiled"


def test_adapter_switches_and_loads_in_eval_mode_refresh(tmp_path) -> None:
    loco, lora = MLP_CASES[0], next(c for c in MLP_CASES if c.method == "lora")
    model = _model([loco, lora])
    model.eval()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(3, WIDTH, dtype=torch.float64)

    def check() -> torch.Tensor:
        with torch.no_grad():
            y = compiled(x)
        assert torch.allclose(y, _fresh(model.eval(), x), rtol=0, atol=1e-12)
        return y

    both = check()
    model.set_adapter("a1")
    only_lora = check()
    model.save_adapter(tmp_path / "saved", "a0")
    with torch.no_grad():
        for p in model.base_model[0].adapters["a0"].parameters():
            p.mul_(0.5)  # an in-place edit outside the API, on an inactive adapter
    model.set_adapter(["a0", "a1"])
    edited = check()
    model.load_adapter_weights(tmp_path / "saved", "a0")
    graphs = counter.frame_count
    assert torch.equal(check(), both), "loading weights refreshes the frozen cores"
    state = orthotune.get_peft_model_state_dict(model, adapter_name="a0")
    orthotune.set_peft_model_state_dict(model, {k: v * 0.5 for k, v in state.items()}, "a0")
    halved = check()
    assert not torch.allclose(halved, both) and not torch.allclose(halved, edited)
    assert counter.frame_count == graphs, "new adapter weights recompiled the evaluation graph"
    model.merge(["a0"])
    check()  # the merged weight: a new fold for the remaining adapter
    model.unmerge()
    assert torch.allclose(check(), halved, rtol=0, atol=1e-12)
    model.delete_adapter("a0")
    assert torch.allclose(check(), only_lora, rtol=0, atol=1e-12)


def test_edits_outside_the_api_reach_the_compiled_model_after_eval_or_an_eager_forward() -> None:
    model = _model([MLP_CASES[0]])
    model.eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(3, WIDTH, dtype=torch.float64)
    U = model.base_model[1].adapters["a0"].U
    with torch.no_grad():
        compiled(x)
        U.add_(0.1)
        eager = model(x)  # eager mode sees the bumped version counter and freezes again
        assert torch.allclose(compiled(x), eager, rtol=0, atol=1e-12)
        U.data.add_(0.1)  # bumps no version counter: model.eval() (or plan.clear) refreshes
        model.eval()
        assert torch.allclose(compiled(x), _fresh(model.eval(), x), rtol=0, atol=1e-12)
    model.to(torch.float32)  # the frozen cores follow the dtype
    assert all(layer.frozen["a0"][0][0].dtype == torch.float32 for _, layer in model.adapter_layers())
    with torch.no_grad():
        assert torch.allclose(compiled(x.float()), model(x.float()), atol=1e-5)


def test_grad_enabled_inference_computes_cores_in_the_graph(core_calls: list[str]) -> None:
    """Attribution or gradient-based selection in eval mode: the frozen cores carry no gradient, so unused."""
    model = _model([MLP_CASES[0], next(c for c in MLP_CASES if c.method == "hra")])
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(3, WIDTH, dtype=torch.float64)
    eager = torch.autograd.grad(model(x).square().sum(), params)
    torch._dynamo.reset()
    core_calls.clear()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    grads = torch.autograd.grad(compiled(x).square().sum(), params)
    assert set(core_calls) >= {"LoCO", "HRA"}
    assert all(torch.allclose(g, e, rtol=0, atol=1e-10) for g, e in zip(grads, eager))


def test_eager_inference_uses_the_frozen_cores_until_an_edit() -> None:
    """One set of inference cores: the eager memo is the frozen cores, checked by version counters."""
    model = _model([MLP_CASES[0]])
    model.eval()
    layer = model.base_model[2]
    core = layer.frozen["a0"][0]
    with torch.no_grad():
        assert model.plan.start(model.base_model) == 0  # current: nothing computed
        assert layer.frozen["a0"][0] is core
        model.plan.end()
        layer.adapters["a0"].U.add_(0.1)
        assert model.plan.start(model.base_model) == 1  # stale: frozen again, in one batched call
        model.plan.end()
    assert layer.frozen["a0"][0] is not core
    assert torch.allclose(layer.frozen["a0"][1], layer.weight_matrix() @ layer.frozen["a0"][0][1], rtol=0, atol=1e-12)


def test_training_in_eval_mode_drops_the_frozen_cores() -> None:
    """A grad-enabled step without ``train()``: the optimizer changes the parameters, so the frozen cores go."""
    model = _model([MLP_CASES[0]])
    model.eval()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, WIDTH, dtype=torch.float64)
    with torch.no_grad():
        before = compiled(x)
    compiled(x).square().sum().backward()
    opt.step()
    assert not any(layer.frozen for _, layer in model.adapter_layers())
    with torch.no_grad():
        after = compiled(x)
    reference = _fresh(model, x)
    assert torch.allclose(after, reference, rtol=0, atol=1e-12) and not torch.allclose(after, before)
    assert all(layer.frozen for _, layer in model.adapter_layers())  # model.eval() (here via plan.clear) freezes again
