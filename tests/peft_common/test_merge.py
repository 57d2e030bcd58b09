"""peft's merge tests: ``_test_merge_layers``, ``_test_merge_layers_fp16``, ``_test_merge_layers_is_idempotent``,
``_test_safe_merge``, ``_test_merge_layers_nan``, ``test_delete_merged_adapter_*`` and ``unload``.

orthotune's ``merge()`` / ``unmerge()`` are peft's ``merge_adapter()`` / ``unmerge_adapter()``; the peft
names themselves are checked by ``test_merge_adapter_peft_names``.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_model

from orthotune.layer.adapter_layer import AdapterLayer, ModulesToSave

from .cases import CASES, merge_tolerance, params, safe_merge_tolerance
from .harness import adapter_parameters, allclose, base_output, batch, make, requires_api, wrappers
from .models import KINDS, base_model, output

pytestmark = pytest.mark.parametrize("case", params(CASES))


def _reload_merged(case, model, tmp_path):
    """peft: save_pretrained + from_pretrained for a transformers model, a pickle round trip otherwise."""
    if KINDS[case.kind].transformers:
        model.save_pretrained(tmp_path)
        return type(model).from_pretrained(tmp_path).eval()
    return pickle.loads(pickle.dumps(model))


@torch.no_grad()
def test_merge_layers(case, tmp_path) -> None:
    model = make(case, init_identity=False).eval()
    x = batch(case)
    logits = output(model, x)
    model.merge()
    logits_merged = output(model, x)
    model.unmerge()
    logits_unmerged = output(model, x)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, (AdapterLayer, ModulesToSave)) for m in plain.modules())
    logits_merged_unloaded = output(plain, x)
    tol = merge_tolerance(case)
    assert allclose(logits, logits_merged, tol)
    assert allclose(logits, logits_unmerged, tol)
    assert allclose(logits, logits_merged_unloaded, tol)
    assert not allclose(logits_merged, base_output(case), (1e-10, 1e-10))
    assert allclose(output(_reload_merged(case, plain, tmp_path), x), logits_merged, tol)


def test_merge_layers_fp16(case) -> None:
    model = make(case, dtype=torch.float16).eval()
    plain = model.merge_and_unload()  # "This should simply work"
    assert not wrappers(plain)


@torch.no_grad()
def test_merge_layers_is_idempotent(case) -> None:
    model = make(case, init_identity=False).eval()
    model.merge()
    logits_0 = output(model, batch(case))
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.merge()
    assert allclose(logits_0, output(model, batch(case)), (1e-6, 1e-6))


@torch.no_grad()
def test_safe_merge(case, tmp_path) -> None:
    logits_base = base_output(case)
    model = make(case, init_identity=False).eval()
    logits_peft = output(model, batch(case))
    assert not allclose(logits_base, logits_peft, (1e-6, 1e-6))
    unloaded = model.merge_and_unload(safe_merge=True)
    assert allclose(logits_peft, output(unloaded, batch(case)), safe_merge_tolerance(case))
    torch.save(unloaded.state_dict(), tmp_path / "model.bin")
    save_model(unloaded, tmp_path / "model.safetensors")  # contiguous weights (tied ones written once)


@torch.no_grad()
def test_merge_layers_nan(case) -> None:
    model = make(case).eval()
    logits_unmerged = output(model, batch(case))
    assert allclose(logits_unmerged, output(model.merge_and_unload(), batch(case)), (1e-3, 1e-3))
    for value in (torch.nan, torch.inf):
        model = make(case)
        for n, p in adapter_parameters(model).items():
            if ".adapters." in n:  # peft: parameters named with the tuner's prefix, not modules_to_save
                p.data[0] = value
        weights = {n: p.clone() for n, p in model.base_model.named_parameters() if ".adapters." not in n}
        with pytest.raises(ValueError, match="NaNs or Infs detected in the merged weights"):
            model.merge_and_unload(safe_merge=True)
        assert all(torch.equal(p, weights[n]) for n, p in model.base_model.named_parameters() if n in weights)


@torch.no_grad()
def test_unload(case) -> None:
    base = base_model(case.kind)
    n_base = len(base.state_dict())
    logits_base = output(base, batch(case))
    adapted = make(case, init_identity=False).eval()
    logits_adapter = output(adapted, batch(case))
    model = adapted.unload()
    assert not wrappers(model)
    logits_unloaded = output(model, batch(case))
    assert not allclose(logits_adapter, logits_unloaded, (1e-10, 1e-10))
    assert allclose(logits_base, logits_unloaded, (1e-4, 1e-4))
    assert len(model.state_dict()) == n_base


def test_delete_merged_adapter_raises_without_mutation(case) -> None:
    model = make(case, init_identity=False)
    model.merge()
    layers = [layer for _, layer in model.adapter_layers()]
    merged_before = [list(layer.merged_adapters) for layer in layers]
    with pytest.raises(ValueError, match="adapter 'default' is merged; unmerge"):
        model.delete_adapter("default")
    assert "default" in model.configs
    assert [list(layer.merged_adapters) for layer in layers] == merged_before
    assert all("default" in layer.adapters for layer in layers)
    model.unmerge()
    assert not model.merged
    model.delete_adapter("default")
    assert "default" not in model.configs


def test_delete_merged_adapter_only_rejects_the_merged_one(case) -> None:
    model = make(case, adapter_name="adapter0", init_identity=False)
    model.add_adapter("adapter1", make(case).configs["default"].replace(init_identity=False))
    model.set_adapter("adapter1")
    model.merge()
    layers = [layer for _, layer in model.adapter_layers()]
    merged_after_merge = [list(layer.merged_adapters) for layer in layers]
    with pytest.raises(ValueError, match="adapter 'adapter1' is merged; unmerge"):
        model.delete_adapter("adapter1")
    assert set(model.configs) == {"adapter0", "adapter1"}
    model.delete_adapter("adapter0")
    assert set(model.configs) == {"adapter1"}
    assert [list(layer.merged_adapters) for layer in layers] == merged_after_merge
    model.unmerge()
    model.delete_adapter("adapter1")
    assert not model.configs


@requires_api("merge_adapter")
@requires_api("unmerge_adapter")
@torch.no_grad()
def test_merge_adapter_peft_names(case) -> None:
    """peft's names for merging: ``merge_adapter(safe_merge=...)`` and ``unmerge_adapter()``."""
    model = make(case, init_identity=False).eval()
    logits = output(model, batch(case))
    model.merge_adapter(safe_merge=True)
    assert model.merged and allclose(output(model, batch(case)), logits, merge_tolerance(case))
    model.unmerge_adapter()
    assert not model.merged and allclose(output(model, batch(case)), logits, merge_tolerance(case))
