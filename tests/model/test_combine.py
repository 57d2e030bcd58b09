"""add_weighted_adapter: peft's LoRA combinations exactly, spectra and rotations by their stated math."""

from __future__ import annotations

import copy

import pytest
import torch

import orthotune
from orthotune.model.combine import LOWRANK_TYPES
from orthotune.methods.registry import METHODS

from ..conftest import MLP, MODELS
from ..method_cases import CASES, Case, run

TARGETS = ["lin0", "lin1", "lin2"]


def two(case: Case, dtype: torch.dtype = torch.float32, targets_b: list[str] = TARGETS, **kwargs_b) -> orthotune.OrthoModel:
    cfg = METHODS[case.method][0]
    common = dict(init_identity=False, autocast_adapter_dtype=False)  # adapters in the model's dtype (float64 here)
    model = orthotune.get_model(MLP().to(dtype), cfg(target_modules=TARGETS, **common, **case.kwargs))
    model.add_adapter("b", cfg(target_modules=targets_b, **common, **{**case.kwargs, **kwargs_b}))
    return model.eval()


def delta(model: orthotune.OrthoModel, name: str, lname: str) -> torch.Tensor:
    """The adapter's update of the layer's (d_out, d_in) weight, from its forward on the identity (float64)."""
    layer = model.base_model.get_submodule(lname)
    W = layer.weight_matrix().double()
    eye = torch.eye(layer.d_in, dtype=torch.float64)
    with torch.no_grad():
        return (run(layer.adapters[name], eye, lambda z: z @ W.T) - eye @ W.T).T


# ---------------------------------------------------------------------- LoRA against peft
def peft_and_ortho(model_name: str, r_b: int) -> tuple[torch.nn.Module, orthotune.OrthoModel, torch.Tensor]:
    """The same two LoRA adapters (float64) in peft and in orthotune, and an input."""
    peft = pytest.importorskip("peft")
    cls, targets, make_x = MODELS[model_name]
    base = cls().double()
    targets_b = targets[:-1]
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=targets, r=4, lora_alpha=8, init_lora_weights=False))
    pm.add_adapter("b", peft.LoraConfig(target_modules=targets_b, r=r_b, lora_alpha=3, init_lora_weights=False))
    cfg = METHODS["lora"][0]
    om = orthotune.get_model(copy.deepcopy(base), cfg(target_modules=targets, r=4, lora_alpha=8, autocast_adapter_dtype=False))
    om.add_adapter("b", cfg(target_modules=targets_b, r=r_b, lora_alpha=3, autocast_adapter_dtype=False))
    with torch.no_grad():
        for lname, layer in om.adapter_layers():
            ref = pm.base_model.model.get_submodule(lname)
            for a, method in layer.adapters.items():  # peft's Conv2d factors are kernels: same numbers, flattened
                method.lora_A.copy_(ref.lora_A[a].weight.reshape(method.lora_A.shape))
                method.lora_B.copy_(ref.lora_B[a].weight.reshape(method.lora_B.shape))
    return pm, om, make_x().double()


