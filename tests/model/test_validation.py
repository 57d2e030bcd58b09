"""Bad input at every public entry point: a ValueError naming the problem and the fix, nothing changed.

Broken adapter folders are in model/test_io.py, random configs and shapes in model/test_properties.py; here
are the cases a fuzzer does not draw: wrong argument types, quantised, meta-device or NaN base
layers, configs whose init overflows, and the per-method config checks driven from the registry.
"""

from __future__ import annotations

import copy
import dataclasses
import typing

import pytest
import torch
from torch import nn

import orthotune
from orthotune import LoCOConfig, LoRAConfig
from orthotune.layer.adapter_layer import AdapterLayer
from orthotune.methods.registry import METHODS

from ..conftest import MLP
from ..method_cases import CASES


def assert_unchanged(model: nn.Module, before: dict, trainable: dict) -> None:
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert not model._forward_pre_hooks and not model._forward_hooks, "a failed call left a hook behind"
    assert all(v.is_meta or torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable


def refused(model: nn.Module, config, match: str, **kwargs) -> None:
    before = copy.deepcopy(model.state_dict())
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        orthotune.get_model(model, config, **kwargs)
    assert_unchanged(model, before, trainable)


def test_wrong_argument_types(tmp_path) -> None:
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got dict"):
        orthotune.get_model({"weight": torch.zeros(2, 2)}, LoRAConfig(target_modules=["lin0"]))
    orthotune.get_model(MLP(), LoRAConfig(target_modules=["lin0"], r=2)).save_adapter(tmp_path / "a")
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got str"):
        orthotune.load_adapter("bert-base-uncased", tmp_path / "a")
    refused(MLP(), {"target_modules": ["lin0"]}, "config must be an orthotune AdapterConfig")
    refused(MLP(), LoRAConfig(target_modules=["lin0"], r=2), "adapter name 'a.b' must be a non-empty string", adapter_name="a.b")
    for field in ("init_identity", "autocast_adapter_dtype"):
        with pytest.raises(ValueError, match=f"{field} must be True or False, got 'no'"):
            LoRAConfig(target_modules=["lin0"], **{field: "no"})
    with pytest.raises(ValueError, match="target_modules must hold non-empty strings"):
        LoRAConfig(target_modules=["lin0", 3])
    with pytest.raises(ValueError, match="not a valid regex"):
        LoRAConfig(target_modules="lin[0")
    with pytest.raises(ValueError, match="lora_alpha must be a finite number, got nan"):
        LoRAConfig(target_modules=["lin0"], lora_alpha=float("nan"))


def test_targets_that_match_nothing_or_a_non_linear_module() -> None:
    refused(MLP(), LoRAConfig(target_modules=["lin9"], r=2), r"entry 'lin9' matches no module.*did you mean")
    refused(MLP(), LoRAConfig(target_modules="nothing.*", r=2), "matched no adaptable layer.*end in")
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LayerNorm(4))
    refused(net, LoRAConfig(target_modules=["1", "2"], r=2), r"target '1' is a ReLU, not a layer orthotune adapts.*\(1 more like it\)")
    refused(net, LoRAConfig(target_modules=[], r=2), "matched no adaptable layer")
    # an excluded non-linear match is not an error
    assert orthotune.get_model(net, LoRAConfig(target_modules=r"\d", exclude_modules=["1", "2"], r=2)) is not None


def quantised() -> nn.Module:
    model = MLP()
    model.lin0.weight = nn.Parameter(torch.randint(-8, 8, (24, 16), dtype=torch.int8), requires_grad=False)
    return model


def test_quantised_meta_and_broken_base_layers_are_refused(tmp_path) -> None:
    refused(quantised(), LoRAConfig(target_modules=["lin0"], r=2), r"'lin0' has a torch.int8 weight \(quantised or integer")
    refused(quantised(), LoRAConfig(target_modules="all-linear", r=2), "'lin0' has a torch.int8 weight.*exclude_modules")
    assert orthotune.get_model(quantised(), LoRAConfig(target_modules="all-linear", exclude_modules=["lin0"], r=2))
    with torch.device("meta"):
        meta = MLP()
    refused(meta, LoRAConfig(target_modules=["lin1"], r=2), "meta device.*load the model's weights")
    broken = MLP()
    with torch.no_grad():
        broken.lin1.weight[3, 3] = float("inf")
    refused(broken, LoRAConfig(target_modules=["lin1"], r=2), "'lin1' has NaN or Inf in its frozen weight")

    orthotune.get_model(MLP(), LoRAConfig(target_modules=["lin0"], r=2)).save_adapter(tmp_path / "a")
    model = quantised()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="cannot load the adapter in .*'lin0' has a torch.int8 weight"):
        orthotune.load_adapter(model, tmp_path / "a")
    assert_unchanged(model, before, {n: p.requires_grad for n, p in model.named_parameters()})


