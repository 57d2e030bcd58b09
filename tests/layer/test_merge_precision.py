"""Merging rounds once from float64: the merged weight is the float64 map rounded to float32, the adapter is untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthotune
from orthotune.layer.merge_precision import in_float64


def _reference(layer, name: str) -> torch.Tensor:
    """merged_weight(W0) of a float64 copy of the adapter on the float64 weight."""
    import copy

    adapter = copy.deepcopy(layer.adapters[name]).double()
    return adapter.merged_weight(layer.weight_matrix().double())


@pytest.mark.parametrize(
    "config",
    [orthotune.HRAConfig(target_modules=["lin"], r=8, init_identity=False),
     orthotune.GOFTConfig(target_modules=["lin"], init_identity=False),
     orthotune.LoRAConfig(target_modules=["lin"], r=4, init_identity=False)],
    ids=["hra", "goft", "lora"],
)
@torch.no_grad()
def test_merged_weight_is_float64_map_rounded_once(config) -> None:
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(24, 12))
    model = orthotune.get_model(base, config)
    layer = dict(model.adapter_layers())["lin"]
    params = {n: p.clone() for n, p in layer.adapters["default"].named_parameters()}
    expected = _reference(layer, "default").float()
    model.merge()
    assert torch.equal(layer.weight_matrix(), expected)
    assert all(torch.equal(p, params[n]) and p.dtype == params[n].dtype for n, p in layer.adapters["default"].named_parameters())


def test_in_float64_restores_the_same_tensors() -> None:
    lin = nn.Linear(3, 2).to(torch.bfloat16)
    weight, data = lin.weight, lin.weight.data
    with in_float64(lin):
        assert lin.weight.dtype == torch.float64 and lin.weight is weight
    assert lin.weight is weight and lin.weight.data.data_ptr() == data.data_ptr() and lin.weight.dtype == torch.bfloat16
