"""The transfer recipes' split (ViT and DiT): seeded, per-class shots, disjoint train / val / test."""

from __future__ import annotations

import pytest
import torch

from orthotune.recipes.images import transfer_split


def test_transfer_split_is_seeded_disjoint_and_has_the_shots() -> None:
    labels = torch.arange(10).repeat_interleave(30)
    train, val = transfer_split(labels, shots=5, val_size=40, seed=3, eval_split="val")
    train_again, test = transfer_split(labels, shots=5, val_size=40, seed=3, eval_split="test")
    assert torch.equal(train, train_again) and torch.bincount(labels[train]).tolist() == [5] * 10
    assert len(val) == 40 and len(test) == 300 - 50 - 40
    assert len(set(train.tolist()) | set(val.tolist()) | set(test.tolist())) == 300  # a partition
    assert not torch.equal(transfer_split(labels, 5, 40, 4, "val")[1], val)  # another seed, another split
    with pytest.raises(ValueError, match="lower data.shots"):
        transfer_split(labels, shots=30, val_size=40, seed=0, eval_split="val")
