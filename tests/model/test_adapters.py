"""Adapter management, parametrised over every registered method (tests/method_cases.py).

The rest of peft's common tester that methods/test_contract.py leaves out: composition order of several
active adapters, merging in steps, disable restoring state (exceptions, nesting), deleting and
adding without mutation on error, requires_grad following the active adapters, serialising
merged models, parameters surviving training + save/load with a saved module.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import orthotune

from ..conftest import MODELS
from ..method_cases import CASES, Case
from ..methods.test_contract import _config, build, rel, train_steps

IDS = [c.id for c in CASES]


def two_adapters(case: Case):
    """(reference base, model with perturbed adapters 'a' (active) and 'b', input) on the case's first model."""
    model_name = case.models[0]
    ref, model, x = build(case, model_name, init_identity=False)
    model.delete_adapter("default")
    torch.manual_seed(1)
    model.add_adapter("a", _config(case, MODELS[model_name][1], init_identity=False))
    torch.manual_seed(2)
    model.add_adapter("b", _config(case, MODELS[model_name][1], init_identity=False))
    model.set_adapter("a")
    return ref, model, x


def _multiplicative(model) -> bool:
    """Whether the case's adapters compose as maps (a method class's default; PSOFT lowrank's instances add)."""
    return next(layer.adapters["a"] for _, layer in model.adapter_layers()).multiplicative


def hand_merged(model, names: list[str]):
    """A copy of ``model`` whose base weights hold ``f_n(... f_1(W0))``, adapters disabled: the documented order."""
    other = copy.deepcopy(model)
    for _, layer in other.adapter_layers():
        W = layer.weight_matrix().float()
        for n in names:
            W = layer.adapters[n].merged_weight(W)
        layer._write_weight(W)
    return other


