"""Adapter folders: round trips, and every broken folder refused before the model changes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import orthotune
from orthotune import LoCOConfig, LoRAConfig
from orthotune.io import CONFIG_NAME, WEIGHTS_NAME
from orthotune.layer import AdapterLayer

from .conftest import MLP as _MLP


def MLP(d: int = 16) -> nn.Module:
    """The same base weights every time, as a real pretrained model would have."""
    torch.manual_seed(0)
    return _MLP(d)


@pytest.fixture
def saved(tmp_path):
    model = orthotune.get_model(MLP(), LoCOConfig(target_modules=["lin0", "lin1"], rank=2, init_identity=False, modules_to_save=["head"]))
    model.save_adapter(tmp_path / "ad")
    return model, tmp_path / "ad"


def untouched(model: nn.Module, before: dict) -> bool:
    return not any(isinstance(m, AdapterLayer) for m in model.modules()) and all(
        torch.equal(v, model.state_dict()[k]) for k, v in before.items()
    )


def test_folder_layout_and_config(saved) -> None:
    _, path = saved
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    data = json.loads((path / CONFIG_NAME).read_text())
    assert data["method"] == "loco" and data["rank"] == 2 and data["format_version"] == 1
    assert data["targets"] == {"lin0": [24, 16, "linear"], "lin1": [24, 24, "linear"]}
    assert not list(path.parent.glob(".ad.*")), "no temporary folders left behind"


def test_roundtrip_is_bit_exact_including_saved_modules(saved) -> None:
    model, path = saved
    x = torch.randn(4, 16)
    loaded = orthotune.load_adapter(MLP(), path)
    assert torch.equal(loaded(x), model(x))


def test_overwrite_keeps_one_whole_adapter(saved) -> None:
    model, path = saved
    with torch.no_grad():
        for _, layer in model.adapter_layers():
            layer.adapters["default"].U.add_(0.1)
    model.save_adapter(path)
    x = torch.randn(2, 16)
    assert torch.equal(orthotune.load_adapter(MLP(), path)(x), model(x))
    assert not list(path.parent.glob(".ad.*"))


def _corrupt_json(p):
    (p / CONFIG_NAME).write_text("{not json")


def _truncate(p):
    data = (p / WEIGHTS_NAME).read_bytes()
    (p / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def _flip_byte(p):
    data = bytearray((p / WEIGHTS_NAME).read_bytes())
    data[-3] ^= 0xFF
    (p / WEIGHTS_NAME).write_bytes(bytes(data))


def _drop_weights(p):
    (p / WEIGHTS_NAME).unlink()


def _newer_format(p):
    data = json.loads((p / CONFIG_NAME).read_text())
    data["format_version"] = 99
    (p / CONFIG_NAME).write_text(json.dumps(data))


def _unknown_field(p):
    data = json.loads((p / CONFIG_NAME).read_text())
    data["warp_factor"] = 9
    (p / CONFIG_NAME).write_text(json.dumps(data))


def _other_method(p):
    data = json.loads((p / CONFIG_NAME).read_text())
    data["method"] = "telepathy"
    (p / CONFIG_NAME).write_text(json.dumps(data))


@pytest.mark.parametrize(
    "damage,match",
    [
        (_corrupt_json, "not valid JSON"),
        (_truncate, "checksum"),
        (_flip_byte, "checksum"),
        (_drop_weights, "has no adapter_model.safetensors"),
        (_newer_format, "newer than this orthotune"),
        (_unknown_field, r"unknown LoCOConfig fields \['warp_factor'\]"),
        (_other_method, "unknown method 'telepathy'"),
    ],
)
def test_broken_folder_fails_clearly_and_leaves_model_untouched(saved, damage, match) -> None:
    _, path = saved
    damage(path)
    model = MLP()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        orthotune.load_adapter(model, path)
    assert untouched(model, before)


def test_mismatched_base_model_fails_clearly(saved) -> None:
    _, path = saved

    model = MLP(d=20)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="shape mismatch at 'lin0'.*different base model"):
        orthotune.load_adapter(model, path)
    assert untouched(model, before)

    other = nn.Sequential(nn.Linear(16, 24))
    with pytest.raises(ValueError, match="adapts 'lin0', which this model does not have"):
        orthotune.load_adapter(other, path)


def test_config_of_another_method_is_refused() -> None:
    data = LoCOConfig(target_modules=["a"]).to_dict()
    with pytest.raises(ValueError, match="config is for method 'loco', not 'lora'"):
        LoRAConfig.from_dict(data)


def test_missing_folder_and_load_into_adapted_model(saved, tmp_path) -> None:
    model, path = saved
    with pytest.raises(ValueError, match="does not exist"):
        orthotune.load_adapter(MLP(), tmp_path / "nope")
    model.load_adapter(path, "copy")
    assert model.active_adapters == ["default"]
    with pytest.raises(ValueError, match="exists already"):
        model.load_adapter(path, "copy")
    x = torch.randn(2, 16)
    y = model(x)
    model.set_adapter("copy")
    assert torch.equal(model(x), y)


def test_save_pretrained_puts_each_adapter_in_its_folder(tmp_path) -> None:
    model = orthotune.get_model(MLP(), LoCOConfig(target_modules=["lin0"], rank=1, init_identity=False))
    model.add_adapter("second", LoRAConfig(target_modules=["lin2"], r=2, init_identity=False))
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / CONFIG_NAME).is_file() and (tmp_path / "out" / "second" / CONFIG_NAME).is_file()
    fresh = orthotune.load_adapter(MLP(), tmp_path / "out")
    fresh.load_adapter(tmp_path / "out" / "second", "second")
    fresh.set_adapter(["default", "second"])
    model.set_adapter(["default", "second"])
    x = torch.randn(2, 16)
    assert torch.equal(fresh(x), model(x))
