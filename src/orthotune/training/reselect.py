"""LOFT's support re-selection during training, as a new rotation stage: ``add_rotation_stage(model, data, name)``.

A support chosen at step 0 holds the directions where the *first* step pays. To choose again later
without losing what was learnt, the trained rotation is frozen (not merged: the base weight, which a
saved adapter is relative to, stays untouched) and a new LOFT adapter is put next to the frozen weight,
``W = W0 R_new R_old``, its support selected from the gradients at the current point. For this order the
statistic :func:`~orthotune.training.support_selection.select_supports` takes (``Skew(W0^T dL/dW0)``
with the new stage bypassed) is exactly the first-order signal of the new stage's generator. Each
stage is an ordinary adapter: ``save_adapter`` per stage, and ``load_adapter`` of each then
``set_adapter([newest, ..., first])`` rebuild the model; ``merge_and_unload`` merges them in that order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from ..methods.loft.rotation import LOFTConfig
from ..model.adapter_model import AdapterModel
from .support_selection import select_supports


def add_rotation_stage(model: AdapterModel, data: Iterable[Any], name: str, config: LOFTConfig | None = None,
                       **select_options: Any) -> list[nn.Parameter]:
    """Freeze the active adapters' rotations, add LOFT adapter ``name`` next to the frozen weight and select its
    support from ``data``; returns its parameters (give them to the optimiser, with a fresh state).

    ``config`` defaults to the first active adapter's with ``modules_to_save`` cleared (the active head copy keeps
    training; saved modules stay with the first adapter). ``select_options`` go to :func:`select_supports`
    (``num_batches``, ``loss_fn``, ``statistic``, ``gradient_fraction``, ...; no head warm-up, the head is trained).
    """
    previous = list(model.active_adapters)
    if config is None:
        config = model.configs[previous[0]].replace(modules_to_save=None, task_type=None)
    if not isinstance(config, LOFTConfig) or config.support not in ("gradient", "gradient_coordinate"):
        raise ValueError("a rotation stage re-selects a task-aware support: use LOFTConfig(support='gradient') "
                         "or support='gradient_coordinate'")
    if config.modules_to_save:
        raise ValueError("a rotation stage trains no module copy of its own (the first adapter's head keeps training): "
                         "leave modules_to_save unset in its config")
    if select_options.get("head_warmup_steps"):
        raise ValueError("head_warmup_steps is for a fresh head; at a later stage the head is trained already")
    heads = {p: p.requires_grad for _, wrapper in model.saved_modules() for p in wrapper.parameters()}
    model.add_adapter(name, config)
    model.set_adapter([name] + previous)
    model.set_requires_grad(previous, False)
    for p, flag in heads.items():  # the active head copy keeps training as before
        p.requires_grad_(flag)
    select_supports(model, data, adapter_name=name, progress=select_options.pop("progress", False), **select_options)
    return [p for _, layer in model.adapter_layers() if name in layer.adapters for p in layer.adapters[name].parameters()]
