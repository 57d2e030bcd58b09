"""Per-step cores of all adapted layers of one kind, computed together once per forward.

A rotation needs a small core every step (LoCO's ``2kr x 2kr`` chain core, ...); LoRA needs its
factors cast to the activations' dtype. Cheap in FLOPs, but done layer by layer it is dozens of
tiny kernel launches per layer, and on a GPU that dominates the step (``perf-notes.md``: 3.2x peft
LoRA per layer, 1.04x when batched). So a forward pre-hook on the wrapped model (:func:`attach`)
groups the method modules the coming forward will run, computes each group's cores in one batched
call, casts them once to the layers' dtype and caches one slice on every module; a method's forward
asks :func:`current` for its core.

The protocol, duck-typed on method modules:

* ``core_key() -> Hashable | None``: modules with equal keys (and class, and layer dtype) are
  batched together in one call; ``None`` opts out.
* ``step_core() -> tuple[Tensor, ...]``: the per-layer reference, the tensors ``forward`` needs.
* ``step_cores(modules) -> list[(indices, tuple[Tensor, ...])]`` (classmethod): the same for many
  modules at once, in chunks of modules whose cores have one shape, each tensor stacked along a new
  first dimension in the order of ``indices``; gradients flow through it to every module.

When a cached core is used:

* Under autograd, a core is computed afresh by every forward that runs the hook, and used for at most
  one backward: a hook on the batched tensors marks it spent once their gradient is computed, and a
  spent core is recomputed, layer by layer, by anything that runs later without the hook (reentrant
  activation checkpointing). A training core is never reused by a later forward.
* Without autograd, a core computed without autograd is reused while its parameters' version
  counters and storages are unchanged (``copy_``, ``load_state_dict`` and non-fused optimizers bump
  them), so inference and generation compute the cores once, not once per call. Fused optimizers and
  ``.data`` edits do not bump versions; a training forward in between (as every training step has)
  replaces the cache anyway, else call :func:`clear` after such an edit.

Without a valid cache (direct layer calls, methods without the protocol, ``torch.compile``, which
fuses the per-layer cores itself) ``current`` falls back to ``step_core()``: the same values, layer
by layer. So do modules whose parameters are FSDP2 shards (DTensors) when the hook runs: FSDP
gathers them only inside each block's own forward, so their cores are computed there.
"""

from __future__ import annotations

import itertools
import weakref
from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .layer import MERGED_KINDS, AdapterLayer
from .ops import lowrank

Core = tuple[Tensor, ...]


@dataclass
class _Group:
    """State shared by the modules of one batched computation."""

    grad: bool
    spent: bool = False


@dataclass
class _Entry:
    stamp: tuple[tuple[int, int], ...]
    dtype: torch.dtype
    core: Core
    group: _Group = field(repr=False)
    checked: int = -1  # the refresh that last found this entry valid


#: Numbers refreshes: an entry checked by the running forward's refresh needs no second check.
_PASSES = itertools.count()
_LAST_PASS = [-1]


#: module -> its cached core; outside the module so that copying or pickling a model never sees it.
_CACHE: weakref.WeakKeyDictionary[nn.Module, _Entry] = weakref.WeakKeyDictionary()


def _params(module: nn.Module) -> list[Tensor]:
    """The module's parameters and buffers (what its core depends on, e.g. a LOFT support), as
    ``parameters()`` and ``buffers()`` without their name bookkeeping: this runs once per layer per forward."""
    out = [p for p in module._parameters.values() if p is not None]
    out += [b for b in module._buffers.values() if b is not None]
    for child in module._modules.values():
        if child is not None:
            out += _params(child)
    return out


def _stamp(params: list[Tensor]) -> tuple[tuple[int, int], ...]:
    return tuple((p._version, p.data_ptr()) for p in params)


def _usable(entry: _Entry | None, params: list[Tensor], grad: bool) -> bool:
    """Whether a cached core may serve a forward that needs (``grad``) or does not need gradients.

    Version counters miss some updates (fused optimizers, ``.data`` edits), so a core computed for
    training is never reused by a later forward: only cores computed without autograd are, while
    their parameters' versions and storages are unchanged (inference, generation).
    """
    if entry is None or entry.stamp != _stamp(params):
        return False
    return (entry.group.grad and not entry.group.spent) if grad else not entry.group.grad


def _needs_grad(params: list[Tensor]) -> bool:
    return lowrank.tracked(*params)


def _cast(core: Core, dtype: torch.dtype) -> Core:
    return tuple(t if t.dtype == dtype or not t.is_floating_point() else t.to(dtype) for t in core)