@pytest.mark.parametrize("model_name", ["mlp", "conv1d", "conv2d"])
@pytest.mark.parametrize("ctype", LOWRANK_TYPES)
def test_lora_combinations_equal_peft(ctype: str, model_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pm, om, x = peft_and_ortho(model_name, r_b=4 if ctype in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune") else 2)
    kwargs = dict(combination_type=ctype, density=0.6, majority_sign_method="frequency") if "_" in ctype or ctype == "ties" else dict(combination_type=ctype)
    for model in (pm, om):  # DARE's masks: one seeded draw per call, in the same order in both (peft's init draws too)
        gen = torch.Generator().manual_seed(3)
        with monkeypatch.context() as m:
            m.setattr(torch, "bernoulli", lambda p: (torch.rand(p.shape, generator=gen, dtype=p.dtype) < p).to(p.dtype))
            model.add_weighted_adapter(["default", "b"], [0.7, -1.3], "mix", **kwargs)
    for lname, layer in om.adapter_layers():
        ref = pm.base_model.model.get_submodule(lname)
        mine = layer.adapters["mix"]
        assert mine.scaling == ref.scaling["mix"] == 1.0
        torch.testing.assert_close(mine.lora_A, ref.lora_A["mix"].weight.reshape(mine.lora_A.shape), rtol=0, atol=1e-12)
        torch.testing.assert_close(mine.lora_B, ref.lora_B["mix"].weight.reshape(mine.lora_B.shape), rtol=0, atol=1e-12)
    pm.set_adapter("mix")
    om.set_adapter("mix")
    atol = 1e-6 if model_name == "conv2d" else 1e-12  # orthotune's Conv2d forms its per-call weight in float32
    torch.testing.assert_close(om(x), pm(x), rtol=0, atol=atol)


def test_lora_cat_and_svd_are_exact_weighted_sums() -> None:
    case = next(c for c in CASES if c.method == "lora")
    model = two(case, torch.float64, r=2)
    model.add_weighted_adapter(["default", "b"], [0.5, 2.0], "cat", combination_type="cat")
    model.add_weighted_adapter(["default", "b"], [0.5, 2.0], "svd", combination_type="svd", svd_rank=6)
    for lname in TARGETS:
        expected = 0.5 * delta(model, "default", lname) + 2.0 * delta(model, "b", lname)
        torch.testing.assert_close(delta(model, "cat", lname), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(delta(model, "svd", lname), expected, rtol=0, atol=1e-12)  # rank 6 holds the sum exactly


@pytest.mark.parametrize("ctype", ["cat", "svd"])
def test_pissa_becomes_a_lora_with_the_weighted_update(ctype: str) -> None:
    case = next(c for c in CASES if c.method == "pissa" and c.kwargs["r"] == 2)
    model = two(case, torch.float64)
    model.add_weighted_adapter(["default", "b"], [0.5, -1.0], "mix", combination_type=ctype, svd_rank=12)
    assert model.configs["mix"].method == "lora"
    for lname in TARGETS:
        expected = 0.5 * delta(model, "default", lname) - delta(model, "b", lname)
        torch.testing.assert_close(delta(model, "mix", lname), expected, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------- spectra
@pytest.mark.parametrize("method", ["fourierft", "loca"])
@pytest.mark.parametrize("ctype", ["linear", "cat"])
def test_spectra_give_the_weighted_update(method: str, ctype: str, tmp_path) -> None:
    case = next(c for c in CASES if c.method == method)
    scale = {"fourierft": {"scaling": 50.0}, "loca": {"scale": 0.5}}[method]
    model = two(case, torch.float64, targets_b=TARGETS[:2], **scale)
    if ctype == "linear" and method == "loca":  # LoCA draws its cells per adapter: same cells only by copying them
        for _, layer in model.adapter_layers():
            if "b" in layer.adapters:
                layer.adapters["b"].locations.copy_(layer.adapters["default"].locations)
    model.add_weighted_adapter(["default", "b"], [0.5, 2.0], "mix", combination_type=ctype)
    for lname in TARGETS:
        expected = 0.5 * delta(model, "default", lname) + (2.0 * delta(model, "b", lname) if lname != "lin2" else 0)
        torch.testing.assert_close(delta(model, "mix", lname), expected, rtol=1e-9, atol=1e-12)
    x = torch.randn(3, 16, dtype=torch.float64)
    model.set_adapter("mix")
    out = model(x)
    model.save_adapter(tmp_path, "mix")  # the combined cells are saved with it
    model.load_adapter(tmp_path, "again")
    model.set_adapter("again")
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)


def test_spectra_linear_needs_the_same_cells() -> None:
    model = two(next(c for c in CASES if c.method == "loca"))
    with pytest.raises(ValueError, match="different spectrum cells.*use combination_type='cat'"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="linear")


# ---------------------------------------------------------------------- rotations
ROTATION_CASES = [c for c in CASES if c.orthogonal]  # exactly orthogonal (no Neumann series, no magnitudes)


@pytest.mark.parametrize("case", ROTATION_CASES, ids=[c.id for c in ROTATION_CASES])
def test_rotation_combinations_are_orthogonal(case: Case) -> None:
    model = two(case, torch.float64)
    from orthotune.model.combine import _allowed

    allowed = _allowed("rotation", [model.configs["default"]])
    if "support" in case.kwargs and case.kwargs["support"] == "random":  # one support for both: copy it
        for _, layer in model.adapter_layers():
            layer.adapters["b"].support.P.copy_(layer.adapters["default"].support.P)
    def error(R: torch.Tensor) -> float:
        return float((R.T @ R - torch.eye(R.shape[0], dtype=R.dtype)).abs().max())

    checked = 0
    for ctype in allowed:
        weights = [1.0, 1.0] if case.method == "hra" or "householder" in str(case.kwargs) else [0.6, -1.4]
        model.add_weighted_adapter(["default", "b"], weights, ctype, combination_type=ctype)
        for _, layer in model.adapter_layers():
            mixed = layer.adapters[ctype]
            P = getattr(getattr(mixed, "support", None), "P", None)
            if P is not None:  # R = I + P (T - I) P^T: T orthogonal, P the adapters' own (float32-SVD) support
                assert torch.equal(P, layer.adapters["default"].support.P)
                assert error(mixed.transform.matrix()) <= 1e-12
            else:
                assert error(mixed.rotation()) <= 1e-12
            checked += 1
    assert checked == len(allowed) * len(TARGETS) and allowed


CHAIN_CASES = [
    c for c in ROTATION_CASES
    if (c.method == "loco" and c.kwargs.get("mode") != "approx") or c.method == "hra" or c.kwargs.get("transform") in ("exp", "householder")
]  # fmt: skip


@pytest.mark.parametrize("case", CHAIN_CASES, ids=[c.id for c in CHAIN_CASES])
def test_cat_is_the_product_of_the_rotations(case: Case, tmp_path) -> None:
    """``cat`` with unit weights equals activating both adapters (``W0 R_a R_b``); the result saves and reloads."""
    model = two(case, torch.float64)
    if case.kwargs.get("support") == "random":
        for _, layer in model.adapter_layers():
            layer.adapters["b"].support.P.copy_(layer.adapters["default"].support.P)
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="cat")
    x = torch.randn(4, 16, dtype=torch.float64)
    model.set_adapter(["default", "b"])
    both = model(x)
    model.set_adapter("mix")
    torch.testing.assert_close(model(x), both, rtol=0, atol=1e-10)
    model.save_adapter(tmp_path, "mix")
    model.load_adapter(tmp_path, "again")
    model.set_adapter("again")
    torch.testing.assert_close(model(x), both, rtol=0, atol=1e-10)


def test_loco_linear_is_the_exponential_of_the_weighted_generators() -> None:
    """One link each: ``R = exp(w_a S_a + w_b S_b)``; with one adapter that is ``R^w``."""
    model = two(Case("loco", dict(rank=2, chain_length=1), lambda i, o: 0), torch.float64)
    model.add_weighted_adapter(["default", "b"], [0.6, -1.4], "mix", combination_type="linear")
    model.add_weighted_adapter(["default"], [0.5], "halfway", combination_type="linear")
    for _, layer in model.adapter_layers():
        S = {}
        for name in ("default", "b"):
            U, V = layer.adapters[name].U[0], layer.adapters[name].V[0]
            S[name] = U @ V.T - V @ U.T
        R = layer.adapters["mix"].rotation()
        torch.testing.assert_close(R, torch.linalg.matrix_exp(0.6 * S["default"] - 1.4 * S["b"]), rtol=0, atol=1e-10)
        half = layer.adapters["halfway"].rotation()
        torch.testing.assert_close(half @ half, layer.adapters["default"].rotation(), rtol=0, atol=1e-10)


# ---------------------------------------------------------------------- errors
def test_errors() -> None:
    lora = next(c for c in CASES if c.method == "lora")
    model = two(lora)
    model.add_adapter("rot", METHODS["oft"][0](target_modules=TARGETS, oft_block_size=4))
    with pytest.raises(ValueError, match="different methods"):
        model.add_weighted_adapter(["default", "rot"], [1.0, 1.0], "mix")
    with pytest.raises(ValueError, match="do not exist"):
        model.add_weighted_adapter(["default", "nope"], [1.0, 1.0], "mix")
    with pytest.raises(ValueError, match="one weight per adapter"):
        model.add_weighted_adapter(["default", "b"], [1.0], "mix")
    with pytest.raises(ValueError, match="pass density"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="ties")
    with pytest.raises(ValueError, match="not supported for 'lora'"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="product")
    model.add_adapter("r2", METHODS["lora"][0](target_modules=TARGETS, r=2))
    with pytest.raises(ValueError, match="same rank"):
        model.add_weighted_adapter(["default", "r2"], [1.0, 1.0], "mix", combination_type="linear")
    model.add_adapter("rot2", METHODS["oft"][0](target_modules=TARGETS, oft_block_size=2))
    with pytest.raises(ValueError, match="'svd' is not supported for 'oft'"):
        model.add_weighted_adapter(["rot", "rot2"], [1.0, 1.0], "mix", combination_type="svd")
    with pytest.raises(ValueError, match="different shapes"):
        model.add_weighted_adapter(["rot", "rot2"], [1.0, 1.0], "mix", combination_type="linear")
    hra = METHODS["hra"][0]
    model.add_adapter("h1", hra(target_modules=TARGETS, r=2))
    model.add_adapter("h2", hra(target_modules=TARGETS, r=2))
    with pytest.raises(ValueError, match="no generator to scale"):
        model.add_weighted_adapter(["h1", "h2"], [0.5, 1.0], "mix", combination_type="cat")
    model.merge(["default"])
    with pytest.raises(ValueError, match="unmerge"):
        model.add_weighted_adapter(["h1", "h2"], [1.0, 1.0], "mix", combination_type="cat")
    assert "mix" not in model.configs and all("mix" not in layer.adapters for _, layer in model.adapter_layers())


def test_fourierft_cat_is_not_exported_to_peft(tmp_path) -> None:
    """peft derives FourierFT's cells from the seed: a concatenation of cells cannot go there."""
    model = two(next(c for c in CASES if c.method == "fourierft"))
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "lin", combination_type="linear")
    model.export_peft(tmp_path / "lin", "lin")  # same cells: peft loads it
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "cat", combination_type="cat")
    with pytest.raises(ValueError, match="not peft's seeded draw"):
        model.export_peft(tmp_path / "cat", "cat")


