"""Support re-selection as a new rotation stage: exact statistic, nothing learnt lost, save / load / merge."""

from __future__ import annotations

import copy

import pytest
import torch

import orthotune
from orthotune import LOFTConfig
from orthotune.methods.loft.selection import gradient_basis
from orthotune.training.reselect import add_rotation_stage
from tests.methods.test_supports import Tiny, batches, projector


def trained_model() -> tuple[Tiny, orthotune.OrthoModel]:
    """A LOFT gradient adapter on layer a (head b trained in full) whose rotation is far from the identity."""
    torch.manual_seed(0)
    base = Tiny().eval()
    model = orthotune.get_model(copy.deepcopy(base), LOFTConfig(target_modules=["a"], modules_to_save=["b"], support="gradient", r=4))
    orthotune.select_supports(model, iter(batches(2)), num_batches=2, progress=False)
    with torch.no_grad():
        for p in model.get_submodule("a").adapters["default"].transform.parameters():
            p.normal_(0, 0.5)
    return base, model.eval()


def test_a_stage_starts_at_the_identity_freezes_the_old_rotation_and_keeps_the_head_training() -> None:
    _, model = trained_model()
    x = torch.randn(5, 12)
    before = model(x)["logits"]
    params = add_rotation_stage(model, iter(batches(3)), "stage1", num_batches=3)
    assert model.active_adapters == ["stage1", "default"]
    assert torch.allclose(model(x)["logits"], before, atol=1e-6)  # the new stage is the identity
    layer = model.get_submodule("a")
    assert params and all(p.requires_grad for p in params)
    assert {id(p) for p in params} == {id(p) for p in layer.adapters["stage1"].parameters()}
    assert not any(p.requires_grad for p in layer.adapters["default"].parameters())
    head = model.get_submodule("b")
    assert head.current() is head.copies["default"] and all(p.requires_grad for p in head.copies["default"].parameters())


def test_the_new_support_is_the_statistic_at_the_current_point() -> None:
    """W = W0 R_new R_old: the new stage's first-order signal is Skew(W0^T G), G = dL/dW0 through the old rotation."""
    base, model = trained_model()
    layer = model.get_submodule("a")
    R_old = layer.adapters["default"].rotation().detach()
    b = model.get_submodule("b").copies["default"]
    W0 = base.a.weight.detach().clone().requires_grad_(True)
    data = batches(3)
    for batch in data:
        h = torch.tanh(batch["x"] @ (W0 @ R_old).T + base.a.bias)
        torch.nn.functional.cross_entropy(b(h), batch["labels"]).backward()
    G = W0.grad / len(data)
    add_rotation_stage(model, iter(data), "stage1", num_batches=3)
    P = layer.adapters["stage1"].support.P
    assert torch.allclose(projector(P.double()), projector(gradient_basis(W0.detach().double(), G.double(), 4)), atol=1e-5)


def test_stages_save_load_and_merge(tmp_path) -> None:
    base, model = trained_model()
    add_rotation_stage(model, iter(batches(2)), "stage1", num_batches=2)
    with torch.no_grad():
        for p in model.get_submodule("a").adapters["stage1"].transform.parameters():
            p.normal_(0, 0.5)  # the second stage trained too
    x = torch.randn(5, 12)
    expected = model(x)["logits"]
    model.save_adapter(tmp_path / "default", "default")
    model.save_adapter(tmp_path / "stage1", "stage1")
    loaded = orthotune.load_adapter(copy.deepcopy(base), tmp_path / "default")
    loaded = orthotune.load_adapter(loaded, tmp_path / "stage1", adapter_name="stage1")
    loaded.set_adapter(["stage1", "default"])
    assert torch.allclose(loaded.eval()(x)["logits"], expected, atol=1e-6)
    merged = loaded.merge_and_unload()
    assert torch.allclose(merged(x)["logits"], expected, atol=1e-5)


def test_a_stage_refuses_what_it_cannot_do() -> None:
    _, model = trained_model()
    with pytest.raises(ValueError, match="re-selects a task-aware support"):
        add_rotation_stage(model, iter(batches(2)), "s", LOFTConfig(target_modules=["a"], support="random", r=4))
    with pytest.raises(ValueError, match="leave modules_to_save unset"):
        add_rotation_stage(model, iter(batches(2)), "s", LOFTConfig(target_modules=["a"], modules_to_save=["b"], support="gradient", r=4))
    with pytest.raises(ValueError, match="head_warmup_steps is for a fresh head"):
        add_rotation_stage(model, iter(batches(2)), "s", head_warmup_steps=3)
    assert model.active_adapters == ["default"] and set(model.configs) == {"default"}  # nothing changed
