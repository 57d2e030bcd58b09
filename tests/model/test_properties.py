"""Property-based: random configs and layer shapes through get_model, merge, unmerge, save and load.

Each example draws a method case (tests/method_cases.py, so every registered method is covered),
mutates some of its hyperparameters (valid values, out-of-range ones, unknown choices), a layer
kind and shape, targets (right, misspelled, or a non-linear module), dtype and init. The contract:
either every step works (identity at init, merge == unmerged, unmerge restores the base, a saved
adapter reloads bit-exactly), or the config / get_model raises a ValueError with a message and the
model is left exactly as it was. Anything else (a TypeError or RuntimeError from deep inside, NaN
outputs, a half-changed model) fails the test.
"""

from __future__ import annotations

import copy
import tempfile
import typing
from dataclasses import fields

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import orthotune
from orthotune.methods.config import AdapterConfig
from orthotune.layer.adapter_layer import AdapterLayer
from orthotune.methods.registry import METHODS

from ..method_cases import CASES

COMMON = {f.name for f in fields(AdapterConfig)}


class Net(nn.Module):
    """One adaptable layer of a drawn kind and shape, a non-linear module and a head."""

    def __init__(self, kind: str, d_in: int, d_out: int, kernel: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.layer = nn.Linear(d_in, d_out)
        elif kind == "conv1d":
            from transformers.pytorch_utils import Conv1D

            self.layer = Conv1D(d_out, d_in)
            nn.init.normal_(self.layer.weight, std=d_in**-0.5)
        else:
            self.layer = nn.Conv2d(d_in, d_out, kernel, padding=kernel // 2)
        self.act = nn.Tanh()
        self.head = nn.Linear(d_out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.layer(x))
        return self.head(h.mean((-1, -2)) if self.kind == "conv2d" else h)

    def example(self, d_in: int) -> torch.Tensor:
        return torch.randn(2, d_in, 5, 5) if self.kind == "conv2d" else torch.randn(3, d_in)


def _values_for(annotation: typing.Any, current: typing.Any) -> st.SearchStrategy:
    """Valid-looking and invalid values of a field's type (None only where the type allows it)."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if args else annotation
    if base is bool:
        values = st.booleans()
    elif base is int:
        values = st.sampled_from([-1, 0, 1, 2, 3, 4, 5, 8, 12])
    elif base is float:
        values = st.sampled_from([-1.0, 0.0, 0.05, 0.5, 1.0, 2.0, float("nan"), float("inf")])
    elif base is str:
        values = st.sampled_from(["bogus", ""])
    else:
        return st.just(current)
    if current is not None:
        values = st.one_of(st.just(current), values)
    return st.one_of(st.none(), values) if optional else values


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, typing.Any]:
    case = draw(st.sampled_from(CASES))
    cfg_cls = METHODS[case.method][0]
    hints = typing.get_type_hints(cfg_cls)
    own = [f for f in fields(cfg_cls) if f.name not in COMMON]
    kwargs = dict(case.kwargs)
    for f in draw(st.lists(st.sampled_from(own), max_size=3, unique_by=lambda f: f.name)) if own else []:
        kwargs[f.name] = draw(_values_for(hints[f.name], kwargs.get(f.name, f.default)))
    kind = draw(st.sampled_from(["linear", "linear", "conv1d", "conv2d"]))
    return {
        "case": case,
        "kwargs": kwargs,
        "kind": kind,
        "d_in": draw(st.integers(1, 40) if kind != "conv2d" else st.integers(1, 6)),
        "d_out": draw(st.integers(1, 40)),
        "kernel": draw(st.sampled_from([1, 3])),
        "targets": draw(st.sampled_from([["layer"]] * 6 + ["lay.*", "all-linear", ["act"], ["layr"]])),
        "init_identity": draw(st.booleans()),
        "autocast": draw(st.booleans()),
        "dtype": draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16])),
        "adapter_name": draw(st.sampled_from(["default"] * 8 + ["task.a", ""])),
    }


def snapshot(model: nn.Module) -> tuple[dict, dict]:
    return copy.deepcopy(model.state_dict()), {n: p.requires_grad for n, p in model.named_parameters()}


def assert_untouched(model: nn.Module, before: tuple[dict, dict]) -> None:
    state, grads = before
    assert not any(isinstance(m, AdapterLayer) for m in model.modules()), "a failed call left a wrapper behind"
    assert not model._forward_pre_hooks and not model._forward_hooks, "a failed call left a hook behind"
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def make_base(s: dict) -> Net:
    torch.manual_seed(1)
    return Net(s["kind"], s["d_in"], s["d_out"], s["kernel"]).to(s["dtype"])


@settings(max_examples=int(__import__("os").environ.get("PROP_N", 200)), deadline=None, derandomize=not __import__("os").environ.get("PROP_N"), database=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_configs_work_or_fail_cleanly(s: dict) -> None:
    case = s["case"]
    cfg_cls = METHODS[case.method][0]
    try:
        config = cfg_cls(
            target_modules=s["targets"], init_identity=s["init_identity"], autocast_adapter_dtype=s["autocast"], **s["kwargs"]
        )
    except ValueError as err:
        assert str(err)
        event("config refused")
        return

    base = make_base(s)
    x = base.example(s["d_in"]).to(s["dtype"])
    with torch.no_grad():
        reference = base(x)
    before = snapshot(base)
    try:
        model = orthotune.get_model(base, config, adapter_name=s["adapter_name"])
    except ValueError as err:
        assert str(err)
        assert_untouched(base, before)
        event("get_model refused")
        return
    event(f"adapted: {case.method}")
    assert s["adapter_name"] not in ("", "task.a"), "an invalid adapter name was accepted"
    model.eval()  # dropout off: the checks below compare deterministic outputs

    low = s["dtype"] != torch.float32
    with torch.no_grad():
        out = model(x)
        assert torch.isfinite(out).all(), "a config that validated produced non-finite outputs"
        if s["init_identity"]:
            assert rel(out, reference) < (1e-2 if low else 1e-5)

    with tempfile.TemporaryDirectory() as tmp:
        model.save_adapter(tmp + "/adapter")
        fresh = make_base(s)
        loaded = orthotune.load_adapter(fresh, tmp + "/adapter", adapter_name=s["adapter_name"]).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), out), "a saved adapter must reload bit-exactly"

        # the same folder loaded into a model whose layer has another shape fails cleanly, changing nothing
        other = make_base({**s, "d_out": s["d_out"] + 1})
        before_other = snapshot(other)
        with pytest.raises(ValueError, match="shape mismatch at '(layer|head)'"):
            orthotune.load_adapter(other, tmp + "/adapter")
        assert_untouched(other, before_other)

    with torch.no_grad():  # after saving: unmerge restores the base weights only up to rounding
        weights = {n: layer.weight_matrix().clone() for n, layer in model.adapter_layers()}
        model.merge(safe_merge=True)
        assert rel(model(x), out) < (5e-2 if low else 1e-4)
        # rounding a merged weight costs eps * |W0 + dW|, which unmerging cannot give back
        scale = {n: max(float(layer.weight_matrix().double().norm()), float(weights[n].double().norm())) for n, layer in model.adapter_layers()}
        model.unmerge()
        for n, layer in model.adapter_layers():
            err = float((layer.weight_matrix().double() - weights[n].double()).norm())
            assert err <= (1e-2 if low else 1e-5) * scale[n]
        assert rel(model(x), out) < (5e-2 if low else 1e-4)
