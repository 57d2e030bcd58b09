"""Image datasets as float tensors, and the few-shot split of the transfer recipes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .assets import digits, fashion_mnist

IMAGE_SETS = ("digits", "fashion_mnist")


def load_images(name: str, size: int, split: str = "all") -> tuple[Tensor, Tensor]:
    """(images (n, 1, size, size) in [0, 1], labels) of a real grayscale set, resized with antialiasing.

    ``digits`` (8x8, 1,797 images) has no official split: ``split`` must be "all"; Fashion-MNIST
    has "train" (60,000) and "test" (10,000). Resized images are rounded to 8-bit levels, so a
    copy stored as uint8 at the target size (see :func:`~orthotune.recipes.assets.fashion_mnist`)
    gives exactly the same tensors.
    """
    if name == "digits":
        if split != "all":
            raise ValueError("the digits set has no official split: use split='all' and few_shot_split()")
        x, y = digits()
        x = torch.from_numpy(x.astype(np.float32) / 16.0)
    elif name == "fashion_mnist":
        x, y = fashion_mnist(split)
        x = torch.from_numpy(x.astype(np.float32) / 255.0)
    else:
        raise ValueError(f"unknown image set {name!r}; choose one of {list(IMAGE_SETS)}")
    x = x.unsqueeze(1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=x.shape[-1] > size, align_corners=False)
        x = (x.clamp(0, 1) * 255).round() / 255
    return x.contiguous(), torch.from_numpy(np.asarray(y)).long()


def few_shot_split(labels: Tensor, shots: int, seed: int) -> tuple[Tensor, Tensor]:
    """(train, held-out) indices: ``shots`` seeded examples of every class for training, the rest held out."""
    g = torch.Generator().manual_seed(seed)
    train = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        if len(idx) <= shots:
            raise ValueError(f"class {c} has {len(idx)} examples, not more than shots={shots}; lower data.shots")
        train.append(idx[torch.randperm(len(idx), generator=g)[:shots]])
    train_idx = torch.sort(torch.cat(train)).values
    held = torch.ones(len(labels), dtype=torch.bool)
    held[train_idx] = False
    return train_idx, held.nonzero().flatten()


def validation_split(held: Tensor, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Split held-out indices into (validation, test): ``val_size`` seeded ones for tuning, the rest for scores."""
    if not 0 < val_size < len(held):
        raise ValueError(f"data.val_size={val_size} must be between 1 and {len(held) - 1} (the held-out pool)")
    perm = torch.randperm(len(held), generator=torch.Generator().manual_seed(seed + 1))
    return torch.sort(held[perm[:val_size]]).values, torch.sort(held[perm[val_size:]]).values


def transfer_split(labels: Tensor, shots: int, val_size: int, seed: int, eval_split: str) -> tuple[Tensor, Tensor]:
    """(train, evaluation) indices of a transfer recipe: ``shots`` per class to train on, and of the rest
    the ``val_size`` tuning images (``eval_split="val"``) or the others (``"test"``)."""
    train, held = few_shot_split(labels, shots, seed)
    val, test = validation_split(held, val_size, seed)
    return train, val if eval_split == "val" else test


def to_signed(x: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1]: the backbones' input convention (timm's mean 0.5, std 0.5; DDPM's data range)."""
    return x * 2 - 1
