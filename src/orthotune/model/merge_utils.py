"""Task-vector merging (task arithmetic, TIES, DARE, magnitude pruning), ported from peft 0.21's
``peft.utils.merge_utils`` so that :func:`orthotune.model.combine.add_weighted_adapter` computes what
peft's ``add_weighted_adapter`` computes (peft is not a dependency of orthotune).

Each merge takes ``n`` tensors of one shape and ``n`` weights and returns one tensor. DARE's random
pruning draws from torch's global generator, as peft's does.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

SignMethod = Literal["total", "frequency"]


def _weighted(tensors: Tensor, weights: Tensor) -> Tensor:
    return tensors * weights.view(weights.shape + (1,) * (tensors.dim() - weights.dim()))


def prune(tensor: Tensor, density: float, method: Literal["magnitude", "random"], rescale: bool = False) -> Tensor:
    """Keep a ``density`` share of ``tensor``: its largest magnitudes, or a random draw (rescaled by 1/density)."""
    if density >= 1:
        return tensor
    if density < 0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if method == "magnitude":
        mask = torch.zeros_like(tensor).reshape(-1)
        top = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
        mask[top[1]] = 1
        return tensor * mask.reshape(tensor.shape)
    pruned = tensor * torch.bernoulli(torch.full_like(input=tensor, fill_value=density))
    return pruned / density if rescale else pruned


def _majority_sign_mask(tensors: Tensor, method: SignMethod) -> Tensor:
    sign = tensors.sign()
    if method == "total":
        magnitude = tensors.sum(dim=0)
    elif method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method={method!r} is not supported; choose 'total' or 'frequency'")
    return sign == torch.where(magnitude >= 0, 1, -1)


def _disjoint_merge(tensors: Tensor, mask: Tensor) -> Tensor:
    return (tensors * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def task_arithmetic(tensors: list[Tensor], weights: Tensor) -> Tensor:
    """``sum_i w_i t_i``."""
    return _weighted(torch.stack(tensors), weights).sum(dim=0)


def magnitude_prune(tensors: list[Tensor], weights: Tensor, density: float) -> Tensor:
    """Task arithmetic of the tensors pruned to their ``density`` largest magnitudes."""
    return task_arithmetic([prune(t, density, "magnitude") for t in tensors], weights)


def ties(tensors: list[Tensor], weights: Tensor, density: float, majority_sign_method: SignMethod = "total") -> Tensor:
    """TIES (Yadav et al., 2023): magnitude-prune, elect a sign per entry, average the agreeing entries."""
    stacked = torch.stack([prune(t, density, "magnitude") for t in tensors])
    mask = _majority_sign_mask(stacked, majority_sign_method)
    return _disjoint_merge(_weighted(stacked, weights), mask)


def dare_linear(tensors: list[Tensor], weights: Tensor, density: float) -> Tensor:
    """DARE (Yu et al., 2023): random pruning rescaled by 1/density, then task arithmetic."""
    return task_arithmetic([prune(t, density, "random", rescale=True) for t in tensors], weights)


def dare_ties(tensors: list[Tensor], weights: Tensor, density: float, majority_sign_method: SignMethod = "total") -> Tensor:
    """DARE's random pruning, then TIES' sign election and disjoint mean."""
    stacked = torch.stack([prune(t, density, "random", rescale=True) for t in tensors])
    mask = _majority_sign_mask(stacked, majority_sign_method)
    return _disjoint_merge(_weighted(stacked, weights), mask)


MERGES = {
    "linear": task_arithmetic,
    "svd": task_arithmetic,
    "ties": ties,
    "ties_svd": ties,
    "dare_linear": dare_linear,
    "dare_linear_svd": dare_linear,
    "dare_ties": dare_ties,
    "dare_ties_svd": dare_ties,
    "magnitude_prune": magnitude_prune,
    "magnitude_prune_svd": magnitude_prune,
}


def merge(combination_type: str, tensors: list[Tensor], weights: Tensor, density: float | None, sign: SignMethod) -> Tensor:
    """One of :data:`MERGES` by peft's combination-type name, with its extra arguments."""
    fn = MERGES[combination_type]
    if fn is task_arithmetic:
        return fn(tensors, weights)
    if fn in (ties, dare_ties):
        return fn(tensors, weights, density, sign)
    return fn(tensors, weights, density)
