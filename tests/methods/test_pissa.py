"""PiSSA: the same model as peft 0.21's PiSSA (which rewrites the base weight), and an exact identity start."""

from __future__ import annotations

import copy

import pytest
import torch

import orthotune
from orthotune import PiSSAConfig
from orthotune.layer import residual as residual_base

from ..conftest import MODELS

from ..method_cases import run

peft = pytest.importorskip("peft")


def _peft_pissa(base, targets, r, alpha, rslora, init):
    model = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(target_modules=targets, r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=init),
    )
    initial = {}
    for name in targets:
        layer = model.base_model.model.get_submodule(name)
        initial[name] = (layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone())
    return model, initial


# peft has no PiSSA for Conv2d ("Unknown initialization"), so the comparison covers Linear and GPT-2 Conv1D.
@pytest.mark.parametrize("model_name", ["mlp", "conv1d"])
@pytest.mark.parametrize("init,niter", [("pissa", None), ("pissa_niter_2", 2)])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("residual", [False, True], ids=["difference", "residual_base"])
def test_pissa_matches_peft(model_name: str, init: str, niter: int | None, rslora: bool, residual: bool) -> None:
    """Either form is peft's model; residual_base also holds peft's residual weight W0 - s B0 A0 (the default form
    keeps W0). Disabled, peft computes its residual, orthotune the base model."""
    cls, targets, make_x = MODELS[model_name]
    base = cls()
    theirs, initial = _peft_pissa(base, targets, r=3, alpha=5, rslora=rslora, init=init)
    config = PiSSAConfig(target_modules=targets, r=3, lora_alpha=5, use_rslora=rslora, svd_niter=niter, residual_base=residual)
    ours = orthotune.get_model(copy.deepcopy(base), config)
    x = make_x()
    assert torch.allclose(theirs(x), base(x), atol=1e-5), "peft's PiSSA starts at the base model"
    if residual:  # W0 - s B0 A0 + s B0 A0, each rounded in float32
        assert torch.allclose(ours(x), base(x), atol=1e-5)
    else:
        assert torch.equal(ours(x), base(x)), "orthotune's PiSSA starts exactly at the base model"

    torch.manual_seed(1)
    layers = dict(ours.adapter_layers())
    for name, layer in layers.items():
        pl = theirs.base_model.model.get_submodule(name)
        A0, B0 = initial[name]
        method = layer.adapters["default"]
        if niter is None:  # the exact SVD is deterministic: the same principal factors (and residual) as peft
            assert torch.allclose(method.lora_A0, A0, atol=1e-5) and torch.allclose(method.lora_B0, B0, atol=1e-5)
            if residual:
                assert torch.allclose(layer.weight, pl.base_layer.weight, atol=1e-6), "peft's residual weight"
        # "training": move peft's factors, then copy everything across (a residual base moves with A0, B0)
        with torch.no_grad(), residual_base.kept(list(layers.values()), "default"):
            pl.lora_A["default"].weight.add_(0.05 * torch.randn_like(A0))
            pl.lora_B["default"].weight.add_(0.05 * torch.randn_like(B0))
            method.lora_A0.copy_(A0)
            method.lora_B0.copy_(B0)
            method.lora_A.copy_(pl.lora_A["default"].weight)
            method.lora_B.copy_(pl.lora_B["default"].weight)

    assert not torch.allclose(theirs(x), base(x), atol=1e-3)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    with ours.disable_adapter(), theirs.disable_adapter():  # peft's disabled model is the residual; ours is the base
        assert torch.allclose(ours(x), base(x), atol=1e-6) if residual else torch.equal(ours(x), base(x))
        assert not torch.allclose(theirs(x), base(x), atol=1e-3)
    merged_ours = ours.merge_and_unload().state_dict()
    merged_theirs = theirs.merge_and_unload().state_dict()
    assert merged_ours.keys() == merged_theirs.keys()
    for k in merged_ours:
        assert torch.allclose(merged_ours[k], merged_theirs[k], atol=2e-6), k


def test_principal_part_and_svd_lowrank() -> None:
    """s B0 A0 is the best rank-r approximation of W0 (exact SVD), and close to it with svd_lowrank."""
    from orthotune.methods.pissa import principal_factors

    torch.manual_seed(0)
    W = torch.randn(20, 12, dtype=torch.float64) @ torch.diag(torch.logspace(1, -2, 12, dtype=torch.float64))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    best = (U[:, :3] * S[:3]) @ Vh[:3]
    A0, B0 = principal_factors(W, 3, scaling=0.7)
    assert ((0.7 * B0.double() @ A0.double() - best).norm() / best.norm()) < 1e-6  # float32 SVD
    A1, B1 = principal_factors(W, 3, scaling=0.7, niter=4)
    assert ((0.7 * B1.double() @ A1.double() - best).norm() / best.norm()) < 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [True, False])
def test_update_is_exactly_zero_in_half_precision(dtype: torch.dtype, autocast: bool) -> None:
    """[B, B - B0][A - A0; A0] is an exact zero at init, where the plain B A - B0 A0 cancels with bf16 error."""
    cls, targets, make_x = MODELS["mlp"]
    model = orthotune.get_model(cls().to(dtype), PiSSAConfig(target_modules=targets, r=4, autocast_adapter_dtype=autocast))
    layer = dict(model.adapter_layers())["lin1"]
    method = layer.adapters["default"]
    x = torch.randn(64, 24).to(dtype)
    zero = torch.zeros(64, 24, dtype=dtype)
    assert torch.equal(run(method, x, lambda z: zero), zero)
    A0, B0 = method.lora_A0.to(dtype), method.lora_B0.to(dtype)
    plain = method.scaling * ((x @ torch.cat([A0, A0]).T) @ torch.cat([B0, -B0], dim=1).T)
    assert plain.abs().max() > 0, "the plain rank-2r form would not start at the identity"


@pytest.mark.parametrize("residual", [False, True], ids=["difference", "residual_base"])
def test_dropout_matches_peft_in_training(residual: bool) -> None:
    """peft drops the input of the whole B A path; the principal part kept in W0 is dropped the same way (on the
    residual base that is plain LoRA's dropout, peft's own form)."""
    cls, targets, make_x = MODELS["mlp"]
    base = cls()
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(target_modules=["lin1"], r=3, lora_alpha=6, lora_dropout=0.5, init_lora_weights="pissa")
    )
    config = PiSSAConfig(target_modules=["lin1"], r=3, lora_alpha=6, lora_dropout=0.5, residual_base=residual)
    ours = orthotune.get_model(copy.deepcopy(base), config)
    theirs.train()
    ours.train()
    x = make_x()
    torch.manual_seed(3)
    y_theirs = theirs(x)
    torch.manual_seed(3)
    y_ours = ours(x)
    assert not torch.allclose(y_ours, base(x), atol=1e-3), "dropout is active"
    assert torch.allclose(y_ours, y_theirs, atol=1e-5)
