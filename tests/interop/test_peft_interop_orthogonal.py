"""OFT, BOFT, HRA and PSOFT folders in (``orthotune.from_peft``) and out (``export_peft``), against the installed peft.

Every peft folder here is written by peft's ``save_pretrained`` with options peft users set, every
export read by ``PeftModel.from_pretrained``. ``boft_factors`` (conftest) lets peft build its
multi-factor BOFT on CPU; it is harmless for the other methods.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import orthotune
from orthotune import BOFTConfig, HRAConfig, OFTConfig, PSOFTConfig
from orthotune.model.io import adapter_state_dict

from ..conftest import MODELS
from ..methods.test_contract import train_steps
from .test_peft_interop import SAVED, fresh, merged_equal, perturb, untouched

peft = pytest.importorskip("peft")

ATOL = 1e-5

# (peft config class, its options, test model); ids name the options
FOLDERS = {
    "oft-b4-exact": ("OFTConfig", dict(oft_block_size=4, use_cayley_neumann=False), "mlp"),
    "oft-r2-neumann": ("OFTConfig", dict(r=2, oft_block_size=0), "mlp"),  # peft's default: Neumann, 5 terms
    "oft-b8-neumann3": ("OFTConfig", dict(oft_block_size=8, num_cayley_neumann_terms=3), "mlp"),
    "oft-share": ("OFTConfig", dict(oft_block_size=4, block_share=True, use_cayley_neumann=False), "mlp"),
    "oft-conv2d-1x1": ("OFTConfig", dict(oft_block_size=4), "conv2d"),
    "boft-default": ("BOFTConfig", dict(), "mlp"),
    "boft-b2-m2": ("BOFTConfig", dict(boft_block_size=2, boft_n_butterfly_factor=2), "mlp"),
    "boft-n4-m3": ("BOFTConfig", dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=3), "mlp"),
    "boft-conv2d": ("BOFTConfig", dict(boft_block_size=4), "conv2d"),
    "hra-r4": ("HRAConfig", dict(r=4), "mlp"),
    "hra-r3-gs": ("HRAConfig", dict(r=3, apply_GS=True), "mlp"),
    "hra-conv2d": ("HRAConfig", dict(r=4), "conv2d"),
    "psoft-default": ("PsoftConfig", dict(r=4), "mlp"),
    "psoft-free-mag-a": ("PsoftConfig", dict(r=4, psoft_orth=False, psoft_mag_b=False), "mlp"),
    "psoft-neumann-eps": ("PsoftConfig", dict(r=6, use_cayley_neumann=True, cayley_neumann_eps=0.5, psoft_alpha=8), "mlp"),
}
# Cases adapting fewer layers than MODELS lists: peft 0.21's unmerged OFT forward is its merged model on 1x1
# convolutions only (test_oft_conv2d_matches_peft_merged_model_both_ways).
TARGETS = {"oft-conv2d-1x1": ["conv1"], "oft-share-conv2d-1x1": ["conv1"]}
OURS = {"OFTConfig": OFTConfig, "BOFTConfig": BOFTConfig, "HRAConfig": HRAConfig, "PsoftConfig": PSOFTConfig}


def save_peft(cls: str, kwargs: dict, model_name: str, path, targets: list[str] | None = None, **extra) -> torch.nn.Module:
    """A trained-looking peft adapter of ``cls`` saved at ``path``; returns the peft model."""
    targets = targets or MODELS[model_name][1]
    config = getattr(peft, cls)(target_modules=targets, init_weights=False, **kwargs, **extra)
    theirs = peft.get_peft_model(fresh(model_name), config)
    perturb(theirs)  # also moves peft's magnitudes and BOFT's scale off 1
    theirs.save_pretrained(path)
    return theirs


@pytest.mark.parametrize("case", list(FOLDERS))
def test_peft_folder_loads_with_identical_outputs(case: str, tmp_path, boft_factors) -> None:
    cls, kwargs, model_name = FOLDERS[case]
    saved = SAVED[model_name] if case.endswith("default") else None
    theirs = save_peft(cls, kwargs, model_name, tmp_path / "p", TARGETS.get(case), modules_to_save=saved)
    ours = orthotune.from_peft(fresh(model_name), tmp_path / "p")
    assert isinstance(ours.configs["default"], OURS[cls])
    x = MODELS[model_name][2]()
    assert not torch.allclose(theirs(x), fresh(model_name)(x), atol=1e-3)
    assert torch.allclose(ours(x), theirs(x), atol=ATOL, rtol=0), float((ours(x) - theirs(x)).abs().max())
    merged_equal(ours.merge_and_unload(), theirs.merge_and_unload(), atol=ATOL)


EXPORTS = {
    "oft-b4": (OFTConfig(oft_block_size=4), "mlp"),
    "oft-r2-neumann": (OFTConfig(r=2, oft_block_size=0, use_cayley_neumann=True, num_cayley_neumann_terms=4), "mlp"),
    "oft-share-conv2d-1x1": (OFTConfig(oft_block_size=4, block_share=True), "conv2d"),
    "boft-b2-m2": (BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2), "mlp"),
    "boft-conv2d": (BOFTConfig(boft_block_size=4), "conv2d"),
    "hra-r4": (HRAConfig(r=4), "mlp"),
    "hra-gs-conv2d": (HRAConfig(r=2, apply_GS=True, init_identity=False), "conv2d"),
    "psoft-default": (PSOFTConfig(r=4), "mlp"),
    "psoft-free": (PSOFTConfig(r=3, psoft_orth=False, psoft_mag_a=False), "mlp"),
}


def _trained(config, model_name: str, targets: list[str] | None = None):
    targets = targets or MODELS[model_name][1]
    ours = orthotune.get_model(fresh(model_name), config.replace(target_modules=targets, modules_to_save=SAVED[model_name]))
    x = MODELS[model_name][2]()
    train_steps(ours, x, lr=5e-2)
    assert not torch.allclose(ours(x), fresh(model_name)(x), atol=1e-3)
    return ours, x


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_loads_in_peft_with_identical_outputs(case: str, tmp_path, boft_factors) -> None:
    config, model_name = EXPORTS[case]
    ours, x = _trained(config, model_name, TARGETS.get(case))
    ours.export_peft(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["peft_type"] == case.split("-")[0].upper()

    theirs = peft.PeftModel.from_pretrained(fresh(model_name), tmp_path / "p")
    assert torch.allclose(theirs(x), ours(x), atol=ATOL, rtol=0), float((theirs(x) - ours(x)).abs().max())
    back = orthotune.from_peft(fresh(model_name), tmp_path / "p")  # the round trip is exact
    mine, again = adapter_state_dict(ours, "default"), adapter_state_dict(back, "default")
    assert mine.keys() == again.keys() and all(torch.equal(mine[k], again[k]) for k in mine)
    merged_equal(ours.merge_and_unload(), theirs.merge_and_unload(), atol=ATOL)


def test_psoft_export_maps_a_sign_flipped_support(tmp_path) -> None:
    """peft recomputes the principal basis on loading; where the stored one differs by column signs D
    (another SVD backend made it), the export writes D T D, the same update in peft's basis."""
    ours, x = _trained(PSOFTConfig(r=4), "mlp")
    before = ours(x)
    with torch.no_grad():
        for _, layer in ours.adapter_layers():
            method = layer.adapters["default"]
            d = torch.tensor([1.0, -1.0, -1.0, 1.0])
            method.support.P.mul_(d)
            tr = method.transform
            tr.weight.mul_(torch.outer(d, d)[tr.rows, tr.cols])
    assert torch.allclose(ours(x), before, atol=1e-6)
    ours.export_peft(tmp_path / "p")
    theirs = peft.PeftModel.from_pretrained(fresh("mlp"), tmp_path / "p")
    assert torch.allclose(theirs(x), ours(x), atol=ATOL, rtol=0)


