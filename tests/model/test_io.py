"""Adapter folders: round trips, and every broken folder refused before the model changes."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from torch import nn

import orthotune
from orthotune import LoCOConfig, LoRAConfig
from orthotune.model.io import CONFIG_NAME, WEIGHTS_NAME
from safetensors.torch import load_file, save_file
from orthotune.layer.adapter_layer import AdapterLayer

from ..conftest import MLP as _MLP


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
    """No wrapper, the same tensors, and every parameter still trainable (as a fresh model's are)."""
    return (
        not any(isinstance(m, AdapterLayer) for m in model.modules())
        and not model._forward_pre_hooks
        and not model._forward_hooks
        and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        and all(p.requires_grad for p in model.parameters())
    )


def test_folder_layout_and_config(saved) -> None:
    _, path = saved
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    data = json.loads((path / CONFIG_NAME).read_text())
    assert data["method"] == "loco" and data["rank"] == 2 and data["format_version"] == 1
    assert data["targets"] == {"lin0": [24, 16, "linear"], "lin1": [24, 24, "linear"]}
    assert not list(path.parent.glob(".ad.*")), "no temporary folders left behind"


def test_folder_is_readable_as_save_pretrained_makes_it_and_a_resave_keeps_its_permissions(saved) -> None:
    """A new folder is 0755 (as peft's os.makedirs leaves it), not the 0700 of the temporary folder it is written in;
    saving over a folder whose owner set other permissions keeps them."""
    model, path = saved
    assert path.stat().st_mode & 0o777 == 0o755
    path.chmod(0o750)
    model.save_adapter(path)
    assert path.stat().st_mode & 0o777 == 0o750


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
    _edit_config(p, method="telepathy")


def _edit_config(p, **changes):
    data = json.loads((p / CONFIG_NAME).read_text())
    data.update(changes)
    (p / CONFIG_NAME).write_text(json.dumps(data))


def _edit_tensors(p, edit):
    """Rewrite the weights with ``edit(state)`` and a matching checksum (a deliberate, consistent edit)."""
    state = load_file(str(p / WEIGHTS_NAME))
    edit(state)
    save_file(state, str(p / WEIGHTS_NAME))
    _edit_config(p, weights_sha256=hashlib.sha256((p / WEIGHTS_NAME).read_bytes()).hexdigest())


def _nan_tensor(p):
    _edit_tensors(p, lambda s: s["lin1.U"].view(-1)[0].fill_(float("nan")))


def _int_tensor(p):
    _edit_tensors(p, lambda s: s.update({"lin0.V": s["lin0.V"].round().long()}))


def _drop_tensor(p):
    _edit_tensors(p, lambda s: s.pop("lin1.V"))


def _edited_rank(p):
    _edit_config(p, rank=1)


def _edited_targets(p):
    data = json.loads((p / CONFIG_NAME).read_text())
    _edit_config(p, targets={**data["targets"], "lin0": [24, 12, "linear"]})


def _weights_of_another_adapter(p):
    other = orthotune.get_model(MLP(), LoCOConfig(target_modules=["lin0", "lin1"], rank=2, init_identity=False))
    other.save_adapter(p.parent / "other")
    (p / WEIGHTS_NAME).write_bytes((p.parent / "other" / WEIGHTS_NAME).read_bytes())


def _invalid_version(p):
    _edit_config(p, format_version="1")


def _drop_config(p):
    (p / CONFIG_NAME).unlink()


def _peft_config(p):
    (p / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 2}))


def _json_list(p):
    (p / CONFIG_NAME).write_text("[1, 2]")


def _no_targets(p):
    _edit_config(p, targets={})


def _bad_field_value(p):
    _edit_config(p, chain_length=0)


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
        (_nan_tensor, "'lin1.U' .* holds NaN or Inf.*earlier checkpoint"),
        (_int_tensor, "'lin0.V' .* is torch.int64, this adapter needs a torch.float32 tensor"),
        (_drop_tensor, r"missing \['lin1.V'\].*edited"),
        (_edited_rank, r"'lin0.U' .* has shape \(4, 16, 2\), this model needs \(4, 16, 1\).*edited \(e.g. its rank\)"),
        (_edited_targets, "shape mismatch at 'lin0'"),
        (_weights_of_another_adapter, "checksum"),
        (_invalid_version, "invalid format_version '1'"),
        (_drop_config, "has no adapter_config.json"),
        (_peft_config, "saved by peft, load it with orthotune.from_peft"),
        (_json_list, "not an orthotune adapter config"),
        (_no_targets, "lists no adapted modules"),
        (_bad_field_value, "chain_length must be a positive integer, got 0"),
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
    model.load_adapter(path, "copy", is_trainable=True)  # same autograd path as "default": equal bits
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


