"""peft's tests of several adapters and of disabling them: ``test_active_adapter``, ``_test_adapter_name``,
``_test_delete_adapter``, ``_test_delete_inactive_adapter``, ``_test_delete_unknown_adapter_raises``,
``test_delete_adapter_properly_cleans_up_after_itself``, ``test_add_adapter_rejects_duplicate_name_without_mutation``,
``_test_disable_adapter``, ``test_disable_adapters``, ``test_disable_adapters_with_merging``,
``test_disable_adapters_exiting_context_*`` and ``TestRequiresGrad``."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from .cases import CASES, disable_merge_tolerance, params
from .harness import allclose, base_output, batch, config, make, requires_api, train, wrappers
from .models import output

pytestmark = pytest.mark.parametrize("case", params(CASES))


def test_adapter_name(case) -> None:
    model = make(case, adapter_name="test-adapter")
    assert any("test-adapter" in n for n, _ in model.named_parameters())


def test_active_adapter(case) -> None:
    model = make(case)
    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    model.add_adapter("other", config(case))
    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    model.set_adapter("other")
    assert model.active_adapters == ["other"] and model.active_adapter == "other"
    model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default", "other"]


def test_add_adapter_rejects_duplicate_name_without_mutation(case) -> None:
    model = make(case, init_identity=False)
    config_before = model.configs["default"]
    state_before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="an adapter named 'default' exists already"):
        model.add_adapter("default", config(case))
    assert model.configs["default"] is config_before
    state = model.state_dict()
    assert state.keys() == state_before.keys() and all(torch.equal(state[k], state_before[k]) for k in state)


def _assert_deleted(model, name: str) -> None:
    """No trace of adapter ``name`` in the model, its layers or its saved modules."""
    assert name not in model.configs
    for layer in wrappers(model):
        assert name not in getattr(layer, "adapters", getattr(layer, "copies", {}))
        assert name not in layer.active_adapters


def test_delete_adapter(case) -> None:
    model = make(case)
    model.add_adapter("delete_me", config(case))
    model.set_adapter("delete_me")
    _delete_second_then_default(model, case)


def test_delete_inactive_adapter(case) -> None:
    model = make(case)
    model.add_adapter("delete_me", config(case))
    _delete_second_then_default(model, case)


def _delete_second_then_default(model, case) -> None:
    """Delete "delete_me" (default stays active), then "default" (none left); the base model still runs."""
    model.delete_adapter("delete_me")
    _assert_deleted(model, "delete_me")
    assert model.active_adapters == ["default"]
    model.delete_adapter("default")
    _assert_deleted(model, "default")
    assert model.active_adapters == []
    output(model.base_model, batch(case))


def test_delete_unknown_adapter_raises(case) -> None:
    model = make(case)
    with pytest.raises(ValueError, match="no adapter named 'unknown-adapter'"):
        model.delete_adapter("unknown-adapter")


def test_delete_adapter_properly_cleans_up_after_itself(case) -> None:
    """Every dict-like attribute of the model and its layers that held the adapter no longer does."""
    model = make(case, adapter_name="foobar")

    def holders(obj):
        for attr in vars(obj).get("_modules", {}).keys() | {k for k in vars(obj) if not k.startswith("_")}:
            value = getattr(obj, attr, None)
            if callable(getattr(value, "keys", None)) and hasattr(value, "__contains__") and "foobar" in value:
                yield attr, value

    found = list(holders(model)) + [h for m in wrappers(model) for h in holders(m)]
    assert found
    model.delete_adapter("foobar")
    assert not [name for name, value in found if "foobar" in value]


@torch.no_grad()
def test_disable_adapter(case) -> None:
    """``_test_disable_adapter``: base outputs inside the block (1e-6), the adapter's after it."""
    output_before = base_output(case)
    model = make(case, init_identity=False).eval()
    output_peft = output(model, batch(case))
    assert not torch.allclose(output_before, output_peft)
    with model.disable_adapter():
        output_disabled = output(model, batch(case))
    assert allclose(output_before, output_disabled, (1e-6, 1e-6))
    assert allclose(output_peft, output(model, batch(case)), (1e-6, 1e-6))


def test_disable_adapters(case) -> None:
    """After training, the disabled model gives the outputs from before training, and leaving restores them."""
    outputs_base = base_output(case)
    model = make(case).eval()
    x = batch(case)
    with torch.no_grad():
        outputs_before = output(model, x)
    assert torch.allclose(outputs_base, outputs_before)
    train(case, model, lr=0.01)
    with torch.no_grad():
        outputs_after = output(model, x)
        with model.disable_adapter():
            outputs_disabled = output(model, x)
        outputs_enabled_after_disable = output(model, x)
    assert not torch.allclose(outputs_before, outputs_after, rtol=1e-8, atol=1e-8)
    assert torch.allclose(outputs_before, outputs_disabled)
    assert torch.allclose(outputs_after, outputs_enabled_after_disable)


def test_disable_adapters_with_merging(case) -> None:
    model = make(case).eval()
    x = batch(case)
    with torch.no_grad():
        outputs_before = output(model, x)
    train(case, model, lr=0.01, optimizer="adam")
    with torch.no_grad():
        outputs_unmerged = output(model, x)
        model.merge()
        outputs_after = output(model, x)
        with model.disable_adapter():
            outputs_disabled = output(model, x)
        outputs_enabled_after_disable = output(model, x)
    tol = disable_merge_tolerance(case)
    assert not allclose(outputs_before, outputs_after, tol)
    assert allclose(outputs_after, outputs_unmerged, tol)
    assert allclose(outputs_before, outputs_disabled, tol)
    assert allclose(outputs_after, outputs_enabled_after_disable, tol)
    assert model.merged  # the merge is back after the block


def test_disable_adapters_exiting_context_irregular_state(case) -> None:
    """By design orthotune restores each layer's own state on leaving the block, so a partly disabled model
    comes back partly disabled; peft instead warns and enables every layer."""
    model = make(case)
    layers = wrappers(model)
    layers[0].disabled = True
    before = [m.disabled for m in layers]
    with model.disable_adapter():
        assert all(m.disabled for m in layers)
    assert [m.disabled for m in layers] == before


@requires_api("disable_adapter_layers")
@requires_api("enable_adapter_layers")
def test_disable_adapters_exiting_context_restores_previous_state(case) -> None:
    model = make(case)
    layers = wrappers(model)
    assert not any(m.disabled for m in layers)
    with model.disable_adapter():
        pass
    assert not any(m.disabled for m in layers)
    model.disable_adapter_layers()
    assert all(m.disabled for m in layers)
    with model.disable_adapter():
        pass
    assert all(m.disabled for m in layers)
    model.enable_adapter_layers()
    assert not any(m.disabled for m in layers)


def test_requires_grad_follows_active_adapter(case) -> None:
    """``TestRequiresGrad``: only the active adapter's parameters (and its saved-module copies) train."""
    model = make(case, adapter_name="adapter0")
    model.add_adapter("adapter1", config(case))

    def trainable() -> set[str]:
        return {n for n, p in model.named_parameters() if p.requires_grad}

    assert trainable() and all(".adapter0." in n for n in trainable())
    model.set_adapter("adapter1")
    assert trainable() and all(".adapter1." in n for n in trainable())
    model.set_adapter(["adapter0", "adapter1"])
    assert {re.search(r"\.(adapter[01])\.", n).group(1) for n in trainable()} == {"adapter0", "adapter1"}