def test_old_boft_checkpoint_with_permutations_loads(tmp_path) -> None:
    """peft < 0.13 also saved BOFT's fixed permutation matrices ``boft_P``; peft ignores them, so does from_peft."""
    theirs = save_peft("BOFTConfig", dict(boft_block_size=4), "mlp", tmp_path / "p")
    tensors = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    for name in MODELS["mlp"][1]:
        d_in = theirs.base_model.model.get_submodule(name).in_features
        tensors[f"base_model.model.{name}.boft_P"] = torch.eye(d_in)[None]
    save_file(tensors, str(tmp_path / "p" / "adapter_model.safetensors"))
    x = torch.randn(3, 16)
    assert torch.allclose(orthotune.from_peft(fresh("mlp"), tmp_path / "p")(x), theirs(x), atol=ATOL)


def test_oft_conv2d_matches_peft_merged_model_both_ways(tmp_path) -> None:
    """On a 3x3 convolution peft's unmerged OFT forward (summed rotated patches) is not its merged model,
    W0 R; orthotune computes W0 R, so both directions agree with peft's merged model and say so."""
    theirs = save_peft("OFTConfig", dict(oft_block_size=4), "conv2d", tmp_path / "p")
    with pytest.warns(UserWarning, match="unmerged OFT forward on a Conv2d with a kernel larger than 1x1"):
        ours = orthotune.from_peft(fresh("conv2d"), tmp_path / "p")
    x = MODELS["conv2d"][2]()
    ours.export_peft(tmp_path / "q")
    again = peft.PeftModel.from_pretrained(fresh("conv2d"), tmp_path / "q")
    merged = theirs.merge_and_unload()
    assert torch.allclose(ours(x), merged(x), atol=ATOL, rtol=0)
    merged_equal(again.merge_and_unload(), merged, atol=ATOL)
    merged_equal(ours.merge_and_unload(), merged, atol=ATOL)


