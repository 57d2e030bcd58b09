"""``benchmarks/rotation_residual.py``: the Procrustes residual is 0 for a rotation, 1 for a pure rescaling."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import rotation_residual  # noqa: E402


def test_a_rotated_weight_has_no_residual_and_keeps_every_units_norm() -> None:
    torch.manual_seed(0)
    w0 = torch.randn(6, 9, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64))
    residual, norm_change = rotation_residual.procrustes_residual(w0, w0 @ q)
    assert residual == pytest.approx(0.0, abs=1e-10) and norm_change == pytest.approx(0.0, abs=1e-12)


def test_a_rescaled_weight_is_out_of_reach_of_any_rotation() -> None:
    torch.manual_seed(1)
    w0 = torch.randn(5, 7, dtype=torch.float64)
    residual, norm_change = rotation_residual.procrustes_residual(w0, 2.0 * w0)
    assert residual == pytest.approx(1.0) and norm_change == pytest.approx(1.0)


def test_the_residual_is_the_part_of_an_update_no_rotation_makes() -> None:
    torch.manual_seed(2)
    w0 = torch.randn(8, 8, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    residual, _ = rotation_residual.procrustes_residual(w0, w0 @ q + 1e-3 * torch.randn(8, 8, dtype=torch.float64))
    assert 0.0 < residual < 0.1  # a rotation plus a little noise: mostly reachable
    # the best rotation is never worse than the identity (R = I leaves the whole update)
    for seed in range(5):
        torch.manual_seed(seed)
        residual, _ = rotation_residual.procrustes_residual(w0, w0 + torch.randn(8, 8, dtype=torch.float64))
        assert 0.0 <= residual <= 1.0 + 1e-12


def test_loco_magnitude_starts_at_the_plain_model_and_trains_its_scales() -> None:
    from torch import nn

    import orthotune

    import rotation_reach

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4, bias=False))
    model = orthotune.get_model(base, orthotune.LoCOConfig(target_modules=["0", "2"], rank=1, chain_length=2))
    x = torch.randn(3, 6)
    before = model(x).detach()
    assert rotation_reach.add_magnitudes(model) == 5 + 4
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)  # m = 1: the hook changes nothing at the start
    model(x).square().sum().backward()
    grads = [m.magnitude.grad for m in model.modules() if hasattr(m, "magnitude")]
    assert len(grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("side", ["input", "output"])
def test_side_rotation_starts_at_the_base_and_stays_a_rotation(side) -> None:
    from torch import nn

    import rotation_reach

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    x = torch.randn(2, 5)
    before = model(x).detach()
    free = rotation_reach.add_rotations(model, ["0", "2"], side)
    assert free == (5 * 4 // 2 + 4 * 3 // 2 if side == "input" else 4 * 3 // 2 + 3 * 2 // 2)
    torch.testing.assert_close(model(x), before)  # zero skew: the identity
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.rotation_param.normal_()
    for m in (model[0], model[2]):
        r = rotation_reach.rotation(m)
        torch.testing.assert_close(r @ r.T, torch.eye(r.shape[0]), atol=1e-5, rtol=0)
    w, b = model[2].weight, model[2].bias
    h = torch.relu(model[0](x))
    expect = h @ (w @ rotation_reach.rotation(model[2])).T + b if side == "input" else (h @ w.T) @ rotation_reach.rotation(model[2]).T + b
    torch.testing.assert_close(model[2](h), expect)


def test_the_output_side_loco_chain_is_a_rotation_that_starts_at_the_identity() -> None:
    from torch import nn

    import rotation_reach

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6))
    x = torch.randn(2, 5)
    before = model(x).detach()
    assert rotation_reach.add_rotations(model, ["0"], "output", chain=(2, 2)) == 2 * 2 * 6 * 2
    torch.testing.assert_close(model(x), before)  # U = 0: the identity
    with torch.no_grad():
        model[0].chain_U.normal_()
    q = rotation_reach.rotation(model[0])
    torch.testing.assert_close(q @ q.T, torch.eye(6), atol=1e-5, rtol=0)
    s = [u @ v.T - v @ u.T for u, v in zip(model[0].chain_U, model[0].chain_V)]
    torch.testing.assert_close(q, torch.linalg.matrix_exp(s[0]) @ torch.linalg.matrix_exp(s[1]), atol=1e-5, rtol=0)
