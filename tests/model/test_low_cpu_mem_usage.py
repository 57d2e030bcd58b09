"""peft's ``low_cpu_mem_usage``: adapter parameters created on the meta device, then assigned the loaded tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthotune
from orthotune.interop import peft_api
from orthotune.model import io as adapter_io
from orthotune.model import meta_init
from orthotune.interop.peft_api import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from orthotune.methods.registry import METHODS

from ..peft_common.cases import METHOD_KWARGS


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 12)
        self.lin1 = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def _base() -> nn.Module:
    torch.manual_seed(0)
    return Net()


def _trained(method: str) -> orthotune.OrthoModel:
    config = METHODS[method][0](target_modules=["lin0"], init_identity=False, **METHOD_KWARGS[method][0])
    torch.manual_seed(1)
    return orthotune.get_peft_model(_base(), config)


@pytest.fixture
def assigned(monkeypatch):
    """Every materialised layer: (parameters all on meta before, parameters sharing the given tensors after)."""
    seen: list[tuple[bool, bool]] = []
    original = meta_init.materialize

    def spy(method, state, module, name):
        on_meta = all(p.is_meta for p in method.parameters())
        original(method, state, module, name)
        shared = all(p.data_ptr() == state[k].data_ptr() for k, p in method.named_parameters())
        seen.append((on_meta, shared))

    for caller in (adapter_io, peft_api):  # the modules that call it
        monkeypatch.setattr(caller, "materialize", spy)
    return seen


@pytest.mark.parametrize("method", sorted(METHODS))
@torch.no_grad()
def test_from_pretrained_low_cpu_mem_usage_equals_normal_load(method, tmp_path, assigned) -> None:
    _trained(method).save_pretrained(tmp_path)
    x = torch.randn(5, 16)
    normal = orthotune.PeftModel.from_pretrained(_base(), tmp_path)
    assert not assigned
    low = orthotune.PeftModel.from_pretrained(_base(), tmp_path, low_cpu_mem_usage=True)
    assert assigned == [(True, True)]  # built on meta (no init), the loaded tensors themselves assigned
    assert torch.equal(normal(x), low(x))
    normal_state, low_state = (get_peft_model_state_dict(m) for m in (normal, low))
    assert normal_state.keys() == low_state.keys() and all(torch.equal(normal_state[k], low_state[k]) for k in normal_state)
    assert not any(t.is_meta for t in low.state_dict().values())


@torch.no_grad()
def test_load_adapter_low_cpu_mem_usage(tmp_path, assigned) -> None:
    _trained("hra").save_pretrained(tmp_path)
    model = _trained("lora")
    model.load_adapter(tmp_path, "other", low_cpu_mem_usage=True)
    model.set_adapter("other")
    x = torch.randn(5, 16)
    assert assigned == [(True, True)]
    assert torch.equal(model(x), orthotune.PeftModel.from_pretrained(_base(), tmp_path)(x))


@torch.no_grad()
def test_get_peft_model_low_cpu_mem_usage_then_state_dict(assigned) -> None:
    source = _trained("oft")
    config = source.peft_config["default"]
    empty = orthotune.get_peft_model(_base(), config, low_cpu_mem_usage=True)
    method = dict(empty.adapter_layers())["lin0"].adapters["default"]
    assert all(p.is_meta for p in method.parameters())
    result = set_peft_model_state_dict(empty, get_peft_model_state_dict(source), low_cpu_mem_usage=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(5, 16)
    assert torch.equal(empty(x), source(x))
    assert all(p.requires_grad for p in method.parameters())


def test_inject_adapter_in_model_low_cpu_mem_usage() -> None:
    source = _trained("lora")
    model = inject_adapter_in_model(
        source.peft_config["default"], _base(), low_cpu_mem_usage=True, state_dict=get_peft_model_state_dict(source)
    )
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_partial_state_dict_is_refused() -> None:
    source = _trained("lora")
    empty = orthotune.get_peft_model(_base(), source.peft_config["default"], low_cpu_mem_usage=True)
    state = get_peft_model_state_dict(source)
    state.pop(next(iter(state)))
    with pytest.raises(ValueError, match="assigns whole layers"):
        set_peft_model_state_dict(empty, state, low_cpu_mem_usage=True)


@torch.no_grad()
def test_peft_folder_low_cpu_mem_usage_equals_peft(tmp_path, assigned) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(2)
    source = peft.get_peft_model(_base(), peft.LoraConfig(target_modules=["lin0"], r=4, init_lora_weights=False)).eval()
    source.save_pretrained(tmp_path)
    x = torch.randn(5, 16)
    loaded = orthotune.PeftModel.from_pretrained(_base(), tmp_path, low_cpu_mem_usage=True)
    assert assigned == [(True, True)]
    assert torch.allclose(loaded(x), source(x), atol=1e-6, rtol=1e-6)