@pytest.mark.parametrize("saved_dtype,autocast,load_dtype", [
    (torch.float32, True, torch.bfloat16),
    (torch.bfloat16, False, torch.float32),
    (torch.float16, False, torch.bfloat16),
])
def test_adapter_loads_into_a_model_of_another_dtype(tmp_path, saved_dtype, autocast, load_dtype) -> None:
    cfg = LoCOConfig(target_modules=["lin0", "lin1"], rank=2, init_identity=False, autocast_adapter_dtype=autocast)
    model = orthotune.get_model(MLP().to(saved_dtype), cfg)
    model.save_adapter(tmp_path / "a")
    loaded = orthotune.load_adapter(MLP().to(load_dtype), tmp_path / "a")
    want = torch.float32 if autocast else load_dtype
    for lname, layer in loaded.adapter_layers():
        saved = dict(model.adapter_layers())[lname].adapters["default"]
        for name, p in layer.adapters["default"].named_parameters():
            assert p.dtype == want
            assert torch.equal(p, getattr(saved, name).to(want)), "casting across dtypes must round once, exactly"
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref, got = model.float()(x), loaded.float()(x)
    assert float((got - ref).norm() / ref.norm()) < 2e-2


def test_nan_adapter_is_not_saved_and_the_previous_folder_survives(saved) -> None:
    model, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    layer = dict(model.adapter_layers())["lin1"]
    with torch.no_grad():
        layer.adapters["default"].V[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="refusing to save adapter 'default': tensor 'lin1.V' holds NaN or Inf"):
        model.save_adapter(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert not list(path.parent.glob(".ad.*"))


def test_save_cut_between_the_two_files_of_a_shared_folder_keeps_the_previous_adapter(saved, monkeypatch) -> None:
    """A folder holding other files (a trainer checkpoint) is updated file by file, with backups."""
    model, path = saved
    (path / "trainer_state.json").write_text("{}")
    model.save_adapter(path)  # the shared-folder path, no interruption
    assert orthotune.load_adapter(MLP(), path) is not None and not list(path.glob(".*.prev"))
    x = torch.randn(2, 16)
    previous = model(x)
    with torch.no_grad():
        for _, layer in model.adapter_layers():
            layer.adapters["default"].U.add_(0.5)

    real_replace = orthotune.model.io.os.replace

    def cut_before_config(src, dst):
        if str(dst).endswith(CONFIG_NAME) and ".prev" not in str(dst):
            raise KeyboardInterrupt  # the process dies after the weights went in
        return real_replace(src, dst)

    monkeypatch.setattr(orthotune.model.io.os, "replace", cut_before_config)
    with pytest.raises(KeyboardInterrupt):
        model.save_adapter(path)
    monkeypatch.setattr(orthotune.model.io.os, "replace", real_replace)

    with pytest.raises(ValueError, match=r"interrupted save left the previous adapter as \.adapter_model\.safetensors\.prev"):
        orthotune.load_adapter(MLP(), path)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        (path / f".{name}.prev").rename(path / name)
    assert torch.equal(orthotune.load_adapter(MLP(), path)(x), previous)
    model.save_adapter(path)
    assert torch.equal(orthotune.load_adapter(MLP(), path)(x), model(x))
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME, "trainer_state.json"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_adapter_saved_on_cpu_loads_into_a_gpu_model_and_back(tmp_path) -> None:
    model = orthotune.get_model(MLP(), LoCOConfig(target_modules=["lin0", "lin1"], rank=2, init_identity=False))
    model.save_adapter(tmp_path / "cpu")
    on_gpu = orthotune.load_adapter(MLP().to("cuda", torch.bfloat16), tmp_path / "cpu")
    assert all(p.device.type == "cuda" for p in on_gpu.parameters())
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref, got = model(x), on_gpu(x.to("cuda", torch.bfloat16)).float().cpu()
    assert float((got - ref).norm() / ref.norm()) < 2e-2
    on_gpu.save_adapter(tmp_path / "gpu")
    back = orthotune.load_adapter(MLP(), tmp_path / "gpu")
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
