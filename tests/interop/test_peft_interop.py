"""peft folders in (``orthotune.from_peft``) and out (``export_peft``), checked against the installed peft."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import nn

import orthotune
from orthotune import FourierFTConfig, LoCOConfig, LoRAConfig, PiSSAConfig
from orthotune.interop.peft import FORMATS
from orthotune.layer.adapter_layer import AdapterLayer

from ..conftest import MODELS
from ..methods.test_contract import train_steps

peft = pytest.importorskip("peft")

SAVED = {"mlp": ["head"], "conv1d": None, "conv2d": None}
PEFT_TYPES = sorted({f.peft_type for f in FORMATS.values()})


def fresh(model_name: str) -> nn.Module:
    """The same pretrained base every time."""
    torch.manual_seed(0)
    return MODELS[model_name][0]()


def untouched(model: nn.Module, before: dict) -> bool:
    return not any(isinstance(m, AdapterLayer) for m in model.modules()) and all(
        torch.equal(v, model.state_dict()[k]) for k, v in before.items()
    )


def perturb(model: nn.Module) -> None:
    """Stand-in for training: move every trainable tensor."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


def merged_equal(a: nn.Module, b: nn.Module, atol: float) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=atol), k


@pytest.mark.parametrize("model_name", ["mlp", "conv1d", "conv2d"])
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_lora_folder_loads_with_identical_outputs(model_name: str, rslora: bool, tmp_path) -> None:
    _, targets, make_x = MODELS[model_name]
    config = peft.LoraConfig(
        target_modules=targets, r=3, lora_alpha=7, use_rslora=rslora, modules_to_save=SAVED[model_name], init_lora_weights=False
    )
    theirs = peft.get_peft_model(fresh(model_name), config)
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "p")
    ours = orthotune.from_peft(fresh(model_name), tmp_path / "p")
    assert ours.configs["default"].method == "lora" and ours.active_adapters == ["default"]
    x = make_x()
    assert not torch.allclose(theirs(x), fresh(model_name)(x), atol=1e-4)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6, rtol=1e-5)
    merged_equal(ours.merge_and_unload(), theirs.merge_and_unload(), atol=1e-6)


@pytest.mark.parametrize("model_name", ["mlp", "conv1d", "conv2d"])
@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_export_loads_in_peft_with_identical_outputs(model_name: str, method: str, tmp_path) -> None:
    _, targets, make_x = MODELS[model_name]
    cfg_cls = LoRAConfig if method == "lora" else PiSSAConfig
    ours = orthotune.get_model(
        fresh(model_name), cfg_cls(target_modules=targets, r=2, lora_alpha=5, modules_to_save=SAVED[model_name], init_identity=False)
    )
    x = make_x()
    train_steps(ours, x)
    ours.export_peft(tmp_path / "p")
    data = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["r"] == (2 if method == "lora" else 4)

    theirs = peft.PeftModel.from_pretrained(fresh(model_name), tmp_path / "p")
    assert torch.allclose(theirs(x), ours(x), atol=1e-5, rtol=1e-5)
    back = orthotune.from_peft(fresh(model_name), tmp_path / "p")
    assert back.configs["default"].method == "lora"  # PiSSA travels as the equivalent rank-2r LoRA
    assert torch.allclose(back(x), ours(x), atol=1e-5, rtol=1e-5)
    merged_equal(back.merge_and_unload(), theirs.merge_and_unload(), atol=1e-6)


@pytest.mark.parametrize("model_name", ["mlp", "conv1d"])  # peft's FourierFT has no Conv2d
def test_fourierft_both_ways(model_name: str, tmp_path) -> None:
    _, targets, make_x = MODELS[model_name]
    kw = dict(n_frequency=30, scaling=120.0, random_loc_seed=5)
    theirs = peft.get_peft_model(fresh(model_name), peft.FourierFTConfig(target_modules=targets, modules_to_save=SAVED[model_name], **kw))
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "p")
    ours = orthotune.from_peft(fresh(model_name), tmp_path / "p")
    assert isinstance(ours.configs["default"], FourierFTConfig)
    x = make_x()
    assert torch.allclose(ours(x), theirs(x), atol=1e-5, rtol=1e-5)

    train_steps(ours, x)
    ours.export_peft(tmp_path / "q")
    again = peft.PeftModel.from_pretrained(fresh(model_name), tmp_path / "q")
    assert torch.allclose(again(x), ours(x), atol=1e-5, rtol=1e-5)
    merged_equal(ours.merge_and_unload(), again.merge_and_unload(), atol=1e-6)


