"""CPU check behind call23: does ``compile_settings`` (dynamo's skip_fwd_side_effects_in_bwd_under_checkpoint) change
the compiled graphs of checkpointed LoCO layers on an NF4 base? Two blocks (gate/up/down NF4 linears, LoCO r4 on each),
each calling ``torch.utils.checkpoint`` inside its compiled forward, as a transformers decoder layer does; two training
steps with and without the setting; prints the forward and backward graphs' op counts and whether they are equal.

    python benchmarks/results/quantized/call23/graphs_cpu.py
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch
import torch.utils.checkpoint as cp
from torch import nn
from torch._functorch.aot_autograd import aot_module_simplified
from functorch.compile import make_boxed_func

import orthotune
from orthotune.training.graphs import compile_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/
from quantized import nf4_linear  # noqa: E402


class MLP(nn.Module):
    def __init__(self, d: int = 128, h: int = 256) -> None:
        super().__init__()
        self.gate, self.up, self.down = (nn.Linear(a, b, bias=False) for a, b in ((d, h), (d, h), (h, d)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cp.checkpoint(self.mlp, x, use_reentrant=False)


def graphs(setting: bool) -> list[tuple[str, collections.Counter]]:
    torch.manual_seed(0)
    blocks = nn.Sequential(Checkpointed(), Checkpointed())
    for block in blocks:
        for name in ("gate", "up", "down"):
            setattr(block.mlp, name, nf4_linear(getattr(block.mlp, name), torch.bfloat16))
    model = orthotune.get_model(blocks, orthotune.LoCOConfig(target_modules=["gate", "up", "down"], rank=4))
    seen: list[tuple[str, collections.Counter]] = []

    def recorder(kind: str):
        def compiler(gm: torch.fx.GraphModule, inputs: list) -> object:
            seen.append((kind, collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")))
            return make_boxed_func(gm.forward)
        return compiler

    def backend(gm: torch.fx.GraphModule, inputs: list) -> object:
        return aot_module_simplified(gm, inputs, fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))

    torch._dynamo.reset()
    for block in blocks:
        block.compile(backend=backend)
    x = torch.randn(2, 16, 128, requires_grad=True)
    for _ in range(2):
        with compile_settings(setting):
            loss = model(x).float().pow(2).mean()
        loss.backward()
    return seen


def main() -> None:
    on, off = graphs(True), graphs(False)
    for label, g in (("with compile_settings", on), ("without", off)):
        print(label, [(kind, sum(c.values())) for kind, c in g])
    print("op for op the same:", on == off)


if __name__ == "__main__":
    main()
