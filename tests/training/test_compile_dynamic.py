"""Every registered method compiled (``fullgraph=True``) on varying sequence lengths: a bounded number of graphs.

Training steps (forward and backward) run at sequence lengths 5, 7, 12 (and 9, 16 in the slow test). With
``dynamic=True`` the first graph is already symbolic in the length: no recompilation at all. With the default
``dynamic=None`` (automatic dynamic shapes) the first graph is specialised and the second length recompiles
once into a symbolic one; no later length adds a graph. A method that read the length as a Python int
(``x.shape`` into a core, ``.item()``, a branch on the length) would recompile per length and fail here.
"""

from __future__ import annotations

import pytest
import torch

import orthotune
from orthotune.methods.registry import METHODS

from ..method_cases import CASES, Case, adapter_per_case

WIDTH = 16
#: PiSSA on its residual base (plain LoRA's core and update, one adapter per layer: not a contract case)
RESIDUAL_PISSA = Case("pissa", dict(r=4, lora_alpha=8, residual_base=True), lambda i, o: 4 * (i + o))


def _stacked(cases: list) -> orthotune.OrthoModel:
    """A stack of linear layers, each carrying one case as its own adapter, all active, in training mode."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in cases])
    model, _ = adapter_per_case(base, cases, [str(i) for i in range(len(cases))])
    model.train()
    return model


def _graphs_over_lengths(model: orthotune.OrthoModel, backend: str, dynamic: bool | None, lengths: tuple[int, ...]) -> list[int]:
    """Unique graphs compiled after each training step at each length, checked against eager on the way."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)
    params = [p for p in model.parameters() if p.requires_grad]
    graphs = []
    for T in lengths:
        x = torch.randn(2, T, WIDTH, generator=torch.Generator().manual_seed(T))
        loss = compiled(x).square().mean()
        grads = torch.autograd.grad(loss, params)
        eager_loss = model(x).square().mean()
        assert torch.allclose(loss, eager_loss, atol=1e-6), T
        for g, e in zip(grads, torch.autograd.grad(eager_loss, params)):
            assert torch.allclose(g, e, atol=1e-6), T
        graphs.append(counters["stats"]["unique_graphs"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    return graphs


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "automatic"])
def test_every_method_compiles_sequence_lengths_into_one_or_two_graphs(dynamic: bool | None) -> None:
    """One adapter per registered method (dynamo with the eager backend: seconds per trace)."""
    cases = [*{c.method: c for c in CASES if "mlp" in c.models}.values(), RESIDUAL_PISSA]
    assert {c.method for c in cases} == set(METHODS)
    graphs = _graphs_over_lengths(_stacked(cases), "eager", dynamic, (5, 7, 12))
    assert graphs == ([1, 1, 1] if dynamic else [1, 2, 2]), f"graphs after each length: {graphs} (TORCH_LOGS=recompiles)"


@pytest.mark.slow  # ~90 s of CPU (idle; 3 min under load): aot_eager traces the symbolic backward of 25 adapters
def test_every_case_traces_a_symbolic_backward_without_recompiling() -> None:
    """Every contract case under aot_eager (forward and backward as inductor receives them), ``dynamic=True``."""
    cases = [*(c for c in CASES if "mlp" in c.models), RESIDUAL_PISSA]
    graphs = _graphs_over_lengths(_stacked(cases), "aot_eager", True, (5, 7, 9, 12, 16))
    assert graphs == [1] * 5, f"graphs after each length: {graphs} (TORCH_LOGS=recompiles)"