def current(module: nn.Module, dtype: torch.dtype) -> Core:
    """The module's per-step core in ``dtype``: the batched cache when valid, else ``step_core()``.

    Under ``torch.compile`` always ``step_core()``: the compiler fuses it, and a cache is state it cannot trace.
    """
    if torch.compiler.is_compiling():
        return _cast(module.step_core(), dtype)
    entry = _CACHE.get(module)
    if entry is not None:
        if entry.checked == _LAST_PASS[0] and not entry.group.spent:  # validated by this forward's refresh
            return entry.core if entry.dtype == dtype else _cast(entry.core, dtype)
        params = _params(module)
        if _usable(entry, params, _needs_grad(params)):
            return entry.core if entry.dtype == dtype else _cast(entry.core, dtype)
    return _cast(module.step_core(), dtype)


def _groups(root: nn.Module) -> tuple[dict[tuple[Any, ...], list[nn.Module]], bool]:
    """Batchable modules the next forward runs, by (class, key, layer dtype); and whether any adapter layer exists."""
    groups: dict[tuple[Any, ...], list[nn.Module]] = defaultdict(list)
    seen = False
    for layer in _adapter_layers(root):
        seen = True
        if layer.disabled or layer.kind in MERGED_KINDS:
            continue
        for method in layer._forward_adapters():
            key_fn = getattr(method, "core_key", None)
            key: Hashable | None = key_fn() if key_fn is not None else None
            if key is not None:
                groups[(type(method), key, layer.compute_dtype)].append(method)
    return groups, seen


def _adapter_layers(root: nn.Module) -> list[AdapterLayer]:
    """Every adapter layer under ``root`` in module order (a plain walk: cheaper than ``modules()``)."""
    found, stack = [], [root]
    while stack:
        module = stack.pop()
        if isinstance(module, AdapterLayer):
            found.append(module)
        else:
            stack.extend(reversed([m for m in module._modules.values() if m is not None]))
    return found


def refresh(root: nn.Module) -> int | None:
    """Compute and cache the cores of every batchable module under ``root``.

    Returns the number of batched calls made, or None if ``root`` holds no adapter layer at all.
    """
    groups, seen = _groups(root)
    if not seen:
        return None
    calls = 0
    pass_id = _LAST_PASS[0] = next(_PASSES)
    for (cls, _, dtype), modules in groups.items():
        params = [_params(m) for m in modules]
        if any(_sharded(p) for p in params):
            continue  # FSDP: parameters are shards until each layer's own forward; cores per layer there
        grad = any(_needs_grad(p) for p in params)
        entries = [_CACHE.get(m) for m in modules]
        if not grad and all(_usable(e, p, False) for e, p in zip(entries, params)):
            for e in entries:  # inference: parameters unchanged since the cores were computed
                e.checked = pass_id
            continue
        group = _Group(grad=grad)
        for indices, stacked in cls.step_cores(modules):
            stacked = _cast(stacked, dtype)
            marker = next((t for t in stacked if t.requires_grad), None) if grad else None
            if marker is not None:
                marker.register_hook(_spend(group))
            slices = [t.unbind(0) for t in stacked]
            for j, i in enumerate(indices):
                _CACHE[modules[i]] = _Entry(_stamp(params[i]), dtype, tuple(s[j] for s in slices), group, pass_id)
        calls += 1
    return calls


def _sharded(params: list[Tensor]) -> bool:
    """Whether any tensor is a DTensor (a parameter sharded by FSDP2's ``fully_shard``); by class name,
    as builds without ``torch.distributed`` have no DTensor to import."""
    return any(type(p).__name__ == "DTensor" for p in params)


def _spend(group: _Group):
    def hook(grad: Tensor) -> None:
        group.spent = True

    return hook


def clear(root: nn.Module) -> None:
    """Drop every cached core under ``root`` (they are recomputed on demand)."""
    for module in root.modules():
        _CACHE.pop(module, None)


def refresh_hook(module: nn.Module, args: Any) -> None:
    """Forward pre-hook on the wrapped model; removes itself (and :func:`end_hook`) once no adapter layer is left."""
    if torch.compiler.is_compiling():
        return
    if refresh(module) is None:
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key, fn in list(hooks.items()):
                if fn is refresh_hook or fn is end_hook:
                    del hooks[key]


def end_hook(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook: after the forward, cached cores are checked again before use (parameters may change)."""
    if not torch.compiler.is_compiling():
        _LAST_PASS[0] = -1


def attach(model: nn.Module) -> None:
    """Register :func:`refresh_hook` and :func:`end_hook` on ``model`` (once): batched cores for every forward."""
    if not any(fn is refresh_hook for fn in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(refresh_hook)
        model.register_forward_hook(end_hook, always_call=True)
