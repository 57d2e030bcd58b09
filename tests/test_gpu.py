"""The GPU fast paths against their references (run on the GPU machine: ``pytest -m gpu``).

bf16 activations against float64 references: relative errors between 1e-3 and 1e-2 are bf16
rounding; float32 cores must match to float32 rounding. Inputs are fresh random draws.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import orthotune
from orthotune import batching
from orthotune.methods.loco import LoCO, LoCOConfig
from orthotune.ops import lowrank, skew

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
cuda = torch.device("cuda")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def test_one_form_bf16_against_float64() -> None:
    d, m, T = 2048, 32, 4096
    x = torch.randn(T, d, device=cuda)
    U, W = torch.randn(d, m, device=cuda) / d**0.5, torch.randn(m, d, device=cuda) / d**0.5
    g = torch.randn(T, d, device=cuda)
    xb, Ub, Wb = (t.bfloat16().requires_grad_() for t in (x, U, W))
    out = lowrank.rotate_rows(xb, Ub, Wb)
    out.backward(g.bfloat16())
    x64, U64, W64 = (t.double().requires_grad_() for t in (x, U, W))
    ref = x64 + (x64 @ W64.T) @ U64.T
    ref.backward(g.double())
    assert torch.isfinite(out).all()
    assert rel(out, ref) < 1e-2
    for a, b in ((xb, x64), (Ub, U64), (Wb, W64)):
        assert rel(a.grad, b.grad) < 2e-2


def test_batched_loco_cores_float32_on_gpu() -> None:
    """One batched call for 56 layers of two widths equals the per-layer cores and the float64 chain,
    and stays orthogonal, for large generators too (squarings: no fixed Taylor length would do)."""
    cfg = LoCOConfig(rank=4, chain_length=4, init_identity=False)
    mods = [LoCO(cfg, d, d, torch.empty(d, d, device=cuda)) for d in [256] * 48 + [704] * 8]
    with torch.no_grad():
        for i, mod in enumerate(mods):
            mod.U.mul_(1 + i / 4)  # generator norms from ~1 to ~15
    chunks = LoCO.step_cores(mods)
    assert sorted(len(idx) for idx, _ in chunks) == [8, 48]
    for indices, (U, W) in chunks:
        for j in (0, len(indices) - 1):
            m = mods[indices[j]]
            Ui, Wi = m.step_core()
            assert rel(U[j], Ui) < 1e-6 and rel(W[j], Wi) < 1e-5
            Uc, M, Vc = (t.double().cpu() for t in m.core())
            assert float(lowrank.orthogonality_error(Uc, M, Vc)) < 1e-5
            A, B, C = skew.skew_exp_factors(m.U.double().cpu(), m.V.double().cpu())
            U64, V64, M64 = skew.chain_core(A, B, C)
            assert rel(W[j].cpu(), M64 @ V64.T) < 1e-4


@pytest.mark.parametrize("name", ["loco", "lora", "loca", "oft", "hra"])
def test_bf16_model_batched_against_float32_reference(name: str) -> None:
    cfgs = {
        "loco": orthotune.LoCOConfig(target_modules=["a", "b", "c"], rank=4, chain_length=4, init_identity=False),
        "lora": orthotune.LoRAConfig(target_modules=["a", "b", "c"], r=16, init_identity=False),
        "loca": orthotune.LoCAConfig(target_modules=["a", "b", "c"], n_frequency=500, init_identity=False),
        "oft": orthotune.OFTConfig(target_modules=["a", "b", "c"], r=0, oft_block_size=32, init_identity=False),
        "hra": orthotune.HRAConfig(target_modules=["a", "b", "c"], r=8, init_identity=False),
    }
    torch.manual_seed(0)
    base = nn.ModuleDict(dict(a=nn.Linear(512, 512), b=nn.Linear(512, 512), c=nn.Linear(512, 1024)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = base["a"], base["b"], base["c"]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))

    ref = orthotune.get_model(Net().to(cuda), cfgs[name])
    fast = copy.deepcopy(ref).to(torch.bfloat16)
    for layer in fast.base_model.modules():
        for p in getattr(layer, "adapters", nn.ModuleDict()).parameters():
            p.data = p.data.float()  # adapter parameters float32 on a bf16 base (the default policy)
    x = torch.randn(8, 256, 512, device=cuda)
    y_ref = ref(x)
    y = fast(x.bfloat16())
    assert y.dtype == torch.bfloat16 and rel(y, y_ref) < 2e-2
    y_ref.pow(2).mean().backward()
    y.float().pow(2).mean().backward()
    for (n, a), (_, b) in zip(fast.named_parameters(), ref.named_parameters()):
        if a.requires_grad:
            assert a.grad.dtype == torch.float32 and rel(a.grad, b.grad) < 5e-2, n
    # LoCO, OFT, HRA: one call (one input width); LoRA: one per shape (a, b share one); LoCA: no per-step core
    assert batching.refresh(fast.base_model) == {"loco": 1, "lora": 2, "loca": 0, "oft": 1, "hra": 1}[name]
