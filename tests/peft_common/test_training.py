"""peft's training tests: ``_test_training``, ``test_only_params_are_updated``, ``test_forward_output_finite``,
``test_in_features_out_features_exposed``, parameter counts, determinism in eval."""

from __future__ import annotations

import copy

import pytest
import torch

from .cases import CASES, START_AWAY_TO_TRAIN, params
from .harness import adapter_parameters, base_output, batch, make, requires_api, train
from .models import output

pytestmark = pytest.mark.parametrize("case", params(CASES))


def test_identity_at_init_and_output_shape(case) -> None:
    """peft's precondition in ``test_disable_adapters``: a fresh adapter leaves the outputs as they were."""
    expected = base_output(case)
    with torch.no_grad():
        out = output(make(case).eval(), batch(case))
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert torch.allclose(out, expected)


def test_forward_output_finite(case) -> None:
    with torch.no_grad():
        assert torch.isfinite(output(make(case).eval(), batch(case))).all()


def test_deterministic_forward_in_eval(case) -> None:
    model = make(case, init_identity=False).eval()
    with torch.no_grad():
        assert torch.equal(output(model, batch(case)), output(model, batch(case)))


def test_in_features_out_features_exposed(case) -> None:
    for _, layer in make(case).adapter_layers():
        assert isinstance(layer.in_features, int) and isinstance(layer.out_features, int)


def test_training(case) -> None:
    """After one backward, exactly the trainable parameters (adapters, modules_to_save copies) have gradients."""
    model = make(case)
    output(model, batch(case)).sum().backward()
    ours = adapter_parameters(model)
    for n, p in model.named_parameters():
        if n in ours:
            assert p.requires_grad and p.grad is not None, n
        else:
            assert p.grad is None, n


def test_gradients_flow(case) -> None:
    """Every adapter tensor gets a nonzero gradient away from the identity (peft's ``test_mha_gradients_set_correctly``
    in spirit: no adapter parameter is dead)."""
    model = make(case, init_identity=False)
    output(model, batch(case)).float().pow(2).sum().backward()
    dead = [n for n, p in adapter_parameters(model).items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


def test_only_params_are_updated(case) -> None:
    model = make(case, init_identity=case.method not in START_AWAY_TO_TRAIN)
    before = copy.deepcopy(dict(model.named_parameters()))
    train(case, model, lr=0.5, loss="sum")
    ours = adapter_parameters(model)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    for name, p in after.items():
        if name in ours:
            assert not torch.allclose(before[name], p, atol=1e-4, rtol=1e-4), name
        else:
            assert torch.allclose(before[name], p, atol=1e-4, rtol=1e-4), name


def test_parameter_counts(case) -> None:
    """``trainable_parameters()`` counts what trains: per adapter, per layer and in total."""
    model = make(case)
    counts = model.trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["trainable"] == trainable == counts["per_adapter"]["default"] == sum(counts["per_layer"].values())
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert set(counts["per_layer"]) == {n for n, _ in model.adapter_layers()} | {n for n, _ in model.saved_modules()}


@requires_api("get_nb_trainable_parameters")
def test_get_nb_trainable_parameters(case) -> None:
    model = make(case)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())  # peft: every parameter, the adapters' included