@pytest.mark.parametrize("case", CASES, ids=IDS)
class TestAdapterManagement:
    def test_composition_order(self, case: Case) -> None:
        _, model, x = two_adapters(case)
        model.set_adapter(["a", "b"])
        ab = model(x)
        with (reference := hand_merged(model, ["a", "b"])).disable_adapter():
            assert rel(ab, reference(x)) < 1e-5, "active ['a', 'b'] computes f_b(f_a(W0))"
        model.set_adapter(["b", "a"])
        ba = model(x)
        if _multiplicative(model):
            assert rel(ab, ba) > 1e-6, "rotations do not commute: the order is observable"
        else:
            assert rel(ab, ba) < 1e-5, "additive updates commute"

    def test_sequential_merge_matches_batch_merge(self, case: Case) -> None:
        ref, model, x = two_adapters(case)
        model.set_adapter(["a", "b"])
        unmerged = model(x)
        w0 = {n: layer.weight_matrix().clone() for n, layer in model.adapter_layers()}
        batch = copy.deepcopy(model)
        batch.merge(["a", "b"])
        model.merge(["a"])
        model.merge(["b"])
        for (n, layer), (_, other) in zip(model.adapter_layers(), batch.adapter_layers()):
            assert layer.merged_adapters == ["a", "b"]
            assert rel(layer.weight_matrix(), other.weight_matrix()) < 1e-6
        assert rel(model(x), unmerged) < 1e-5
        model.unmerge()
        for n, layer in model.adapter_layers():
            assert rel(layer.weight_matrix(), w0[n]) < 1e-5
        assert rel(model(x), unmerged) < 1e-5

    def test_merging_out_of_active_order(self, case: Case) -> None:
        _, model, x = two_adapters(case)
        model.set_adapter(["a", "b"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.merge(["b"])
        order_warnings = [w for w in caught if "does not follow the active order" in str(w.message)]
        assert bool(order_warnings) == _multiplicative(model)

    def test_set_adapter_while_merged_unmerges(self, case: Case) -> None:
        _, model, x = two_adapters(case)
        model.set_adapter("b")
        only_b = model(x)
        model.set_adapter("a")
        model.merge()
        with pytest.warns(UserWarning, match="unmerging the model first"):
            model.set_adapter("b")
        assert not model.merged
        assert rel(model(x), only_b) < 1e-5
        model.merge()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model.set_adapter("b")  # same adapters: the merge stays
        assert model.merged

    def test_disable_restores_state_after_exception_and_nests(self, case: Case) -> None:
        ref, model, x = build(case, case.models[0], init_identity=False)
        adapted = model(x)
        for merged in (False, True):
            if merged:
                model.merge()
            with pytest.raises(RuntimeError, match="boom"), model.disable_adapter():
                assert rel(model(x), ref(x)) < 1e-5
                raise RuntimeError("boom")
            assert model.merged == merged
            assert rel(model(x), adapted) < 1e-5
            with model.disable_adapter():
                with model.disable_adapter():
                    pass
                assert rel(model(x), ref(x)) < 1e-5, "leaving an inner block keeps the outer one disabled"
            assert rel(model(x), adapted) < 1e-5

    def test_requires_grad_follows_active_adapters(self, case: Case, tmp_path) -> None:
        _, model, x = two_adapters(case)

        def trainable() -> set[str]:
            names = {n.split(".adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
            assert all(".adapters." in n for n, p in model.named_parameters() if p.requires_grad)
            return names

        assert trainable() == {"a"}
        model.set_adapter("b")
        assert trainable() == {"b"}
        model.set_adapter(["a", "b"])
        assert trainable() == {"a", "b"}
        model.save_adapter(tmp_path / "b", "b")
        model.load_adapter(tmp_path / "b", "c")
        assert trainable() == {"a", "b"}, "a loaded adapter stays frozen until activated"
        model.delete_adapter("a")
        assert trainable() == {"b"} and model.active_adapters == ["b"]

    def test_add_duplicate_or_bad_name_changes_nothing(self, case: Case) -> None:
        _, model, x = two_adapters(case)
        config_before = model.configs["a"]
        state_before = copy.deepcopy(model.state_dict())
        targets = MODELS[case.models[0]][1]
        for name, match in (("a", "exists already"), ("x.y", "without '.'"), ("", "non-empty")):
            with pytest.raises(ValueError, match=match):
                model.add_adapter(name, _config(case, targets))
        with pytest.raises(ValueError, match="no adapter named 'zzz'"):
            model.delete_adapter("zzz")
        with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zzz'\]"):
            model.set_adapter(["a", "zzz"])
        assert model.configs["a"] is config_before and model.active_adapters == ["a"]
        after = model.state_dict()
        assert after.keys() == state_before.keys()
        assert all(torch.equal(after[k], v) for k, v in state_before.items())

    def test_delete_merged_adapter_refused_without_mutation(self, case: Case) -> None:
        _, model, x = two_adapters(case)
        model.set_adapter("b")
        model.merge()
        merged = [list(layer.merged_adapters) for _, layer in model.adapter_layers()]
        with pytest.raises(ValueError, match="'b' is merged; unmerge"):
            model.delete_adapter("b")
        assert [list(layer.merged_adapters) for _, layer in model.adapter_layers()] == merged
        assert all("b" in layer.adapters for _, layer in model.adapter_layers())
        model.delete_adapter("a")  # the unmerged one may go; the merge stays
        assert [list(layer.merged_adapters) for _, layer in model.adapter_layers()] == merged
        model.unmerge()
        model.delete_adapter("b")
        assert not model.configs and model.active_adapters == []

    def test_delete_cleans_up_after_itself(self, case: Case) -> None:
        model_name = case.models[0]
        _, model, x = build(case, model_name, init_identity=False)
        targets = MODELS[model_name][1]
        model.add_adapter("gone", _config(case, targets, init_identity=False))
        model.set_adapter(["default", "gone"])
        model.delete_adapter("gone")
        assert "gone" not in model.configs and model.active_adapters == ["default"]
        for _, module in model._wrappers():
            assert "gone" not in module.active_adapters
        for _, layer in model.adapter_layers():
            assert "gone" not in layer.adapters and "gone" not in layer.merged_adapters
        assert not any(".gone." in k for k in model.state_dict())

    def test_forward_output_finite_and_features_exposed(self, case: Case) -> None:
        ref, model, x = build(case, case.models[0], init_identity=False)
        assert torch.isfinite(model(x)).all()
        for name, layer in model.adapter_layers():
            base = ref.get_submodule(name)
            d_in, d_out = layer.d_in, layer.d_out
            assert (layer.in_features, layer.out_features) == (d_in, d_out)
            assert layer.weight is layer.base_layer.weight and torch.equal(layer.weight, base.weight)

    def test_merged_model_serialises(self, case: Case, tmp_path) -> None:
        _, model, x = build(case, case.models[0], init_identity=False)
        expected = model(x)
        buffer = io.BytesIO()
        torch.save(model, buffer)  # the wrapped model pickles (its class is rebuilt by name)
        buffer.seek(0)
        assert torch.equal(torch.load(buffer, weights_only=False)(x), expected)
        plain = model.merge_and_unload(safe_merge=True)
        assert rel(plain(x), expected) < 1e-5
        save_file(plain.state_dict(), str(tmp_path / "merged.safetensors"))  # needs contiguous tensors
        torch.save(plain.state_dict(), tmp_path / "merged.pt")
        fresh = MODELS[case.models[0]][0]()
        fresh.load_state_dict(load_file(str(tmp_path / "merged.safetensors")))
        assert torch.equal(fresh(x), plain(x))

    def test_parameters_after_training_and_loading(self, case: Case, tmp_path) -> None:
        model_name = case.models[0]
        cls, targets, make_x = MODELS[model_name]
        torch.manual_seed(0)
        base = cls()
        head = [n for n, m in base.named_children() if n not in targets][-1:]  # a module trained in full
        model = orthotune.get_model(copy.deepcopy(base), _config(case, targets, init_identity=False, modules_to_save=head or None))
        x = make_x()
        train_steps(model, x, opt="sgd", lr=0.1)
        model.save_adapter(tmp_path / "a")
        loaded = orthotune.load_adapter(copy.deepcopy(base), tmp_path / "a")
        trained = {k: v for k, v in model.state_dict().items() if ".adapters." in k or ".copies." in k}
        assert trained and trained.keys() == {k for k in loaded.state_dict() if ".adapters." in k or ".copies." in k}
        for k, v in trained.items():
            assert torch.allclose(loaded.state_dict()[k], v, atol=1e-6), k
        assert torch.equal(loaded(x), model(x))

    def test_merge_and_unload_in_half_precision(self, case: Case) -> None:
        """peft's fp16 merge test: merging works in half precision and the plain model carries the adapter."""
        cls, targets, make_x = MODELS[case.models[0]]
        for dtype in (torch.float16, torch.bfloat16):
            base = cls().to(dtype)
            ref = copy.deepcopy(base)
            model = orthotune.get_model(base, _config(case, targets, init_identity=False))
            x = make_x().to(dtype)
            y = model(x)
            plain = model.merge_and_unload(safe_merge=True)
            out = plain(x)
            assert out.dtype == dtype and torch.isfinite(out).all()
            assert rel(out, y) < 0.5 * rel(ref(x), y), "the merged weights hold the adapter"

    def test_load_adapter_weights_restores_in_place(self, case: Case, tmp_path) -> None:
        model_name = case.models[0]
        cls, targets, make_x = MODELS[model_name]
        head = [n for n, m in cls().named_children() if n not in targets][-1:]
        _, model, x = build(case, model_name, init_identity=False, modules_to_save=head or None)
        model.save_adapter(tmp_path / "a")
        saved_out = model(x)
        params = [p for p in model.parameters() if p.requires_grad]
        train_steps(model, x, opt="sgd", lr=0.1)
        assert rel(model(x), saved_out) > 1e-6
        model.load_adapter_weights(tmp_path / "a")
        assert torch.equal(model(x), saved_out)
        assert all(a is b for a, b in zip(params, [p for p in model.parameters() if p.requires_grad])), "same Parameters"
        model.add_adapter("other", _config(case, targets))  # init_identity=True, no saved module: another config
        with pytest.raises(ValueError, match="holds a different configuration than adapter 'other'"):
            model.load_adapter_weights(tmp_path / "a", "other")
        model.merge()
        with pytest.raises(ValueError, match="'default' is merged"):
            model.load_adapter_weights(tmp_path / "a")
