"""orthotune's LoRA computes what peft 0.21's LoRA computes, parameter for parameter."""

from __future__ import annotations

import copy

import pytest
import torch

import orthotune
from orthotune import LoRAConfig

from ..conftest import MODELS

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("model_name", ["mlp", "conv1d", "conv2d"])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_matches_peft(model_name: str, rslora: bool) -> None:
    cls, targets, make_x = MODELS[model_name]
    base = cls()
    ours = orthotune.get_model(copy.deepcopy(base), LoRAConfig(target_modules=targets, r=4, lora_alpha=12, use_rslora=rslora))
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(target_modules=targets, r=4, lora_alpha=12, use_rslora=rslora, init_lora_weights=False),
    )
    for name, layer in ours.adapter_layers():
        pl = theirs.base_model.model.get_submodule(name)
        A = pl.lora_A["default"].weight.detach()
        B = pl.lora_B["default"].weight.detach()
        with torch.no_grad():
            layer.adapters["default"].lora_A.copy_(A.reshape(A.shape[0], -1))
            layer.adapters["default"].lora_B.copy_(B.reshape(B.shape[0], -1))
    x = make_x()
    assert torch.allclose(ours(x), theirs(x), atol=1e-6, rtol=1e-5)
    merged_ours = ours.merge_and_unload()
    merged_theirs = theirs.merge_and_unload()
    for (n, a), (_, b) in zip(merged_ours.state_dict().items(), merged_theirs.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), n
