"""peft's saving and loading tests: ``_test_save_pretrained`` (and ``_pickle``), ``test_save_load_roundtrip``,
``test_parameters_after_loading_model``, ``_test_inference_safetensors``, ``_test_load_multiple_adapters``,
``_test_save_pretrained_selected_adapters``, ``_test_save_pretrained_adapter_name_substring``,
``_test_from_pretrained_config_construction``, ``_test_model_attr``.

peft's ``PeftModel.from_pretrained(model, dir)`` is ``orthotune.load_adapter(model, dir)`` here.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load_file

import orthotune
from orthotune import AdapterModel, OrthoModel, load_adapter

from .cases import CASES, params
from .harness import adapter_parameters, base_output, batch, config, make, requires_api, train
from .models import base_model, output

pytestmark = pytest.mark.parametrize("case", params(CASES))


def _state(model) -> dict[str, torch.Tensor]:
    return {n: t for n, t in model.state_dict().items() if ".adapters." in n or ".copies." in n}


def test_save_pretrained(case, tmp_path) -> None:
    model = make(case, init_identity=False)
    model.save_pretrained(tmp_path)
    loaded = load_adapter(base_model(case.kind), tmp_path)
    state, state_loaded = _state(model), _state(loaded)
    assert state.keys() == state_loaded.keys()
    assert all(torch.allclose(state[k], state_loaded[k]) for k in state)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names
    assert not names & {"model.safetensors", "config.json", "pytorch_model.bin"}


def test_save_pretrained_pickle(case) -> None:
    model = make(case, init_identity=False).eval()
    clone = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(output(clone, batch(case)), output(model, batch(case)))


def test_save_load_roundtrip(case, tmp_path) -> None:
    output_base = base_output(case)
    model = make(case, init_identity=False).eval()
    with torch.inference_mode():
        output_before = output(model, batch(case))
    assert not torch.allclose(output_base, output_before, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    torch.manual_seed(54321)  # loading must not depend on the seed
    loaded = load_adapter(base_model(case.kind), tmp_path).eval()
    with torch.inference_mode():
        assert torch.allclose(output_before, output(loaded, batch(case)), atol=1e-5, rtol=1e-5)


def test_parameters_after_loading_model(case, tmp_path) -> None:
    model = make(case)
    # peft's 0.5 on a sum loss takes HRA's reflections and LoCO's generators to norms of 1e4 and more in 3 steps
    # (angles of 1e9 rad, past what float32 resolves, and a trajectory chaotic in rounding): 0.1 for both
    train(case, model, lr=0.5 if case.method not in ("hra", "loco") else 0.1, loss="sum")
    before = _state(model)
    model.save_pretrained(tmp_path)
    after = _state(load_adapter(base_model(case.kind), tmp_path))
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], atol=1e-4, rtol=1e-4) for k in before)


def test_inference_safetensors(case, tmp_path) -> None:
    model = make(case)
    output(model, batch(case)).sum().backward()
    model.eval()
    with torch.no_grad():
        logits = output(model, batch(case))
    model.save_pretrained(tmp_path)
    assert "adapter_model.safetensors" in {p.name for p in tmp_path.iterdir()}
    loaded = load_adapter(base_model(case.kind), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(logits, output(loaded, batch(case)), atol=1e-4, rtol=1e-4)


def test_load_multiple_adapters(case, tmp_path) -> None:
    model = make(case, init_identity=False)
    model.save_pretrained(tmp_path)
    loaded = load_adapter(base_model(case.kind), tmp_path)
    loaded.load_adapter(tmp_path, "other")
    loaded.load_adapter(tmp_path, "yet-another")
    assert set(loaded.configs) == {"default", "other", "yet-another"}
    for name in ("other", "yet-another"):
        loaded.set_adapter(name)
        with torch.no_grad():
            assert torch.equal(output(loaded.eval(), batch(case)), output(model.eval(), batch(case)))


def test_save_pretrained_multiple_adapters(case, tmp_path) -> None:
    """``_test_save_pretrained_selected_adapters``' first half: every adapter saved, the others in subfolders."""
    model = make(case, init_identity=False)
    model.add_adapter("new_adapter", config(case, init_identity=False))
    model.save_pretrained(tmp_path)
    loaded = load_adapter(base_model(case.kind), tmp_path)
    loaded.load_adapter(tmp_path / "new_adapter", "new_adapter")
    state, state_loaded = _state(model), _state(loaded)
    assert state.keys() == state_loaded.keys()
    assert all(torch.allclose(state[k], state_loaded[k]) for k in state)
    for folder in (tmp_path, tmp_path / "new_adapter"):
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json"} <= names
        assert not names & {"model.safetensors", "config.json"}


@requires_api("save_pretrained", keyword="selected_adapters")
def test_save_pretrained_selected_adapters(case, tmp_path) -> None:
    model = make(case)
    model.add_adapter("new_adapter", config(case))
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    loaded = load_adapter(base_model(case.kind), tmp_path)
    assert set(loaded.configs) == {"default"} and not (tmp_path / "new_adapter").exists()


@requires_api("save_pretrained", keyword="selected_adapters")
@requires_api("orthotune.get_peft_model_state_dict")
def test_save_pretrained_adapter_name_substring(case, tmp_path) -> None:
    model = make(case)
    expected = len(orthotune.get_peft_model_state_dict(model))
    for name in ("default2", "other_default", "foodefault_bar", "efaul"):
        model.add_adapter(name, config(case))
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    assert len(load_file(tmp_path / "adapter_model.safetensors")) == expected


@requires_api("from_pretrained")
def test_from_pretrained_config_construction(case, tmp_path) -> None:
    model = make(case)
    model.save_pretrained(tmp_path)
    cfg = config(case)
    loaded = OrthoModel.from_pretrained(base_model(case.kind), tmp_path, is_trainable=False, config=cfg)
    assert loaded.configs["default"] is cfg
    assert not any(p.requires_grad for p in loaded.parameters())


@requires_api("load_adapter", keyword="is_trainable")
@pytest.mark.parametrize("is_trainable", [False, True])
def test_loading_model_requires_grad_set_correctly(case, is_trainable: bool, tmp_path) -> None:
    """peft's test: the loaded adapter trains only if ``is_trainable``; a second loaded one is not activated, so
    it does not train either way."""
    make(case).save_pretrained(tmp_path)
    model = OrthoModel.from_pretrained(base_model(case.kind), tmp_path, is_trainable=is_trainable)
    model.load_adapter(tmp_path, "other", is_trainable=is_trainable)
    params = adapter_parameters(model)
    assert any(".other." in n for n in params) and any(".default." in n for n in params)
    assert all(p.requires_grad == (is_trainable and ".default." in n) for n, p in params.items())


def test_model_attr(case) -> None:
    """The adapter's own save_pretrained, from_pretrained and push_to_hub, never the base model's."""
    model = make(case)
    for name in ("save_pretrained", "from_pretrained", "push_to_hub"):
        assert hasattr(model, name)
        assert any(name in vars(cls) for cls in type(model).__mro__ if issubclass(cls, AdapterModel)), name
