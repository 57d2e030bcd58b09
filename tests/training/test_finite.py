"""NaN/Inf detection: named by layer, adapter and parameter; caught before the optimizer writes it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthotune
from orthotune import LoCOConfig, LoRAConfig

from ..conftest import MLP


def adapted(**kwargs) -> orthotune.OrthoModel:
    cfg = LoCOConfig(target_modules=["lin0", "lin1", "lin2"], rank=2, init_identity=False, modules_to_save=["head"], **kwargs)
    return orthotune.get_model(MLP(), cfg)


def test_finite_model_passes_and_each_bad_tensor_is_named() -> None:
    model = adapted()
    x = torch.randn(4, 16)
    loss = model(x).pow(2).mean()
    loss.backward()
    orthotune.check_finite(model, loss)

    layer = dict(model.adapter_layers())["lin1"]
    with torch.no_grad():
        layer.adapters["default"].U[1, 2, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"at step 7 in layer 'lin1', adapter 'default', parameter 'U' \(NaN in 1 of 192 entries\)"):
        orthotune.check_finite(model, step=7)
    with torch.no_grad():
        layer.adapters["default"].U.zero_()

    head = dict(model.saved_modules())["head"]
    head.copies["default"].bias.grad[0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"the gradient of saved module 'head', adapter 'default', parameter 'bias' \(Inf"):
        orthotune.check_finite(model, loss)
    orthotune.check_finite(model, loss, grads=False)
    model.zero_grad()

    with pytest.raises(FloatingPointError, match="the loss is nan while every adapter weight and gradient is finite"):
        orthotune.check_finite(model, torch.tensor(float("nan")))


def test_plain_modules_report_their_trainable_parameters() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    net[0].requires_grad_(False)
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")  # frozen: not ours to report
    orthotune.check_finite(net)
    with torch.no_grad():
        net[1].bias[1] = float("-inf")
    with pytest.raises(FloatingPointError, match=r"parameter '1.bias' \(Inf in 1 of 2 entries\)"):
        orthotune.check_finite(net)


def test_large_finite_half_precision_weights_are_not_a_false_alarm() -> None:
    """The fused check multiplies by zero first, so a float16 reduction cannot overflow."""
    model = orthotune.get_model(MLP().half(), LoRAConfig(target_modules=["lin0"], r=4, autocast_adapter_dtype=False))
    with torch.no_grad():
        dict(model.adapter_layers())["lin0"].adapters["default"].lora_A.fill_(60000.0)
    orthotune.check_finite(model)


def test_guard_stops_the_step_that_would_write_nan_and_names_the_layer() -> None:
    torch.manual_seed(0)
    model = adapted()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    handle = orthotune.guard_finite(opt, model)
    x, target = torch.randn(8, 16), torch.randn(8, 4)
    for step in range(6):
        if step == 4:
            snapshot = {k: v.clone() for k, v in model.state_dict().items()}
            x = x.clone()
            x[0, 0] = float("nan")  # a corrupt batch: every gradient that sees it turns NaN
        loss = (model(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if step < 4:
            opt.step()
            continue
        with pytest.raises(FloatingPointError, match=r"at step 4 in the gradient of layer 'lin0', adapter 'default', parameter 'U'"):
            opt.step()
        break
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in snapshot.items()), "the adapter must keep its last good weights"
    handle.remove()
    opt.step()  # unguarded: the NaN goes in
    with pytest.raises(FloatingPointError, match="in layer 'lin0'"):
        orthotune.check_finite(model)


def test_guard_every_and_arguments() -> None:
    model = adapted()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    orthotune.guard_finite(opt, model, every=3)
    with torch.no_grad():
        dict(model.adapter_layers())["lin2"].adapters["default"].V.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="at step 0 in layer 'lin2'"):
        opt.step()
    opt.step()
    opt.step()  # steps 1 and 2 are not checked
    with pytest.raises(FloatingPointError, match="at step 3 in layer 'lin2'"):
        opt.step()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every must be a positive integer"):
            orthotune.guard_finite(opt, model, every=bad)


def test_a_nan_loss_is_traced_to_the_module_where_it_starts() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model = orthotune.get_model(net, LoRAConfig(target_modules=["0", "3"], r=2))
    with torch.no_grad():
        net[1].weight.fill_(1e38)  # a frozen layer that overflows
    x = torch.full((3, 4), 1e3)
    loss = model(x).pow(2).mean()
    assert not torch.isfinite(loss)
    with pytest.raises(FloatingPointError, match=r"the loss is (nan|inf) .*the non-finite values start in module '1'"):
        orthotune.check_finite(model, loss, batch=x)
    assert orthotune.training.finite.first_nonfinite_module(model, (torch.zeros(1, 4),)) is None
