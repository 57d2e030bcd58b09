"""peft LoRA folders whose init residualises the base weight: OLoRA (``"olora"``) and PiSSA with a randomized
SVD (``"pissa_niter_K"``) load with peft's outputs, and orthotune's configs for them start as peft's do."""

from __future__ import annotations

import copy

import pytest
import torch

import orthotune
from orthotune import PiSSAConfig

from ..conftest import MODELS
from .test_peft_interop import fresh, merged_equal, perturb, untouched

peft = pytest.importorskip("peft")


def _save_peft(tmp_path, model_name: str, init: str, r: int = 3, alpha: int = 6):
    _, targets, _ = MODELS[model_name]
    theirs = peft.get_peft_model(fresh(model_name), peft.LoraConfig(target_modules=targets, r=r, lora_alpha=alpha, init_lora_weights=init))
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "p")
    return theirs


@torch.no_grad()
def test_olora_folder_loads_like_peft(tmp_path) -> None:
    theirs = _save_peft(tmp_path, "mlp", "olora")
    reference = peft.PeftModel.from_pretrained(fresh("mlp"), tmp_path / "p")
    ours = orthotune.from_peft(fresh("mlp"), tmp_path / "p")
    config = ours.configs["default"]
    assert isinstance(config, PiSSAConfig) and config.factorization == "qr"
    x = MODELS["mlp"][2]()
    assert not torch.allclose(reference(x), fresh("mlp")(x), atol=1e-3)
    assert torch.allclose(ours(x), reference(x), atol=1e-6, rtol=1e-6)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6, rtol=1e-6)
    merged_equal(ours.merge_and_unload(), reference.merge_and_unload(), atol=1e-6)


@torch.no_grad()
def test_olora_config_starts_as_peft() -> None:
    """PiSSAConfig(factorization="qr") is peft's OLoRA: the same A0, B0; the same model after the same steps."""
    _, targets, make_x = MODELS["mlp"]
    base = fresh("mlp")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=targets, r=3, lora_alpha=6, init_lora_weights="olora"))
    ours = orthotune.get_model(copy.deepcopy(base), PiSSAConfig(target_modules=targets, r=3, lora_alpha=6, factorization="qr"))
    x = make_x()
    assert torch.equal(ours(x), base(x))
    for name, layer in ours.adapter_layers():
        pl, method = theirs.base_model.model.get_submodule(name), layer.adapters["default"]
        assert torch.equal(method.lora_A0, pl.lora_A["default"].weight) and torch.equal(method.lora_B0, pl.lora_B["default"].weight)
        pl.lora_A["default"].weight.add_(0.05 * torch.randn_like(method.lora_A))
        pl.lora_B["default"].weight.add_(0.05 * torch.randn_like(method.lora_B))
        method.lora_A.copy_(pl.lora_A["default"].weight)
        method.lora_B.copy_(pl.lora_B["default"].weight)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6, rtol=1e-6)


@pytest.fixture
def same_sketch(monkeypatch):
    """torch.svd_lowrank drawing the same sketch in peft and orthotune (each reload draws anew in both)."""
    original = torch.svd_lowrank

    def seeded(A, q=6, niter=2, M=None):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)
            return original(A, q=q, niter=niter, M=M)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    monkeypatch.setattr("peft.tuners.lora.layer.svd_lowrank", seeded)


@pytest.mark.parametrize("model_name", ["mlp", "conv1d"])
@torch.no_grad()
def test_pissa_niter_folder_loads_like_peft(model_name, tmp_path, same_sketch) -> None:
    theirs = _save_peft(tmp_path, model_name, "pissa_niter_1")
    reference = peft.PeftModel.from_pretrained(fresh(model_name), tmp_path / "p")
    with pytest.warns(UserWarning, match=r"recomputed by a new random sketch \(torch.svd_lowrank, niter=1\)"):
        ours = orthotune.from_peft(fresh(model_name), tmp_path / "p")
    assert ours.configs["default"].svd_niter == 1
    x = MODELS[model_name][2]()
    assert torch.allclose(ours(x), reference(x), atol=1e-6, rtol=1e-6)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6, rtol=1e-6)  # the same sketch as when it was saved
    merged_equal(ours.merge_and_unload(), reference.merge_and_unload(), atol=1e-6)


def test_olora_folder_on_conv1d_is_refused(tmp_path) -> None:
    """peft's olora_init factors GPT-2's stored (d_in, d_out) tensor, not the layer's map (its own forward then
    fails on shapes): refused by name, model untouched."""
    _, targets, _ = MODELS["conv1d"]
    peft.get_peft_model(fresh("conv1d"), peft.LoraConfig(target_modules=targets, r=3, init_lora_weights="olora")).save_pretrained(tmp_path / "p")
    model = fresh("conv1d")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="OLoRA folders load for nn.Linear layers only"):
        orthotune.from_peft(model, tmp_path / "p")
    assert untouched(model, before)
