"""orthotune's FourierFT computes what peft 0.21's FourierFT computes, with peft's parameters mapped across."""

from __future__ import annotations

import copy

import pytest
import torch

import orthotune
from orthotune import FourierFTConfig

from ..conftest import MODELS

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("model_name", ["mlp", "conv1d"])
@pytest.mark.parametrize("compute", ["lowrank", "dense"])
def test_fourierft_matches_peft(model_name: str, compute: str) -> None:
    cls, targets, make_x = MODELS[model_name]
    base = cls()
    kw = dict(n_frequency=40, scaling=120.0, random_loc_seed=11)
    ours = orthotune.get_model(copy.deepcopy(base), FourierFTConfig(target_modules=targets, compute=compute, **kw))
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.FourierFTConfig(target_modules=targets, init_weights=False, fan_in_fan_out=model_name == "conv1d", **kw),
    )
    for name, layer in ours.adapter_layers():
        pl = theirs.base_model.model.get_submodule(name)
        method = layer.adapters["default"]
        # Same seed, same cells: the spectrum indices are peft's draw; then peft's random spectrum is copied across.
        assert torch.equal(method.locations, pl.indices["default"])
        with torch.no_grad():
            method.spectrum.copy_(pl.fourierft_spectrum["default"])
        assert torch.allclose(method.delta_weight(), pl.get_delta_weight("default"), atol=1e-6)
    x = make_x()
    assert torch.allclose(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    merged_ours = ours.merge_and_unload()
    merged_theirs = theirs.merge_and_unload()
    for (n, a), (_, b) in zip(merged_ours.state_dict().items(), merged_theirs.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_locations_are_peft_draw_and_shared_by_layers_of_one_shape() -> None:
    from orthotune.methods.fourierft import fourier_locations

    gen = torch.Generator().manual_seed(777)
    flat = torch.randperm(24 * 16, generator=gen)[:50]
    assert torch.equal(fourier_locations(24, 16, 50, 777), torch.stack([flat // 16, flat % 16]))


def test_n_frequency_larger_than_the_spectrum_is_refused() -> None:
    cls, _, _ = MODELS["mlp"]
    with pytest.raises(ValueError, match="use n_frequency <= 384"):
        orthotune.get_model(cls(), FourierFTConfig(target_modules=["lin0"], n_frequency=385))
    with pytest.raises(ValueError, match="random_loc_seed"):
        FourierFTConfig(random_loc_seed=1.5)
