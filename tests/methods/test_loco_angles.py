"""``benchmarks/loco_angles.py``: the generator angles it reads back from a saved adapter are the generators' own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import orthotune
from orthotune.methods.loco import LoCO

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import loco_angles  # noqa: E402


def test_generator_norms_of_a_saved_adapter(tmp_path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 8))
    model = orthotune.get_model(base, orthotune.LoCOConfig(target_modules=["0", "2"], rank=2, chain_length=3))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    model.save_pretrained(tmp_path)
    norms = loco_angles.generator_norms(tmp_path)
    assert len(norms) == 2 and all(len(v) == 3 for v in norms.values())
    expected = []
    for loco in (m for m in model.modules() if isinstance(m, LoCO)):
        U, V = loco.U.detach().double(), loco.V.detach().double()
        # skew-symmetric: the spectral norm is the largest |eigenvalue|
        expected.append([float(torch.linalg.eigvals(U[i] @ V[i].T - V[i] @ U[i].T).abs().max()) for i in range(3)])
    got = sorted(norms.values())
    assert [v for vs in got for v in vs] == pytest.approx([v for vs in sorted(expected) for v in vs], rel=1e-10)


def test_a_folder_without_loco_is_refused(tmp_path) -> None:
    model = orthotune.get_model(nn.Sequential(nn.Linear(6, 6)), orthotune.LoRAConfig(target_modules=["0"], r=2))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no LoCO generators"):
        loco_angles.generator_norms(tmp_path)


@pytest.mark.parametrize("steps,spans", [(20, 6), (61, 6), (4, 4)])
def test_summary_splits_the_training_curve_into_sixths(tmp_path, steps: int, spans: int) -> None:
    """A run folder's train loss is averaged over six near-equal spans (fewer only when there are fewer steps)."""
    model = orthotune.get_model(nn.Sequential(nn.Linear(6, 6)), orthotune.LoCOConfig(target_modules=["0"], rank=1, chain_length=1))
    model.save_pretrained(tmp_path)
    train = [[i + 1, float(i), 1e-3] for i in range(steps)]
    (tmp_path / "results.json").write_text(json.dumps({"history": {"train": train}, "config": {"train": {"lr": 1e-3}},
                                                       "steps": steps, "final": {}, "before": {}}))
    sixths = loco_angles.summary(tmp_path)["train_loss_by_sixth"]
    assert len(sixths) == spans and sixths == sorted(sixths)
    assert sixths[0] == pytest.approx(sum(range(round(steps / 6) or 1)) / (round(steps / 6) or 1))
