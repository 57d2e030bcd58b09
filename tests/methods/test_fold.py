"""``compute="weight"``: a full-support structured transform folded into the frozen weight per call
(``y = x (W0 T)^T``) computes the activation path's function and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthotune

f64 = torch.float64
TARGETS = ["0", "2"]
CONFIGS = {
    "oft": lambda **kw: orthotune.OFTConfig(target_modules=TARGETS, r=0, oft_block_size=4, init_identity=False, **kw),
    "oft-neumann": lambda **kw: orthotune.OFTConfig(target_modules=TARGETS, r=0, oft_block_size=4, use_cayley_neumann=True,
                                                    init_identity=False, **kw),
    "boft": lambda **kw: orthotune.BOFTConfig(target_modules=TARGETS, boft_block_size=2, boft_n_butterfly_factor=2,
                                              init_identity=False, **kw),
    "goft": lambda **kw: orthotune.GOFTConfig(target_modules=TARGETS, init_identity=False, **kw),
    "loft-full-cayley": lambda **kw: orthotune.LOFTConfig(target_modules=TARGETS, support="full", transform="cayley",
                                                          block_size=8, init_identity=False, **kw),
}


def _model(compute: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8)).to(f64)
    torch.manual_seed(1)
    return orthotune.get_model(base, CONFIGS[name](compute=compute))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_weight_path_equals_activation_path(name: str) -> None:
    x = torch.randn(5, 16, dtype=f64)
    results = []
    for compute in ("activations", "weight"):
        model = _model(compute, name)
        out = model(x)
        out.square().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.detach(), grads))
    (a, ga), (w, gw) = results
    assert torch.allclose(a, w, atol=1e-12)
    assert ga.keys() == gw.keys() and ga
    for n in ga:
        assert torch.allclose(ga[n], gw[n], atol=1e-10), n
