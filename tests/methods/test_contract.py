"""The common contract of every method, parametrised over every registered method.

Mirrors peft's common tester: identity at init, merge/unmerge equivalence, orthogonality after
training, save/load round trip, only adapter parameters train, disable (also after a merge),
several adapters, dtypes, safe merge with NaN, exact parameter counts, float64 gradcheck.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import orthotune
from orthotune.layer.adapter_layer import AdapterLayer
from orthotune.methods.registry import METHODS

from ..conftest import MODELS
from ..method_cases import CASES, Case

PAIRS = [(c, m) for c in CASES for m in c.models]


def _config(case: Case, targets: list[str], **overrides):
    cfg_cls = METHODS[case.method][0]
    return cfg_cls(target_modules=targets, **{**case.kwargs, **overrides})


def build(case: Case, model_name: str, **overrides):
    """(frozen copy of the base model, adapted model, input)."""
    cls, targets, make_x = MODELS[model_name]
    base = cls()
    ref = copy.deepcopy(base)
    model = orthotune.get_model(base, _config(case, targets, **overrides))
    return ref, model, make_x()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def train_steps(model: nn.Module, x: torch.Tensor, steps: int = 3, lr: float = 1e-2, opt: str = "adam") -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.Adam(params, lr=lr) if opt == "adam" else torch.optim.SGD(params, lr=lr)
    target = torch.randn_like(model(x))
    for _ in range(steps):
        loss = (model(x) - target).pow(2).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()


def test_every_method_has_cases() -> None:
    missing = sorted(set(METHODS) - {c.method for c in CASES})
    assert not missing, f"add contract cases for {missing} in tests/method_cases.py"


@pytest.mark.parametrize("case,model_name", PAIRS, ids=[f"{c.id}-{m}" for c, m in PAIRS])
class TestContract:
    def test_identity_at_init(self, case: Case, model_name: str) -> None:
        ref, model, x = build(case, model_name)
        assert rel(model(x), ref(x)) < 1e-6

    def test_perturbed_init_moves_outputs(self, case: Case, model_name: str) -> None:
        ref, model, x = build(case, model_name, init_identity=False)
        assert rel(model(x), ref(x)) > 1e-4

    def test_merge_unmerge(self, case: Case, model_name: str) -> None:
        ref, model, x = build(case, model_name, init_identity=False)
        before = model(x)
        w0 = {n: l.weight_matrix().clone() for n, l in model.adapter_layers()}
        model.merge()
        assert model.merged
        assert rel(model(x), before) < 1e-5
        with pytest.warns(UserWarning, match="already merged"):
            model.merge()
        model.unmerge()
        assert rel(model(x), before) < 1e-5
        for n, layer in model.adapter_layers():
            assert rel(layer.weight_matrix(), w0[n]) < 1e-5
        plain = model.merge_and_unload()
        assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
        assert rel(plain(x), before) < 1e-5

    def test_parameter_count(self, case: Case, model_name: str) -> None:
        _, model, _ = build(case, model_name)
        report = model.trainable_parameters()
        expected = {n: case.params(layer.d_in, layer.d_out) for n, layer in model.adapter_layers()}
        assert report["per_layer"] == expected
        assert report["trainable"] == sum(expected.values())

    def test_orthogonal_after_training(self, case: Case, model_name: str) -> None:
        if not case.orthogonal:
            pytest.skip("additive method: no rotation to check")
        _, model, x = build(case, model_name, init_identity=False)
        train_steps(model, x, steps=5)
        for name, layer in model.adapter_layers():
            R = layer.adapters["default"].rotation()
            d = R.shape[0]
            err = (R.T @ R - torch.eye(d)).norm() / d**0.5
            assert err < 1e-5, (name, float(err))

    def test_only_adapter_parameters_train(self, case: Case, model_name: str) -> None:
        ref, model, x = build(case, model_name, init_identity=False)
        base_before = {k: v.clone() for k, v in model.base_model.state_dict().items() if "adapters." not in k}
        adapter_before = {k: v.clone() for k, v in model.base_model.state_dict().items() if "adapters." in k}
        train_steps(model, x, opt="sgd", lr=0.1)
        after = model.base_model.state_dict()
        for k, v in base_before.items():
            assert torch.equal(after[k], v), f"base tensor {k} changed"
        assert any(not torch.equal(after[k], v) for k, v in adapter_before.items())

    def test_gradients_flow_at_identity(self, case: Case, model_name: str) -> None:
        _, model, x = build(case, model_name)
        model(x).pow(2).sum().backward()
        for name, layer in model.adapter_layers():
            grads = [p.grad for p in layer.adapters["default"].parameters() if p.grad is not None]
            assert grads and any(g.abs().sum() > 0 for g in grads), name

    def test_save_load_roundtrip(self, case: Case, model_name: str, tmp_path) -> None:
        _, model, x = build(case, model_name, init_identity=False)
        train_steps(model, x)
        model.save_adapter(tmp_path / "a")
        cls = MODELS[model_name][0]
        torch.manual_seed(0)
        fresh = cls()
        loaded = orthotune.load_adapter(fresh, tmp_path / "a")
        assert torch.equal(loaded(x), model(x))
        sd_a = {k: v for k, v in model.state_dict().items() if "adapters." in k}
        sd_b = {k: v for k, v in loaded.state_dict().items() if "adapters." in k}
        assert sd_a.keys() == sd_b.keys()
        assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)

    def test_disable_adapter(self, case: Case, model_name: str) -> None:
        ref, model, x = build(case, model_name, init_identity=False)
        adapted = model(x)
        with model.disable_adapter():
            assert rel(model(x), ref(x)) < 1e-6
        assert torch.equal(model(x), adapted)
        model.merge()
        with model.disable_adapter():
            assert rel(model(x), ref(x)) < 1e-5
        assert rel(model(x), adapted) < 1e-5
        assert model.merged

    def test_two_adapters(self, case: Case, model_name: str) -> None:
        ref, model, x = build(case, model_name, init_identity=False)
        targets = MODELS[model_name][1]
        first = model(x)
        torch.manual_seed(1)
        model.add_adapter("other", _config(case, targets, init_identity=False))
        assert torch.equal(model(x), first), "adding an adapter must not change the active one"
        model.set_adapter("other")
        second = model(x)
        model.set_adapter(["default", "other"])
        both = model(x)
        assert rel(both, first) > 1e-5 and rel(both, second) > 1e-5
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert any(".default." in n for n in trainable) and any(".other." in n for n in trainable)
        model.merge()
        assert rel(model(x), both) < 1e-5
        with pytest.raises(ValueError, match="unmerge"):
            model.delete_adapter("other")
        model.unmerge()
        model.delete_adapter("other")
        assert model.active_adapters == ["default"]
        assert rel(model(x), first) < 1e-6
        with pytest.raises(ValueError, match="no adapter named"):
            model.delete_adapter("other")

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("autocast", [True, False])
    def test_half_precision(self, case: Case, model_name: str, dtype: torch.dtype, autocast: bool) -> None:
        cls, targets, make_x = MODELS[model_name]
        base = cls().to(dtype)
        model = orthotune.get_model(base, _config(case, targets, init_identity=False, autocast_adapter_dtype=autocast))
        want = torch.float32 if autocast else dtype
        for _, layer in model.adapter_layers():
            assert all(p.dtype == want for p in layer.adapters["default"].parameters())
        x = make_x().to(dtype)
        y = model(x)
        assert y.dtype == dtype and torch.isfinite(y).all()
        model.merge(safe_merge=True)
        assert torch.isfinite(model(x)).all()
        model.unmerge()
        model(x).float().sum().backward()

    def test_cores_ignore_autocast(self, case: Case, model_name: str) -> None:
        """Under torch.autocast a core (LoCO's chain core, OFT's Cayley blocks, ...) is still computed at its
        parameters' precision: only the activations' matmuls run in bf16."""
        _, model, _ = build(case, model_name, init_identity=False)
        for _, layer in model.adapter_layers():
            method = layer.adapters["default"]
            if not method.ready:
                continue
            plain = method.core(torch.float32)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                mixed = method.core(torch.float32)
            assert all(torch.equal(a, b) for a, b in zip(plain, mixed))

    def test_safe_merge_detects_nan(self, case: Case, model_name: str) -> None:
        _, model, x = build(case, model_name, init_identity=False)
        weights = {n: l.weight_matrix().clone() for n, l in model.adapter_layers()}
        name, layer = list(model.adapter_layers())[-1]
        with torch.no_grad():
            next(layer.adapters["default"].parameters()).fill_(float("nan"))
        with pytest.raises(ValueError, match="NaN"):
            model.merge(safe_merge=True)
        assert not model.merged
        for n, l in model.adapter_layers():
            assert torch.equal(l.weight_matrix(), weights[n])

    def test_gradcheck_float64(self, case: Case, model_name: str) -> None:
        if model_name != "mlp":
            pytest.skip("gradcheck on the linear model only (same method code on every layer kind)")
        cls, targets, make_x = MODELS[model_name]
        base = cls().double()
        model = orthotune.get_model(base, _config(case, ["lin1"], init_identity=False))
        model.double()
        layer = dict(model.adapter_layers())["lin1"]
        names, params = zip(*layer.adapters["default"].named_parameters())
        x = torch.randn(3, 24, dtype=torch.float64)

        def f(*ps):
            return torch.func.functional_call(layer, {f"adapters.default.{n}": p for n, p in zip(names, ps)}, (x,))

        assert torch.autograd.gradcheck(f, tuple(p.detach().requires_grad_() for p in params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize(("case", "model_name"), PAIRS, ids=[f"{c.id}-{m}" for c, m in PAIRS])
def test_inference_paths_equal_the_training_path(case: Case, model_name: str) -> None:
    """Without autograd, methods may serve a different but equal computation (LoCO/LOFT fold the rotation
    into the output through a memoised ``W0 U``, LoRA accumulates in place); it must give the training
    path's values, follow in-place changes of adapter parameters and base weights between inference
    calls, and leave its input untouched."""
    _, model, x = build(case, model_name)
    model = model.double()
    x = x.double()
    train_steps(model, x, steps=2)  # away from the identity
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    changes = [
        lambda: None,  # the second call reuses the cached cores and the memo
        lambda: next(p for p in model.parameters() if p.requires_grad).add_(0.01),
        lambda: [layer.base_layer.weight.mul_(1.01) for layer in layers],
    ]
    for change in changes:
        x_before = x.clone()
        with torch.no_grad():
            change()
            out = model(x)
        assert torch.equal(x, x_before)
        ref = model(x)  # parameters require grad: the training path
        assert rel(out, ref) < 1e-12, rel(out, ref)
        with torch.no_grad():
            model(x)  # inference again, so the next change meets a warm cache and memo
    if case.method == "loco" and case.kwargs.get("mode") != "sequential" and model_name != "conv2d":
        assert any(m.folds for m in model.modules() if isinstance(m, AdapterLayer))  # the folded path did run
