"""Adapters on models dispatched with accelerate (``device_map="auto"``, CPU or disk offload), as peft wraps them.

accelerate keeps an offloaded layer's weights as meta tensors and materialises them on the execution
device around each forward (its ``AlignDevicesHook``). orthotune does the same, one layer at a time:
:func:`onloaded` brings a layer's weights in for adapter construction (so adapter parameters are created
on the execution device, where they train), for the adapted forward and for merging; after a merge
:func:`write_back` stores the merged weight where accelerate keeps it (its CPU dict, or the ``.dat`` file
in the offload folder; a weight read from the user's own checkpoint is never overwritten: the merged one
goes to the offload folder instead). Nothing here runs for a model without accelerate hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn


def offload_hook(module: nn.Module) -> Any | None:
    """The accelerate ``AlignDevicesHook`` that offloads ``module``'s own weights, or None."""
    hook = module.__dict__.get("_hf_hook")
    if hook is None:
        return None
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return next((h for h in hooks if isinstance(h, AlignDevicesHook) and h.offload), None)


@contextlib.contextmanager
def onloaded(module: nn.Module) -> Iterator[None]:
    """Inside the block ``module``'s offloaded weights are real tensors on its execution device; meta again after."""
    hook = offload_hook(module)
    if hook is None or module.weight.device.type != "meta":  # not offloaded, or already brought in
        yield
        return
    hook.pre_forward(module)
    try:
        yield
    finally:
        hook.post_forward(module, None)


def execution_device(module: nn.Module) -> torch.device | None:
    """Where accelerate computes an offloaded ``module`` (None when it is not offloaded)."""
    hook = offload_hook(module)
    return None if hook is None else torch.device(hook.execution_device)


@torch.no_grad()
def write_back(module: nn.Module, name: str, value: Tensor) -> None:
    """Store ``value`` as ``module``'s offloaded tensor ``name`` (after a merge), where accelerate reads it from."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_weight

    weights = offload_hook(module).weights_map
    key = name
    if isinstance(weights, PrefixedDataset):
        weights, key = weights.dataset, weights.prefix + name
    stored = weights.state_dict if isinstance(weights, OffloadedWeightsLoader) else weights
    if key in stored:  # held in CPU memory: update that tensor in place
        stored[key].copy_(value)
        return
    if not isinstance(weights, OffloadedWeightsLoader) or weights.save_folder is None:
        raise ValueError(
            f"cannot store the merged weight {key!r}: accelerate keeps it in a {type(weights).__name__} orthotune "
            "cannot write to; dispatch the model with an offload_dir (offload_folder) to merge it"
        )
    # a .dat file in the offload folder (rewritten), or a tensor of the user's checkpoint (left as it was:
    # the merged weight gets its own .dat and the index points there)
    offload_weight(value.detach().to("cpu"), key, weights.save_folder, index=weights.index)
