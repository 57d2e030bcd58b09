"""``benchmarks/loco_width.py``: its teacher is a rotation of the frozen weight and one LoCO layer learns it."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import loco_width  # noqa: E402


def test_the_teacher_turns_planes_by_the_given_angles() -> None:
    W0, target = loco_width.teacher(32, torch.Generator().manual_seed(0))
    R = torch.linalg.solve(W0, target)
    torch.testing.assert_close(R.T @ R, torch.eye(32, dtype=torch.float64), atol=1e-10, rtol=0)
    angles = torch.linalg.eigvals(R).angle().abs().sort(descending=True).values
    expected = sorted([a for a in loco_width.ANGLES for _ in range(2)], reverse=True)
    torch.testing.assert_close(angles[: len(expected)], torch.tensor(expected, dtype=torch.float64), atol=1e-8, rtol=0)
    assert angles[len(expected):].abs().max() < 1e-8


def test_one_loco_layer_learns_the_rotation() -> None:
    """The score starts at 1 (identity: none of the update made) and falls to near 0 at a working rate."""
    assert abs(loco_width.run(16, rank=2, chain=1, lr=2e-2, steps=0, batch=32, seed=0) - 1.0) < 1e-6
    assert loco_width.run(16, rank=2, chain=1, lr=2e-2, steps=150, batch=32, seed=0) < 0.05