def _edit_config(path, **changes) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))


def _folder(cls, edit=None, **kwargs):
    def make(path):
        save_peft(cls, kwargs, "mlp", path)
        if edit:
            _edit_config(path, **edit)

    return make


@pytest.mark.parametrize(
    "make,match",
    [
        (_folder("OFTConfig", oft_block_size=4, coft=True), r"peft OFT option coft=True has no orthotune equivalent"),
        (_folder("OFTConfig", edit={"r": 4}, oft_block_size=4), r"set exactly one of r"),
        (_folder("BOFTConfig", bias="boft_only"), r"peft BOFT option bias='boft_only' has no orthotune equivalent"),
        (_folder("HRAConfig", r=4, bias="hra_only"), r"peft HRA option bias='hra_only'"),
        (_folder("PsoftConfig", r=4, ab_svd_init="pissa_init"), r"ab_svd_init='pissa_init' splits the singular values"),
    ],
    ids=["oft-coft", "oft-r-and-block", "boft-bias", "hra-bias", "psoft-pissa-init"],
)
def test_unsupported_peft_folders_fail_clearly_and_change_nothing(make, match, tmp_path) -> None:
    make(tmp_path / "p")  # no boft_factors: peft on CPU trains one factor whatever its config says
    model = fresh("mlp")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        orthotune.from_peft(model, tmp_path / "p")
    assert untouched(model, before)


@pytest.mark.parametrize(
    "config,model_name,match",
    [
        (OFTConfig(oft_block_size=4), "conv1d", r"module 'c_attn': peft's OFT adapts Linear and Conv2d and Embedding layers only, this is a GPT-2 Conv1D"),
        (HRAConfig(r=2), "conv1d", r"peft's HRA adapts Linear and Conv2d layers only"),
        (PSOFTConfig(r=4), "conv2d", r"module 'conv0': peft's PSOFT adapts Linear layers only, this is a Conv2d"),
        (PSOFTConfig(r=4, use_cayley_neumann=True, cayley_neumann_eps=1.5), "mlp", r"cayley_neumann_eps in \(0, 1\), this adapter has 1.5"),
    ],
    ids=["oft-conv1d", "hra-conv1d", "psoft-conv2d", "psoft-eps"],
)
def test_unexpressible_exports_fail_clearly(config, model_name: str, match: str, tmp_path) -> None:
    _, targets, _ = MODELS[model_name]
    model = orthotune.get_model(fresh(model_name), config.replace(target_modules=targets))
    with pytest.raises(ValueError, match=match):
        model.export_peft(tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_merged_psoft_export_asks_to_unmerge(tmp_path) -> None:
    model, _ = _trained(PSOFTConfig(r=4), "mlp")
    model.merge()
    with pytest.raises(ValueError, match=r"not the one peft recomputes from this layer's weights .* unmerge\(\) first"):
        model.export_peft(tmp_path / "p")
    model.unmerge()
    model.export_peft(tmp_path / "p")