@pytest.mark.parametrize("kwargs,match", [
    (dict(init_std=1e30), "NaN or Inf in its output on layer 'lin0'"),  # V V^T overflows float32
    (dict(init_std=1e300), "NaN or Inf in 'V' on layer 'lin0'"),  # inf once rounded to float32
])
def test_an_init_that_overflows_is_refused_before_anything_changes(kwargs, match) -> None:
    refused(MLP(), LoCOConfig(target_modules=["lin0"], rank=2, **kwargs), match)


def test_a_failed_add_adapter_leaves_the_first_adapter_as_it_was() -> None:
    model = orthotune.get_model(MLP(), LoRAConfig(target_modules=["lin0"], r=2, init_identity=False))
    x = torch.randn(2, 16)
    before = model(x)
    state = copy.deepcopy(model.state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="LoCO rank=20 is too large for 'lin0'"):
        model.add_adapter("big", LoCOConfig(target_modules=["lin0"], rank=20))
    assert model.configs.keys() == {"default"} and torch.equal(model(x), before)
    assert model.state_dict().keys() == state.keys()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    model.merge("default")  # one name, as a string
    assert model.merged and torch.allclose(model(x), before, atol=1e-6)


def _int_fields(cfg_cls: type) -> list[str]:
    hints = typing.get_type_hints(cfg_cls)
    common = {f.name for f in dataclasses.fields(orthotune.AdapterConfig)}
    return [f.name for f in dataclasses.fields(cfg_cls) if f.name not in common and hints[f.name] is int]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_integer_hyperparameter_refuses_negatives_by_name(method: str) -> None:
    """Ranks, block sizes, chain lengths, frequency counts: a negative value is refused at construction,
    naming the field (0 too, unless the method gives 0 a meaning, as peft's OFT does for block sizes)."""
    cfg_cls = METHODS[method][0]
    case = next(c for c in CASES if c.method == method)
    checked = 0
    for field in _int_fields(cfg_cls):
        if "seed" in field:
            continue  # any integer is a seed
        for value in (0, -3):
            try:
                cfg_cls(target_modules=["lin0"], **{**case.kwargs, field: value})
            except ValueError as err:
                assert field in str(err), (field, str(err))
                checked += 1
            else:
                assert value == 0, f"{method}: {field}={value} was accepted"
    assert checked or not _int_fields(cfg_cls)


DROPOUTS = [(m, f.name) for m in sorted(METHODS) for f in dataclasses.fields(METHODS[m][0]) if f.name.endswith("dropout")]


@pytest.mark.parametrize("method,field", DROPOUTS, ids=[f"{m}-{f}" for m, f in DROPOUTS])
def test_every_dropout_outside_0_1_is_refused_by_name(method: str, field: str) -> None:
    cfg_cls = METHODS[method][0]
    case = next(c for c in CASES if c.method == method)
    for value in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=rf"{field} must be in \[0, 1\), got {value}"):
            cfg_cls(target_modules=["lin0"], **{**case.kwargs, field: value})
    cfg_cls(target_modules=["lin0"], **{**case.kwargs, field: 0.5})
    assert len(DROPOUTS) >= 5  # lora, loca, oft, boft, psoft at least


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_choice_refuses_an_unknown_strategy(method: str) -> None:
    cfg_cls = METHODS[method][0]
    case = next(c for c in CASES if c.method == method)
    hints = typing.get_type_hints(cfg_cls)
    for field in dataclasses.fields(cfg_cls):
        if hints[field.name] is str:
            with pytest.raises(ValueError, match=f"{field.name}='warp' is not supported; choose one of"):
                cfg_cls(target_modules=["lin0"], **{**case.kwargs, field.name: "warp"})


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hyperparameters_too_large_for_the_layer_are_refused_by_name(case) -> None:
    """Every case on a 2x2 layer: either it fits (and computes finite outputs) or check_layer refuses
    it naming the layer, before anything changes."""
    net = nn.Sequential(nn.Linear(2, 2))
    config = METHODS[case.method][0](target_modules=["0"], **case.kwargs)
    before = copy.deepcopy(net.state_dict())
    try:
        model = orthotune.get_model(net, config)
    except ValueError as err:
        assert "'0'" in str(err), str(err)
        assert_unchanged(net, before, {n: True for n, _ in net.named_parameters()})
    else:
        assert torch.isfinite(model(torch.randn(3, 2))).all()
