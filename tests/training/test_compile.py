"""Every registered method under ``torch.compile(fullgraph=True)``: one graph per mode, no recompilation.

A compiled step must trace as one graph (a graph break raises under ``fullgraph``) and must
not recompile across steps, batch contents or ``train()``/``eval()`` switches at fixed shapes: after
one compilation per mode (training with gradients, evaluation without), alternating modes and
batches adds no graph. ``aot_eager`` traces forward and backward exactly as inductor would receive
them, without inductor's C++ build (minutes on CPU). All contract cases are active together on one
tiny Llama (one adapter per case, spread over the projections), so one trace covers every method.
"""

from __future__ import annotations

import pytest
import torch

import orthotune
from orthotune.methods.base import AdapterMethod
from orthotune.methods.registry import METHODS

from ..method_cases import CASES, adapter_per_case

transformers = pytest.importorskip("transformers")

LAYERS = 1
SLOTS = [f"model.layers.{i}.{block}.{p}" for i in range(LAYERS)
         for block, projections in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
         for p in projections]


def _model_with_every_case() -> tuple[orthotune.OrthoModel, list[str]]:
    """A tiny Llama carrying each linear-layer contract case as its own adapter on one projection, all active."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=LAYERS, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    base = transformers.LlamaForCausalLM(cfg)
    return adapter_per_case(base, [c for c in CASES if "mlp" in c.models], SLOTS)


@pytest.mark.slow  # ~70 s of CPU: two traces (forward and backward, then evaluation) of 23 adapters
def test_every_method_compiles_to_one_graph_per_mode_without_recompiling() -> None:
    from torch._dynamo.utils import counters

    model, names = _model_with_every_case()
    assert {n.split("_", 1)[1] for n in names} == set(METHODS), "every registered method is in the compiled model"
    batches = [torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-2)

    model.train()
    eager_loss = model(input_ids=batches[0], labels=batches[0]).loss
    eager_grads = torch.autograd.grad(eager_loss, params)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)

    def train_step(ids: torch.Tensor) -> torch.Tensor:
        model.train()
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def eval_step(ids: torch.Tensor) -> None:
        model.eval()
        with torch.no_grad():
            compiled(input_ids=ids, labels=ids)

    model.train()
    loss = compiled(input_ids=batches[0], labels=batches[0]).loss
    assert torch.allclose(loss, eager_loss, atol=1e-6)
    for g, e in zip(torch.autograd.grad(loss, params), eager_grads):
        assert torch.allclose(g, e, atol=1e-6)
    eval_step(batches[0])  # the second mode: its own graph
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2, f"expected one graph for training and one for evaluation, got {graphs}"

    for ids in batches:  # steps, new batch contents, parameter updates, mode switches
        train_step(ids)
        eval_step(ids)
    assert counters["stats"]["unique_graphs"] == graphs, "a step recompiled (run with TORCH_LOGS=recompiles)"
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_step_uses_the_planned_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan traces into the graph: no layer of a batched method computes its own core there (one
    adapter per registered method, each on its own layer of a small MLP, all active)."""
    torch.manual_seed(0)
    width = 16
    cases = list({c.method: c for c in CASES if "mlp" in c.models}.values())
    base = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in cases])
    model, names = None, []
    for i, case in enumerate(cases):
        config = METHODS[case.method][0](target_modules=[str(i)], init_identity=False, **case.kwargs)
        if model is None:
            model = orthotune.get_model(base, config, adapter_name=case.method)
        else:
            model.add_adapter(case.method, config)
        names.append(case.method)
    model.set_adapter(names)
    assert set(names) == set(METHODS)
    fallbacks: list[str] = []  # methods whose layer computed its own core (when traced) instead of the plan's
    own_core = AdapterMethod.core

    def counted(self: AdapterMethod, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
        fallbacks.append(type(self).__name__)
        return own_core(self, dtype)

    monkeypatch.setattr(AdapterMethod, "core", counted)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, width)
    y = compiled(x)
    y.square().sum().backward()
    per_layer = {type(m).__name__ for _, layer in model.adapter_layers() for m in layer.adapters.values() if m.core_key() is None}
    batched = {type(m).__name__ for _, layer in model.adapter_layers() for m in layer.adapters.values()} - per_layer
    assert {"LoCO", "LoRA", "OFT", "HRA"} <= batched
    assert set(fallbacks) <= per_layer, f"compiled step used per-layer cores of batched methods: {set(fallbacks) - per_layer}"
    assert not any(layer.planned for _, layer in model.adapter_layers())  # under compile the plan ends with the forward


def test_taylor_expm_with_fixed_squarings_traces_into_one_graph() -> None:
    """The host-read-free ``expm`` (what a compiled per-step plan uses for LoCO) compiles whole and stays exact."""
    from orthotune.ops import skew

    torch._dynamo.reset()
    X = torch.randn(4, 6, 6, dtype=torch.float64) * torch.tensor([0.1, 1.0, 4.0, 20.0], dtype=torch.float64)[:, None, None]
    compiled = torch.compile(lambda x: skew.taylor_expm(x, skew.CAPTURED_SQUARINGS), backend="aot_eager", fullgraph=True)
    ref = torch.linalg.matrix_exp(X)
    assert ((compiled(X) - ref).abs().amax((-2, -1)) / ref.abs().amax((-2, -1))).max() < 1e-12


@pytest.mark.parametrize("autocast", [False, True])
def test_cores_trace_in_one_graph_under_autocast(autocast: bool) -> None:
    """A core computed by its layer (LoCA: no batched plan) and a planned core (LoCO) trace in one graph with
    ``torch.autocast`` on or off: the cores' full-precision guard is plain traceable code."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    model = orthotune.get_model(base, orthotune.LoCAConfig(target_modules=["0"], n_frequency=20, init_identity=False))
    model.add_adapter("rot", orthotune.LoCOConfig(target_modules=["1"], rank=2, init_identity=False))
    model.set_adapter(["default", "rot"])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # a graph break raises
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        want, got = model(x), compiled(x)
    got.float().sum().backward()
    assert torch.allclose(got.float(), want.float(), atol=1e-2 if autocast else 1e-6)