def test_fourierft_conv2d_export_refused(tmp_path) -> None:
    model = orthotune.get_model(fresh("conv2d"), FourierFTConfig(target_modules=["conv0"], n_frequency=8))
    with pytest.raises(ValueError, match="peft's FourierFT adapts Linear and Conv1D layers only"):
        model.export_peft(tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_lora_round_trip_is_bit_exact(tmp_path) -> None:
    ours = orthotune.get_model(fresh("mlp"), LoRAConfig(target_modules=["lin0", "lin2"], r=2, use_rslora=True, init_identity=False))
    ours.export_peft(tmp_path / "p")
    back = orthotune.from_peft(fresh("mlp"), tmp_path / "p")
    assert back.configs["default"].to_dict() == ours.configs["default"].replace(init_identity=True).to_dict()
    x = torch.randn(3, 16)
    assert torch.equal(back(x), ours(x))


def test_peft_pissa_folder_loads_like_peft(tmp_path) -> None:
    """peft re-derives A0, B0 from the base it is given when loading a PiSSA folder; so does from_peft."""
    _, targets, make_x = MODELS["conv1d"]
    theirs = peft.get_peft_model(fresh("conv1d"), peft.LoraConfig(target_modules=targets, r=3, lora_alpha=6, init_lora_weights="pissa"))
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "p")
    reference = peft.PeftModel.from_pretrained(fresh("conv1d"), tmp_path / "p")
    ours = orthotune.from_peft(fresh("conv1d"), tmp_path / "p")
    assert isinstance(ours.configs["default"], PiSSAConfig)
    x = make_x()
    assert torch.allclose(ours(x), reference(x), atol=1e-5, rtol=1e-5)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_loading_into_an_adapted_model_adds_a_named_adapter(tmp_path) -> None:
    theirs = peft.get_peft_model(fresh("mlp"), peft.LoraConfig(target_modules=["lin1"], r=2, init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "p", safe_serialization=False)  # adapter_model.bin is read too
    assert (tmp_path / "p" / "adapter_model.bin").is_file()
    model = orthotune.get_model(fresh("mlp"), LoCOConfig(target_modules=["lin0"], rank=1, init_identity=False))
    same = orthotune.from_peft(model, tmp_path / "p", adapter_name="peft")
    assert same is model and model.active_adapters == ["peft"] and sorted(model.configs) == ["default", "peft"]
    x = torch.randn(2, 16)
    assert torch.allclose(model(x), theirs(x), atol=1e-6)
    with pytest.raises(ValueError, match="exists already"):
        orthotune.from_peft(model, tmp_path / "p", adapter_name="peft")


def _ia3(p):
    peft.get_peft_model(fresh("mlp"), peft.IA3Config(target_modules=["lin0"], feedforward_modules=[])).save_pretrained(p)


def _lora_with(**kwargs):
    def save(p):
        peft.get_peft_model(fresh("mlp"), peft.LoraConfig(target_modules=["lin0"], r=2, **kwargs)).save_pretrained(p)

    return save


def _orthotune_folder(p):
    orthotune.get_model(fresh("mlp"), LoRAConfig(target_modules=["lin0"], r=2)).save_adapter(p)


def _other_tensors(p):
    from safetensors.torch import save_file

    _lora_with()(p)

    save_file({"base_model.model.lin0.oft_R.weight": torch.zeros(2, 6)}, str(p / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    "make,match",
    [
        (_ia3, r"peft 'IA3' adapter, which orthotune cannot read; supported peft types: " + re.escape(str(PEFT_TYPES))),
        (_lora_with(use_dora=True), r"peft LORA option use_dora=True has no orthotune equivalent"),
        (_lora_with(bias="lora_only"), r"bias='lora_only' has no orthotune equivalent"),
        (_orthotune_folder, r"orthotune adapter folder, not a peft one: load it with orthotune.load_adapter"),
        (_other_tensors, r"holds no LORA tensors"),
    ],
    ids=["unknown-type", "dora", "bias", "orthotune-folder", "other-tensors"],
)
def test_unsupported_folders_fail_clearly_and_change_nothing(make, match, tmp_path) -> None:
    make(tmp_path / "p")
    model = fresh("mlp")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        orthotune.from_peft(model, tmp_path / "p")
    assert untouched(model, before)


def test_mismatched_base_fails_clearly_and_changes_nothing(tmp_path) -> None:
    _lora_with()(tmp_path / "p")
    torch.manual_seed(0)
    model = MODELS["mlp"][0](d=20)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"tensor 'lin0.lora_A' .* has shape \(2, 16\), this model needs \(2, 20\)"):
        orthotune.from_peft(model, tmp_path / "p")
    assert untouched(model, before)
    with pytest.raises(ValueError, match="adapts 'lin0', which this model does not have"):
        orthotune.from_peft(nn.Sequential(nn.Linear(16, 4)), tmp_path / "p")


def test_peft_folder_given_to_load_adapter_points_to_from_peft(tmp_path) -> None:
    _lora_with()(tmp_path / "p")
    with pytest.raises(ValueError, match="saved by peft, load it with orthotune.from_peft"):
        orthotune.load_adapter(fresh("mlp"), tmp_path / "p")


def test_export_of_a_method_without_peft_format_fails_clearly(tmp_path) -> None:
    model = orthotune.get_model(fresh("mlp"), LoCOConfig(target_modules=["lin0"], rank=1))
    with pytest.raises(ValueError, match=r"'loco' has no peft format to export to; exportable methods: " + re.escape(str(sorted(FORMATS)))):
        model.export_peft(tmp_path / "p")
    assert not (tmp_path / "p").exists()
