"""peft's ``TestMultipleActiveAdapters`` on peft's MLP: two adapters of one method on the same layer or on
different layers, and ``_test_merge_layers_multi``."""

from __future__ import annotations

import copy

import pytest
import torch

import orthotune

from .cases import MULTI_CASES, MultiCase, params
from .harness import allclose
from .models import base_model, inputs, output

pytestmark = pytest.mark.parametrize("case", params(MULTI_CASES))


def _two(case: MultiCase, first: str = "adapter_1", second: str = "adapter_2"):
    torch.manual_seed(0)
    model = orthotune.get_model(base_model("MLP"), case.config(0), first).eval()
    torch.manual_seed(1)
    model.add_adapter(second, case.config(1))
    return model


def _out(model) -> torch.Tensor:
    with torch.no_grad():
        return output(model, inputs("MLP"))


def test_multiple_active_adapters_forward(case) -> None:
    model = _two(case)
    out_1 = _out(model)
    model.set_adapter("adapter_2")
    out_2 = _out(model)
    model.set_adapter(["adapter_1", "adapter_2"])
    combined = _out(model)
    assert not torch.allclose(out_1, out_2, atol=1e-5)
    assert not torch.allclose(out_1, combined, atol=1e-5)
    assert not torch.allclose(out_2, combined, atol=1e-5)


def test_multiple_active_adapters_merge_and_unmerge(case) -> None:
    base = _out(base_model("MLP"))
    model = _two(case)
    model.set_adapter(["adapter_1", "adapter_2"])
    combined = _out(model)
    model.merge()
    assert torch.allclose(_out(model), combined, atol=1e-4)
    model.unmerge()
    with model.disable_adapter():
        assert torch.allclose(_out(model), base, atol=1e-4)


def test_merge_layers_multi(case) -> None:
    model = _two(case, "default", "adapter-2")
    out_1 = _out(model)
    model.set_adapter("adapter-2")
    out_2 = _out(model)
    tol = (1e-3, 1e-3)
    assert not allclose(out_1, out_2, tol)
    model.set_adapter("default")
    assert allclose(_out(model), out_1, tol)
    copy_1, copy_2 = copy.deepcopy(model), copy.deepcopy(model)
    merged_all = _out(model.merge_and_unload(adapter_names=["adapter-2", "default"]))
    assert not allclose(merged_all, out_2, tol) and not allclose(merged_all, out_1, tol)
    assert allclose(_out(copy_1.merge_and_unload(adapter_names=["adapter-2"])), out_2, tol)
    assert allclose(_out(copy_2.merge_and_unload(adapter_names=["default"])), out_1, tol)


def test_sequential_merge_matches_batch_merge(case) -> None:
    model = _two(case)
    sequential = copy.deepcopy(model)
    model.merge(["adapter_1", "adapter_2"])
    sequential.merge(["adapter_1"])
    sequential.merge(["adapter_2"])
    assert allclose(_out(sequential), _out(model), (1e-3, 1e-3))


def test_unmerge_after_sequential_merge_restores_base(case) -> None:
    base = _out(base_model("MLP"))
    model = _two(case)
    model.merge(["adapter_1"])
    model.merge(["adapter_2"])
    model.unmerge()
    with model.disable_adapter():
        assert allclose(_out(model), base, (1e-3, 1e-3))
