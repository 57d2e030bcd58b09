"""PSOFT with ``psoft_svd="lowrank"``: peft 0.21's additive update ``W0 + s B (T - I) A`` on the seeded
randomized SVD's factors, loaded from peft folders, exported to them, merged and compiled.

peft adapts Linear layers only with PSOFT (its dispatcher has no GPT-2 Conv1D), so the peft comparisons
run on the MLP; orthotune's own lowrank path is also checked on the GPT-2 Conv1D block.
"""

from __future__ import annotations

import json

import pytest
import torch

import orthotune
from orthotune import PSOFTConfig
from orthotune.layer.adapter_layer import base_weight_matrix
from orthotune.model.io import adapter_state_dict

from ..conftest import MODELS
from ..methods.test_contract import train_steps
from .test_peft_interop import SAVED, fresh, merged_equal
from .test_peft_interop_orthogonal import save_peft

peft = pytest.importorskip("peft")

ATOL = 1e-6  # peft's float32 tolerance on its MLP

FOLDERS = {
    "default": dict(r=4, psoft_svd="lowrank"),
    "alpha-seed-niter": dict(r=4, psoft_svd="lowrank", psoft_alpha=7, random_seed=3, psoft_svd_lowrank_niter=2),
    "free-mag-b": dict(r=3, psoft_svd="lowrank", psoft_orth=False, psoft_mag_a=False),
    "neumann": dict(r=6, psoft_svd="lowrank", use_cayley_neumann=True, cayley_neumann_eps=0.5, psoft_alpha=8),
}


def _adapters(model):
    return [layer.adapters["default"] for _, layer in model.adapter_layers()]


@pytest.mark.parametrize("case", list(FOLDERS))
def test_peft_lowrank_folder_loads_with_peft_outputs(case: str, tmp_path) -> None:
    theirs = save_peft("PsoftConfig", FOLDERS[case], "mlp", tmp_path / "p", modules_to_save=SAVED["mlp"])
    ours = orthotune.from_peft(fresh("mlp"), tmp_path / "p")
    x = MODELS["mlp"][2]()
    assert torch.allclose(ours(x), theirs(x), atol=ATOL, rtol=0), float((ours(x) - theirs(x)).abs().max())
    # the randomized U S is not W0 V (12 x 24 lin2's sketch converges; the wider layers' does not): the rotation
    # form of the full SVD would compute another model
    off = [float((base_weight_matrix(layer.base_layer) @ m.support.P - m.output_factor).abs().max())
           for (_, layer), m in zip(ours.adapter_layers(), _adapters(ours))]
    assert max(off) > 1e-3, off
    merged_equal(ours.merge_and_unload(), theirs.merge_and_unload(), atol=ATOL)


def _trained(config: PSOFTConfig, model_name: str = "mlp"):
    targets = MODELS[model_name][1]
    ours = orthotune.get_model(fresh(model_name), config.replace(target_modules=targets, modules_to_save=SAVED[model_name]))
    x = MODELS[model_name][2]()
    train_steps(ours, x, lr=5e-2)
    assert not torch.allclose(ours(x), fresh(model_name)(x), atol=1e-3)
    return ours, x


@pytest.mark.parametrize(
    "config",
    [PSOFTConfig(r=4, psoft_svd="lowrank"), PSOFTConfig(r=3, psoft_svd="lowrank", psoft_orth=False, random_seed=5, psoft_dropout=0.1)],
    ids=["default", "free-seed-dropout"],
)
def test_lowrank_export_loads_in_peft_with_identical_outputs(config: PSOFTConfig, tmp_path) -> None:
    ours, x = _trained(config)
    ours.eval()
    ours.export_peft(tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert (cfg["psoft_svd"], cfg["random_seed"]) == ("lowrank", config.random_seed)
    theirs = peft.PeftModel.from_pretrained(fresh("mlp"), tmp_path / "p").eval()
    assert torch.allclose(theirs(x), ours(x), atol=ATOL, rtol=0), float((theirs(x) - ours(x)).abs().max())
    back = orthotune.from_peft(fresh("mlp"), tmp_path / "p")  # the round trip is exact
    mine, again = adapter_state_dict(ours, "default"), adapter_state_dict(back, "default")
    assert mine.keys() == again.keys() and all(torch.equal(mine[k], again[k]) for k in mine)
    merged_equal(ours.merge_and_unload(), theirs.merge_and_unload(), atol=ATOL)


def test_lowrank_export_refuses_factors_peft_would_not_recompute(tmp_path) -> None:
    ours, _ = _trained(PSOFTConfig(r=4, psoft_svd="lowrank"))
    with torch.no_grad():
        _adapters(ours)[0].output_factor.mul_(1.5)
    with pytest.raises(ValueError, match=r"not the one peft recomputes .* on that device"):
        ours.export_peft(tmp_path / "p")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("model_name", ["mlp", "conv1d"])
def test_lowrank_merge_unmerge_and_own_save_load_are_exact(model_name: str, tmp_path) -> None:
    ours, x = _trained(PSOFTConfig(r=4, psoft_svd="lowrank"), model_name)
    ours.eval()
    y = ours(x)
    weights = {n: layer.base_layer.weight.clone() for n, layer in ours.adapter_layers()}
    ours.save_adapter(tmp_path / "a")
    ours.merge()
    assert torch.allclose(ours(x), y, atol=ATOL, rtol=0)
    ours.unmerge()
    assert all(torch.allclose(layer.base_layer.weight, weights[n], atol=1e-7, rtol=0) for n, layer in ours.adapter_layers())
    assert torch.allclose(ours(x), y, atol=ATOL, rtol=0)
    again = orthotune.load_adapter(fresh(model_name), tmp_path / "a")  # the saved factors, not recomputed ones
    assert torch.equal(again.eval()(x), y)


def test_lowrank_is_not_reported_as_a_rotation() -> None:
    ours, _ = _trained(PSOFTConfig(r=4, psoft_svd="lowrank"))
    method = _adapters(ours)[0]
    assert not method.multiplicative and method.diagnostics()["rotation_of_base"] is False
    with pytest.raises(ValueError, match="no rotation of W0"):
        method.rotation()
    full = orthotune.get_model(fresh("mlp"), PSOFTConfig(r=4, target_modules=["lin0"]))
    assert "rotation_of_base" not in _adapters(full)[0].diagnostics()


def test_lowrank_compiles_to_one_graph() -> None:
    ours, x = _trained(PSOFTConfig(r=4, psoft_svd="lowrank"))
    ours.eval()
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), ours(x), atol=ATOL, rtol=0)
