"""LOFT's support options of issue 22: rank split by input width at the fixed-r budget, and mixed supports."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import orthotune
from orthotune import LOFTConfig
from orthotune.training.rank_split import split_rank_by_width, transform_parameters
from orthotune.methods.loft.selection import complete_basis, gradient_basis, gradient_coordinates, gradient_dims
from orthotune.training.support_selection import select_supports

from tests.methods.test_supports import Tiny, batches, manual_gradient, projector


class Widths(nn.Module):
    """Two narrow layers and one four times wider, as a transformer block's attention and FFN output."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.up = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 128)
        self.down = nn.Linear(128, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.q(x) + self.k(x))))


def adapter_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("transform,extra", [("cayley", {}), ("cayley", {"block_size": 4}), ("householder", {"reflections": 2}),
                                              ("exp", {"generator_rank": 1, "chain_length": 2})])
def test_width_split_keeps_the_budget_and_scales_r_with_width(transform: str, extra: dict) -> None:
    base = Widths()
    config = LOFTConfig(target_modules=["q", "k", "up", "down"], support="random", r=16, transform=transform, **extra)
    split = split_rank_by_width(base, config)
    fixed_count = adapter_parameters(orthotune.get_model(copy.deepcopy(base), config))
    split_count = adapter_parameters(orthotune.get_model(copy.deepcopy(base), split))
    assert split_count == sum(transform_parameters(config, r) for r in split.rank_pattern.values())
    assert split_count <= fixed_count
    r = {name: split.for_layer(name).r for name in ("q", "k", "up", "down")}
    assert r["q"] == r["k"] == r["up"] < r["down"]  # "up" reads 32 inputs, "down" 128
    assert r["down"] / r["q"] == pytest.approx(4, rel=0.25)
    # one size larger on the wide layer would break the budget: the split uses it, it does not waste it
    step = extra.get("block_size", 2)
    grown = split.replace(rank_pattern={**split.rank_pattern, "down": r["down"] + step, "q": r["q"] + step})
    assert adapter_parameters(orthotune.get_model(copy.deepcopy(base), grown)) > fixed_count


def test_width_split_with_exponent_zero_is_the_fixed_r() -> None:
    config = LOFTConfig(target_modules=["q", "k", "up", "down"], support="random", r=8)
    split = split_rank_by_width(Widths(), config, exponent=0.0)
    assert set(split.rank_pattern.values()) == {8}


def test_width_split_refuses_the_full_support_and_bad_exponents() -> None:
    with pytest.raises(ValueError, match="not support='full'"):
        split_rank_by_width(Widths(), LOFTConfig(target_modules=["q"], support="full"))
    with pytest.raises(ValueError, match="exponent must be a number >= 0"):
        split_rank_by_width(Widths(), LOFTConfig(target_modules=["q"], support="random", r=4), exponent=-1)


def test_width_split_round_trips_through_save_and_load(tmp_path) -> None:
    torch.manual_seed(0)
    base = Widths()
    config = split_rank_by_width(base, LOFTConfig(target_modules=["q", "down"], support="random", r=8, init_identity=False))
    model = orthotune.get_model(copy.deepcopy(base), config)
    x = torch.randn(3, 32)
    model.save_adapter(tmp_path / "a")
    loaded = orthotune.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert loaded.configs["default"].rank_pattern == config.rank_pattern
    assert torch.equal(loaded(x), model(x))


# --------------------------------------------------------------------------- mixed supports
def test_gradient_dims_rounds_to_whole_planes() -> None:
    assert [gradient_dims(112, f) for f in (0, 0.25, 0.5, 1)] == [0, 28, 56, 112]
    assert gradient_dims(7, 1.0) == 7 and gradient_dims(10, 0.01) == 2
    with pytest.raises(ValueError, match="gradient_fraction must be a number in \\[0, 1\\]"):
        gradient_dims(8, 1.5)


def test_complete_basis_is_orthonormal_and_keeps_the_given_directions() -> None:
    torch.manual_seed(0)
    U = torch.linalg.qr(torch.randn(20, 4, dtype=torch.float64)).Q
    P = complete_basis(U, 9)
    assert P.shape == (20, 9)
    assert torch.allclose(P.T @ P, torch.eye(9, dtype=torch.float64), atol=1e-12)
    assert torch.equal(P[:, :4], U)


def test_mixed_support_spans_the_top_gradient_planes_and_random_rest() -> None:
    torch.manual_seed(0)
    base = Tiny()
    reference = {name: manual_gradient(copy.deepcopy(base), batches(3), name) for name in ("a", "b")}
    model = orthotune.get_model(base, LOFTConfig(target_modules=["a"], support="gradient", r=8))
    report = select_supports(model, iter(batches(3)), num_batches=3, progress=False, gradient_fraction=0.5)
    P = model.get_submodule("a").adapters["default"].support.P.double()
    W0, G = reference["a"]
    assert torch.allclose(P.T @ P, torch.eye(8, dtype=torch.float64), atol=1e-5)
    top = gradient_basis(W0.double(), G.double(), 4)
    assert torch.allclose(projector(P[:, :4]), projector(top), atol=1e-5)  # the gradient half: the top 4 directions
    assert torch.allclose(top.T @ P[:, 4:], torch.zeros(4, 4, dtype=torch.float64), atol=1e-5)  # the rest: outside them
    full = select_supports(copy.deepcopy(model), iter(batches(3)), num_batches=3, progress=False)
    assert 0 < report["a"]["captured_fraction"] <= full["a"]["captured_fraction"] + 1e-6


def test_mixed_coordinate_support_keeps_the_heaviest_coordinates() -> None:
    torch.manual_seed(0)
    base = Tiny()
    W0, G = manual_gradient(copy.deepcopy(base), batches(3), "a")
    model = orthotune.get_model(base, LOFTConfig(target_modules=["a"], support="gradient_coordinate", r=6))
    select_supports(model, iter(batches(3)), num_batches=3, progress=False, gradient_fraction=0.5)
    idx = model.get_submodule("a").adapters["default"].support.index
    assert idx.numel() == 6 and len(set(idx.tolist())) == 6 and torch.equal(idx, torch.sort(idx).values)
    assert set(gradient_coordinates(W0, G, 2).tolist()) <= set(idx.tolist())


def test_mixed_support_refuses_a_bad_fraction() -> None:
    model = orthotune.get_model(Tiny(), LOFTConfig(target_modules=["a"], support="gradient", r=4))
    with pytest.raises(ValueError, match="gradient_fraction"):
        select_supports(model, iter(batches(2)), num_batches=1, progress=False, gradient_fraction=2)


@pytest.mark.parametrize("support", ["gradient", "gradient_coordinate"])
def test_a_pure_gradient_support_draws_no_random_numbers(support: str) -> None:
    """gradient_fraction=1 (the default) leaves the global RNG where it was: runs stay reproducible as before."""
    torch.manual_seed(0)
    model = orthotune.get_model(Tiny(), LOFTConfig(target_modules=["a"], support=support, r=4))
    model.eval()  # no dropout draws either
    torch.manual_seed(5)
    select_supports(model, iter(batches(2)), num_batches=2, progress=False)
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(1))
