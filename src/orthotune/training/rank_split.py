"""LOFT's rank split across layers: ``r`` per layer in proportion to its input width, at a fixed parameter budget.

A single ``r`` is a large share of a narrow layer and a small one of a wide layer (MiniLM: r = 112 is 29% of a
384-wide input, 7% of the 1536-wide ``output.dense``). :func:`split_rank_by_width` keeps the adapter's total
parameter count of the fixed-``r`` config (never above it) and gives layer ``l`` the largest valid
``r_l <= c * d_l ** exponent``, with one scale ``c`` for all layers found by bisection; the result is the
config with an explicit ``rank_pattern`` (so a saved adapter reloads without the model in hand).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..layer.adapter_layer import layer_dims
from ..methods.loft.rotation import DEFAULT_R, LOFT, LOFTConfig, _transform
from ..model.inject import find_targets

_LIKE = torch.zeros((), dtype=torch.float32)


def transform_parameters(config: LOFTConfig, r: int) -> int:
    """Trainable parameters of ``config``'s transform on an ``r``-dimensional support."""
    return sum(p.numel() for p in _transform(config, r, _LIKE).parameters())


def _valid_ranks(config: LOFTConfig, d_in: int, d_out: int, name: str) -> list[int]:
    """Every support size ``config``'s transform accepts on this layer (even sizes: whole planes of the statistic)."""
    ranks = []
    for r in range(2, d_in + 1, 2):
        try:
            LOFT.check_layer(config.replace(r=r, rank_pattern={}), d_in, d_out, name)
        except ValueError:
            continue
        ranks.append(r)
    if not ranks:
        raise ValueError(f"no even support size fits {name!r} (d_in={d_in}) with transform={config.transform!r}; "
                         "exclude the module or set its r in rank_pattern")
    return ranks


def split_rank_by_width(model: nn.Module, config: LOFTConfig, exponent: float = 1.0) -> LOFTConfig:
    """``config`` with ``rank_pattern`` giving each targeted layer of ``model`` an ``r`` proportional to
    ``d_in ** exponent``, at no more adapter parameters than ``config`` as it is (its ``r`` and ``rank_pattern``).

    ``exponent=1`` makes ``r / d_in`` the same on every layer, ``0`` gives back one ``r`` for all. Call it on
    the base model before :func:`orthotune.get_model`; the returned config carries the per-layer sizes.
    """
    if not isinstance(config, LOFTConfig) or config.support == "full":
        raise ValueError("split_rank_by_width needs a LOFTConfig with a support smaller than the layer (not support='full')")
    if not (isinstance(exponent, (int, float)) and exponent >= 0):
        raise ValueError(f"exponent must be a number >= 0, got {exponent!r}")
    layers = []
    budget = 0
    counts: dict[int, int] = {}
    valid_by_shape: dict[tuple[int, int], list[int]] = {}
    for name, module in find_targets(model, config):
        d_in, d_out = layer_dims(module)
        if (d_in, d_out) not in valid_by_shape:
            valid_by_shape[d_in, d_out] = _valid_ranks(config, d_in, d_out, name)
        budget += transform_parameters(config, config.for_layer(name).r or DEFAULT_R)
        layers.append((name, d_in ** exponent, valid_by_shape[d_in, d_out]))

    def count(r: int) -> int:
        if r not in counts:
            counts[r] = transform_parameters(config, r)
        return counts[r]

    def ranks(c: float) -> list[int]:
        return [max([r for r in valid if r <= c * w], default=valid[0]) for _, w, valid in layers]

    lo, hi = 0.0, max(valid[-1] / w for _, w, valid in layers)
    if sum(count(r) for r in ranks(lo)) > budget:
        raise ValueError(f"the smallest support on every layer already exceeds the budget of {budget} parameters")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(count(r) for r in ranks(mid)) <= budget else (lo, mid)
    pattern = {re.escape(name): r for (name, _, _), r in zip(layers, ranks(lo))}
    return config.replace(rank_pattern=pattern)
