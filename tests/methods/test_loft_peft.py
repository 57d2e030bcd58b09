"""The LOFT presets compute what peft 0.21 computes, parameter for parameter (outputs and merged weights).

Parameters map across with the peft interop table (``orthotune.interop.peft.FORMATS``, what
``from_peft`` reads folders with): as they are, except peft's OFT Cayley-Neumann branch, which
approximates the transpose of peft's own exact branch: orthotune's Neumann approximates its exact
rotation, so those parameters cross negated (docs/loft.md).
"""

from __future__ import annotations

import copy

import pytest
import torch

import orthotune
from orthotune import BOFTConfig, HRAConfig, OFTConfig, PSOFTConfig
from orthotune.interop.peft import FORMATS, split_peft_tensors

from ..conftest import MODELS

peft = pytest.importorskip("peft")


def _pair(model_name: str, ours_cfg, theirs_cfg):
    cls, targets, make_x = MODELS[model_name]
    base = cls()
    ours = orthotune.get_model(copy.deepcopy(base), ours_cfg(target_modules=targets))
    theirs = peft.get_peft_model(copy.deepcopy(base), theirs_cfg(target_modules=targets))
    return ours, theirs, make_x()


def _copy(ours, theirs) -> None:
    """peft's adapter tensors into ours, mapped as ``from_peft`` maps a saved folder's."""
    config = ours.configs["default"]
    fmt = FORMATS[config.method]
    per_module, _ = split_peft_tensors(peft.get_peft_model_state_dict(theirs), fmt, "the peft model")
    with torch.no_grad():
        for name, layer in ours.adapter_layers():
            layer.adapters["default"].load_state_dict(fmt.tensors_in(config, layer.base_layer, per_module[name]))


def _assert_same(ours, theirs, x, atol: float = 1e-5) -> None:
    a, b = ours(x), theirs(x)
    assert torch.allclose(a, b, atol=atol, rtol=1e-4), float((a - b).abs().max())
    merged_ours = ours.merge_and_unload().state_dict()
    merged_theirs = theirs.merge_and_unload().state_dict()
    assert merged_ours.keys() == merged_theirs.keys()
    for key in merged_ours:
        assert torch.allclose(merged_ours[key], merged_theirs[key], atol=atol, rtol=1e-4), key


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(oft_block_size=4),
        dict(r=2, oft_block_size=0),
        dict(oft_block_size=4, block_share=True),
        dict(oft_block_size=8, use_cayley_neumann=True, num_cayley_neumann_terms=5),
        dict(oft_block_size=4, use_cayley_neumann=True, num_cayley_neumann_terms=3),
    ],
    ids=["b4", "r2", "share", "neumann5", "neumann3"],
)
def test_oft_matches_peft(kwargs: dict) -> None:
    ours, theirs, x = _pair(
        "mlp",
        lambda **t: OFTConfig(**kwargs, **t),
        lambda **t: peft.OFTConfig(**{"use_cayley_neumann": False, **kwargs}, init_weights=False, **t),
    )
    _copy(ours, theirs)
    _assert_same(ours, theirs, x)


@pytest.mark.parametrize(
    "kwargs",
    [dict(boft_block_size=4), dict(boft_block_size=2, boft_n_butterfly_factor=2),
     dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=3)],
    ids=["b4", "b2-m2", "n4-m3"],
)
def test_boft_matches_peft(kwargs: dict, boft_factors) -> None:
    ours, theirs, x = _pair("mlp", lambda **t: BOFTConfig(**kwargs, **t), lambda **t: peft.BOFTConfig(**kwargs, init_weights=False, **t))
    for name, layer in ours.adapter_layers():
        expected = kwargs.get("boft_n_butterfly_factor", 1)
        assert theirs.base_model.model.get_submodule(name).boft_R["default"].shape[0] == expected
    _copy(ours, theirs)
    _assert_same(ours, theirs, x)


@pytest.mark.parametrize("model_name", ["mlp", "conv2d"])
@pytest.mark.parametrize("apply_gs", [False, True])
def test_hra_matches_peft(model_name: str, apply_gs: bool) -> None:
    ours, theirs, x = _pair(
        model_name,
        lambda **t: HRAConfig(r=4, apply_GS=apply_gs, init_identity=False, **t),
        lambda **t: peft.HRAConfig(r=4, apply_GS=apply_gs, init_weights=False, **t),
    )
    _copy(ours, theirs)
    _assert_same(ours, theirs, x)


def test_hra_identity_init_matches_peft_layout() -> None:
    """peft's init pairs equal reflections: both start at the identity with the same structure."""
    model = orthotune.get_model(MODELS["mlp"][0](), HRAConfig(target_modules=["lin1"], r=4))
    u = dict(model.adapter_layers())["lin1"].adapters["default"].transform.u
    assert torch.equal(u[:, 0::2], u[:, 1::2]) and u.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(psoft_mag_a=False, psoft_mag_b=False),
        dict(psoft_orth=False),
        dict(use_cayley_neumann=True, num_cayley_neumann_terms=4),
        dict(use_cayley_neumann=True, cayley_neumann_eps=0.3),
    ],
    ids=["default", "no-mag", "free", "neumann", "neumann-eps"],
)
def test_psoft_matches_peft(kwargs: dict) -> None:
    ours, theirs, x = _pair(
        "mlp",
        lambda **t: PSOFTConfig(r=4, init_identity=False, **kwargs, **t),
        lambda **t: peft.PsoftConfig(r=4, init_weights=False, **kwargs, **t),
    )
    with torch.no_grad():  # peft starts its magnitudes at 1 even with init_weights=False
        for name, _ in ours.adapter_layers():
            rot = theirs.base_model.model.get_submodule(name).psoft_R["default"]
            for v in (rot.vector_a, rot.vector_b):
                if v is not None:
                    v.normal_(1.0, 0.1)
    _copy(ours, theirs)
    _assert_same(ours, theirs, x)


def test_psoft_lowrank_svd_finds_peft_factors() -> None:
    """With ``psoft_svd="lowrank"`` both seed the same randomized SVD, so the support is peft's ``A^T``
    exactly and the output factor is peft's ``scaling * B`` (the randomized ``U S``, which differs from
    ``W0 A^T`` by the SVD's error: orthotune computes peft's additive update on it, not ``W0 R``)."""
    cls, targets, _ = MODELS["mlp"]
    base = cls()
    kwargs = dict(r=4, psoft_svd="lowrank", psoft_svd_lowrank_niter=2, random_seed=3)
    ours = orthotune.get_model(copy.deepcopy(base), PSOFTConfig(target_modules=targets, **kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PsoftConfig(target_modules=targets, psoft_alpha=4, **kwargs))
    for name, layer in ours.adapter_layers():
        A, B = theirs.base_model.model.get_submodule(name)._get_psoft_ab_cache_buffers("default")
        assert torch.equal(layer.adapters["default"].support.P, A.T)
        assert torch.equal(layer.adapters["default"].output_factor, B)  # psoft_alpha = r: peft's scaling is 1
