"""peft's utilities under peft's names, and mixed-adapter batches.

Each test is guarded by ``requires_api`` until its API exists (branches peftflow and mixed).
"""

from __future__ import annotations

import pytest
import torch

import orthotune

from .cases import CASES, params
from .harness import allclose, batch, config, make, requires_api, wrappers
from .models import base_model, output

pytestmark = pytest.mark.parametrize("case", params(CASES))


@requires_api("orthotune.get_peft_model_state_dict")
@requires_api("orthotune.set_peft_model_state_dict")
def test_peft_model_state_dict_roundtrip(case) -> None:
    model = make(case, init_identity=False).eval()
    state = orthotune.get_peft_model_state_dict(model)
    assert state and all(isinstance(t, torch.Tensor) for t in state.values())
    other = make(case).eval()
    orthotune.set_peft_model_state_dict(other, state)
    with torch.no_grad():
        assert torch.equal(output(other, batch(case)), output(model, batch(case)))


@requires_api("orthotune.inject_adapter_in_model")
def test_inject_adapter_in_model(case) -> None:
    model = orthotune.inject_adapter_in_model(config(case), base_model(case.kind))
    assert wrappers(model)
    output(model, batch(case))


@requires_api("peft_config")
@requires_api("active_peft_config")
def test_peft_config(case) -> None:
    model = make(case)
    assert set(model.peft_config) == {"default"}
    assert model.active_peft_config is model.peft_config["default"]


@requires_api("get_layer_status")
@requires_api("get_model_status")
def test_layer_and_model_status(case) -> None:
    model = make(case)
    assert len(model.get_layer_status()) == len(list(model.adapter_layers()))
    assert model.get_model_status() is not None


@requires_api("set_requires_grad")
def test_set_requires_grad(case) -> None:
    model = make(case, adapter_name="adapter0")
    model.add_adapter("adapter1", config(case))
    model.set_requires_grad("adapter1", requires_grad=True)
    assert any(p.requires_grad for n, p in model.named_parameters() if ".adapter1." in n)
    model.set_requires_grad("adapter1", requires_grad=False)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".adapter1." in n)


@requires_api("add_weighted_adapter")
def test_weighted_combination_of_adapters(case) -> None:
    """Every method combines two adapters into a third that runs; LoRA's ``cat`` equals both active."""
    model = make(case, adapter_name="adapter1", init_identity=False).eval()
    model.add_adapter("adapter_2", config(case, init_identity=False))
    weights = [1.0, 1.0] if case.method == "hra" else [0.5, 1.5]  # reflections have no power: HRA combines at weight 1
    if case.saved:  # peft refuses adapters that train the same module in full (modules_to_save), and so do we
        with pytest.raises(ValueError, match="modules_to_save"):
            model.add_weighted_adapter(["adapter1", "adapter_2"], weights, "combined")
        return
    model.add_weighted_adapter(["adapter1", "adapter_2"], weights, "combined")
    model.set_adapter("combined")
    assert model.active_adapters == ["combined"]
    with torch.no_grad():
        assert torch.isfinite(output(model, batch(case))).all()
    if case.method == "lora":
        model.add_weighted_adapter(["adapter1", "adapter_2"], [1.0, 1.0], "cat", combination_type="cat")
        model.set_adapter("cat")
        with torch.no_grad():
            cat = output(model, batch(case))
            model.set_adapter(["adapter1", "adapter_2"])
            assert allclose(cat, output(model, batch(case)), (1e-5, 1e-5))


def mixed_rows(case):
    """Outputs of the base, adapter0 and adapter1 on a batch of 3 samples, and the model."""
    model = make(case, adapter_name="adapter0", init_identity=False).eval()
    torch.manual_seed(1)
    model.add_adapter("adapter1", config(case, init_identity=False))
    x = {k: torch.cat([v] * 3)[:9] for k, v in batch(case).items()}
    with torch.no_grad():
        with model.disable_adapter():
            base = output(model, x)
        model.set_adapter("adapter0")
        out0 = output(model, x)
        model.set_adapter("adapter1")
        out1 = output(model, x)
    return model, x, base, out0, out1


@requires_api("orthotune.layer.mixed")
def test_mixed_adapter_batches(case) -> None:
    if case.kind == "Conv2d":
        pytest.skip("peft's Conv2d toy reshapes its batch (9 rows -> 2 images): samples do not map to rows")
    model, x, base, out0, out1 = mixed_rows(case)
    names = ["__base__", "adapter0", "adapter1"] * (len(base) // 3)
    with torch.no_grad():
        mixed = output(model, {**x, "adapter_names": names})
    tol = (1e-4, 1e-4)
    assert allclose(base[::3], mixed[::3], tol)
    assert allclose(out0[1::3], mixed[1::3], tol)
    assert allclose(out1[2::3], mixed[2::3], tol)