@pytest.mark.parametrize("ctype", ["linear", "cat"])
def test_rotation_on_layers_only_one_adapter_adapts(ctype: str) -> None:
    """Where ``b`` is absent it counts as the identity: the product is ``default``'s rotation alone there."""
    case = next(c for c in CASES if c.method == "loco")
    model = two(case, torch.float64, targets_b=TARGETS[:1])
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type=ctype)
    for lname in TARGETS[1:]:
        expected = model.base_model.get_submodule(lname).adapters["default"].rotation()
        torch.testing.assert_close(model.base_model.get_submodule(lname).adapters["mix"].rotation(), expected, rtol=0, atol=1e-12)
    x = torch.randn(4, 16, dtype=torch.float64)
    if ctype == "cat":
        model.set_adapter(["default", "b"])
        both = model(x)
        model.set_adapter("mix")
        torch.testing.assert_close(model(x), both, rtol=0, atol=1e-10)


def test_combination_above_a_layer_width_is_a_lora_as_peft_makes() -> None:
    """Two PiSSA r=4 adapters concatenate to a rank-16 LoRA even on layers narrower than 16 (peft accepts it)."""
    model = two(next(c for c in CASES if c.method == "pissa" and c.kwargs["r"] == 4))
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="cat")
    assert model.configs["mix"].method == "lora" and model.configs["mix"].r == 16
