"""PiSSA with ``residual_base=True``: peft's form (the base weight rewritten to ``W0 - s B0 A0``, plain LoRA on it).

Compared with peft 0.21's PiSSA (the same residual weight, model and dropout: test_pissa.py's tests with
``residual_base``), with the default difference form (the same model, merged weights and export), and
checked for what the rewrite implies: the disabled or unloaded model is ``W0`` again, folders reload
onto an untouched base, and a residual layer holds one adapter only.
"""

from __future__ import annotations

import copy

import pytest
import torch

import orthotune
from orthotune import LoRAConfig, PiSSAConfig
from orthotune.layer.adapter_layer import AdapterLayer

from ..conftest import MODELS

peft = pytest.importorskip("peft")


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _perturb(model: orthotune.OrthoModel, seed: int = 1) -> None:
    """Stand-in for training: move every trainable tensor (the same draws for models with the same adapters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("model_name", ["mlp", "conv1d"])
def test_residual_base_is_the_default_form(model_name: str) -> None:
    """Both forms are one model: equal outputs, merged weights and peft export; unmerge gives each its own base
    (the residual, W0), and unload gives W0 back in both."""
    cls, targets, make_x = MODELS[model_name]
    base = cls()
    x = make_x()
    models = {}
    for residual in (False, True):
        config = PiSSAConfig(target_modules=targets, r=3, lora_alpha=6, residual_base=residual)
        models[residual] = orthotune.get_model(copy.deepcopy(base), config)
        _perturb(models[residual])
    default, resid = models[False], models[True]
    assert torch.allclose(resid(x), default(x), atol=1e-5)
    before = {n: layer.weight.detach().clone() for n, layer in resid.adapter_layers()}
    for model in (default, resid):
        model.merge()
    assert torch.allclose(resid(x), default(x), atol=1e-5)
    for (name, a), (_, b) in zip(default.adapter_layers(), resid.adapter_layers()):
        assert torch.allclose(a.weight, b.weight, atol=2e-6), name
    resid.unmerge()
    for name, layer in resid.adapter_layers():
        assert torch.allclose(layer.weight, before[name], atol=1e-6)
    default.unmerge()
    unloaded = resid.unload()
    for name in targets:
        assert torch.allclose(unloaded.get_submodule(name).weight, base.get_submodule(name).weight, atol=1e-6), name
    assert not any(isinstance(m, AdapterLayer) for m in unloaded.modules())


def test_export_to_peft_is_the_same_from_either_form(tmp_path) -> None:
    """A peft LoRA export stores the update on W0 (rank 2r), also from a residual base: peft runs it on W0."""
    cls, targets, make_x = MODELS["mlp"]
    base = cls()
    ours = orthotune.get_model(copy.deepcopy(base), PiSSAConfig(target_modules=targets, r=3, lora_alpha=6, residual_base=True))
    _perturb(ours)
    ours.export_peft(tmp_path / "p")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p")
    x = make_x()
    assert torch.allclose(theirs(x), ours(x), atol=1e-5)


def test_inactive_and_mixed_batch_rows_compute_w0() -> None:
    """Where the residual adapter does not apply (another adapter active, a mixed batch's base rows) the layer
    adds s B0 A0 x back."""
    cls, _, make_x = MODELS["mlp"]
    base = cls()
    ours = orthotune.get_model(copy.deepcopy(base), PiSSAConfig(target_modules=["lin1"], r=3, residual_base=True))
    ours.add_adapter("other", LoRAConfig(target_modules=["lin2"], r=2, init_identity=False))
    _perturb(ours)
    x = make_x()
    ours.set_adapter("other")
    only_other = ours(x)
    with ours.disable_adapter():
        assert torch.allclose(ours(x), base(x), atol=1e-6)
    reference = orthotune.get_model(copy.deepcopy(base), LoRAConfig(target_modules=["lin2"], r=2))
    with torch.no_grad():
        dict(reference.adapter_layers())["lin2"].adapters["default"].load_state_dict(
            dict(ours.adapter_layers())["lin2"].adapters["other"].state_dict()
        )
    assert torch.allclose(only_other, reference(x), atol=1e-6)
    ours.set_adapter("default")
    ours.eval()
    mixed = ours(x, adapter_names=["default", "__base__"] * 3)
    with ours.disable_adapter():
        disabled = ours(x)
    assert torch.allclose(mixed[1::2], disabled[1::2], atol=1e-6) and torch.allclose(mixed[0::2], ours(x)[0::2], atol=1e-6)


@pytest.mark.parametrize("niter", [None, 1])
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_folder_reloads_onto_an_untouched_base(tmp_path, niter: int | None, low_cpu_mem_usage: bool) -> None:
    """save_pretrained stores A0, B0: loading reapplies that residual (not a new SVD, which for a random sketch
    differs), so the reloaded model is bit-identical; delete_adapter writes W0 back."""
    cls, targets, make_x = MODELS["mlp"]
    base = cls()
    config = PiSSAConfig(target_modules=targets, r=3, lora_alpha=6, svd_niter=niter, residual_base=True)
    ours = orthotune.get_model(copy.deepcopy(base), config)
    _perturb(ours)
    ours.save_pretrained(tmp_path / "a")
    torch.manual_seed(99)  # another sketch for svd_niter
    loaded = orthotune.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", low_cpu_mem_usage=low_cpu_mem_usage)
    assert loaded.configs["default"].residual_base
    x = make_x()
    assert torch.equal(loaded(x), ours(x))
    for (name, a), (_, b) in zip(ours.adapter_layers(), loaded.adapter_layers()):
        assert torch.equal(a.weight, b.weight), name
    with pytest.warns(UserWarning, match="was the last adapter"):
        loaded.delete_adapter("default")
    for name in targets:
        assert torch.allclose(loaded.base_model.get_submodule(name).weight, base.get_submodule(name).weight, atol=1e-6)


@pytest.mark.parametrize("how", ["load_adapter_weights", "set_peft_model_state_dict", "low_cpu_mem_usage"])
def test_loading_other_principal_factors_in_place_moves_the_residual(tmp_path, how: str) -> None:
    """A load that replaces A0, B0 of a live residual adapter (another sketch) rebases the weight with them."""
    cls, targets, make_x = MODELS["mlp"]
    base = cls()
    config = PiSSAConfig(target_modules=targets, r=3, lora_alpha=6, svd_niter=1, residual_base=True)
    saved = orthotune.get_model(copy.deepcopy(base), config)
    _perturb(saved)
    torch.manual_seed(99)
    resumed = orthotune.get_model(copy.deepcopy(base), copy.deepcopy(config))
    first = dict(resumed.adapter_layers())["lin0"].adapters["default"]
    assert not torch.equal(first.lora_A0, dict(saved.adapter_layers())["lin0"].adapters["default"].lora_A0)
    if how == "load_adapter_weights":
        saved.save_pretrained(tmp_path / "a")
        resumed.load_adapter_weights(tmp_path / "a")
    else:  # peft's API, copying in place or (low_cpu_mem_usage) assigning to an adapter added on the meta device
        from orthotune.interop.peft_api import get_peft_model_state_dict, set_peft_model_state_dict

        if how == "low_cpu_mem_usage":
            resumed = orthotune.OrthoModel(copy.deepcopy(base))
            resumed.add_adapter("default", copy.deepcopy(config), low_cpu_mem_usage=True)
            resumed.set_adapter("default")
        low = how == "low_cpu_mem_usage"
        set_peft_model_state_dict(resumed, get_peft_model_state_dict(saved), low_cpu_mem_usage=low)
    x = make_x()
    assert torch.allclose(resumed(x), saved(x), atol=1e-6)
    with resumed.disable_adapter():
        assert torch.allclose(resumed(x), base(x), atol=1e-6)


def test_a_residual_layer_holds_one_adapter() -> None:
    """Another adapter on a residual layer, or a residual adapter on an adapted layer, is refused naming the fix,
    and nothing changes; other layers may carry other adapters."""
    cls, _, make_x = MODELS["mlp"]
    base = cls()
    ours = orthotune.get_model(copy.deepcopy(base), PiSSAConfig(target_modules=["lin1"], r=3, residual_base=True))
    before = _weights(ours)
    with pytest.raises(ValueError, match="'lin1' holds adapter 'default' with residual_base=True"):
        ours.add_adapter("other", LoRAConfig(target_modules=["lin0", "lin1"], r=2))
    with pytest.raises(ValueError, match="'lin1' holds adapter 'default' with residual_base=True"):
        ours.add_adapter("other", PiSSAConfig(target_modules=["lin1"], r=2, residual_base=True))
    assert ours.configs.keys() == {"default"} and all(torch.equal(v, _weights(ours)[k]) for k, v in before.items())
    ours.add_adapter("other", PiSSAConfig(target_modules=["lin0"], r=2, residual_base=True))  # another layer: fine
    lora = orthotune.get_model(copy.deepcopy(base), LoRAConfig(target_modules=["lin1"], r=2))
    with pytest.raises(ValueError, match=r"already carries adapters \['default'\]: use residual_base=False"):
        lora.add_adapter("p", PiSSAConfig(target_modules=["lin1"], r=2, residual_base=True))


def test_convolutions_are_refused() -> None:
    cls, targets, _ = MODELS["conv2d"]
    model = cls()
    before = _weights(model)
    with pytest.raises(ValueError, match="nn.Linear and GPT-2 Conv1D with float weights only"):
        orthotune.get_model(model, PiSSAConfig(target_modules=targets, r=2, residual_base=True))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_residual_is_one_rounding(dtype: torch.dtype) -> None:
    """The residual is computed in float64 and rounded once: the weight is the rounded W0 - s B0 A0 to half an ulp,
    and the disabled model is the base model to that rounding."""
    cls, _, make_x = MODELS["mlp"]
    base = cls().to(dtype)
    ours = orthotune.get_model(copy.deepcopy(base), PiSSAConfig(target_modules=["lin1"], r=4, residual_base=True))
    layer = dict(ours.adapter_layers())["lin1"]
    method = layer.adapters["default"]
    exact = base.lin1.weight.double() - method.scaling * method.lora_B0.double() @ method.lora_A0.double()
    assert torch.equal(layer.weight, exact.to(dtype))
    x = make_x().to(dtype)
    with ours.disable_adapter():
        assert torch.allclose(ours(x).float(), base(x).float(), atol=2e-2)
