"""Per-step cores of all adapted layers of one shape, computed together once per forward.

A rotation needs a small core every step (LoCO's ``2kr x 2kr`` chain core, ...); LoRA needs its
factors cast to the activations' dtype. Cheap in FLOPs, but done layer by layer it is dozens of
tiny kernel launches per layer, and on a GPU that dominates the step (``perf-notes.md``: 3.2x peft
LoRA per layer, 1.04x when batched). So a forward pre-hook on the wrapped model (:func:`attach`)
groups the method modules the coming forward will run, computes each group's cores in one batched
call, casts them once to the layers' dtype and caches one slice on every module; a method's forward
asks :func:`current` for its core.

The protocol, duck-typed on method modules:

* ``core_key() -> Hashable | None``: modules with equal keys (and class, and layer dtype) are
  batched together; ``None`` opts out.
* ``step_core() -> tuple[Tensor, ...]``: the per-layer reference, the tensors ``forward`` needs.
* ``step_cores(modules) -> tuple[Tensor, ...]`` (classmethod): the same for many modules at once,
  each tensor stacked along a new first dimension; gradients flow through it to every module.

When a cached core is used:

* Its parameters' version counters and storages must be unchanged (every in-place update bumps
  ``_version``, ``optimizer.step()`` and ``load_state_dict`` included), so inference and generation
  compute the cores once, not once per call.
* Under autograd, a core is computed afresh by every forward that runs the hook, and used for at most
  one backward: a hook on the batched tensors marks it spent once their gradient is computed, and a
  spent core is recomputed, layer by layer, by anything that runs later without the hook.

Without a cache (CPU tests, direct layer calls, methods without the protocol) ``current`` falls back
to ``step_core()``: the same values, layer by layer.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .layer import AdapterLayer

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


#: module -> its cached core; outside the module so that copying or pickling a model never sees it.
_CACHE: weakref.WeakKeyDictionary[nn.Module, _Entry] = weakref.WeakKeyDictionary()


def _params(module: nn.Module) -> list[Tensor]:
    """``module.parameters()`` without its name bookkeeping: this runs once per layer per forward."""
    out = [p for p in module._parameters.values() if p is not None]
    for child in module._modules.values():
        if child is not None:
            out += _params(child)
    return out


def _stamp(module: nn.Module) -> tuple[tuple[int, int], ...]:
    return tuple((p._version, p.data_ptr()) for p in _params(module))


def _needs_grad(module: nn.Module) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in _params(module))


def _usable(entry: _Entry | None, module: nn.Module, grad: bool) -> bool:
    if entry is None or entry.stamp != _stamp(module):
        return False
    return not grad or (entry.group.grad and not entry.group.spent)


def _cast(core: Core, dtype: torch.dtype) -> Core:
    return tuple(t if t.dtype == dtype or not t.is_floating_point() else t.to(dtype) for t in core)


def current(module: nn.Module, dtype: torch.dtype) -> Core:
    """The module's per-step core in ``dtype``: the batched cache when valid, else ``step_core()``."""
    entry = _CACHE.get(module)
    if _usable(entry, module, _needs_grad(module)):
        return entry.core if entry.dtype == dtype else _cast(entry.core, dtype)
    return _cast(module.step_core(), dtype)


def _groups(root: nn.Module) -> tuple[dict[tuple[Any, ...], list[nn.Module]], bool]:
    """Batchable modules the next forward runs, by (class, key, layer dtype); and whether any adapter layer exists."""
    groups: dict[tuple[Any, ...], list[nn.Module]] = defaultdict(list)
    seen = False
    for layer in _adapter_layers(root):
        seen = True
        if layer.disabled or layer.kind == "conv2d":
            continue
        for method in layer._forward_adapters():
            key_fn = getattr(method, "core_key", None)
            key: Hashable | None = key_fn() if key_fn is not None else None
            if key is not None:
                groups[(type(method), key, layer.weight.dtype)].append(method)
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
    for (cls, _, dtype), modules in groups.items():
        grad = any(_needs_grad(m) for m in modules)
        if not grad and all(_usable(_CACHE.get(m), m, False) for m in modules):
            continue  # inference: parameters unchanged since the cores were computed
        stacked = _cast(cls.step_cores(modules), dtype)
        group = _Group(grad=grad)
        if grad:
            marker = next((t for t in stacked if t.requires_grad), None)
            if marker is not None:
                marker.register_hook(_spend(group))
        slices = [t.unbind(0) for t in stacked]
        for i, m in enumerate(modules):
            _CACHE[m] = _Entry(_stamp(m), dtype, tuple(s[i] for s in slices), group)
        calls += 1
    return calls


def _spend(group: _Group):
    def hook(grad: Tensor) -> None:
        group.spent = True

    return hook


def clear(root: nn.Module) -> None:
    """Drop every cached core under ``root`` (they are recomputed on demand)."""
    for module in root.modules():
        _CACHE.pop(module, None)


def refresh_hook(module: nn.Module, args: Any) -> None:
    """Forward pre-hook on the wrapped model; removes itself once no adapter layer is left."""
    if refresh(module) is None:
        for key, fn in list(module._forward_pre_hooks.items()):
            if fn is refresh_hook:
                del module._forward_pre_hooks[key]


def attach(model: nn.Module) -> None:
    """Register :func:`refresh_hook` on ``model`` (once): batched cores before every forward."""
    if not any(fn is refresh_hook for fn in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(refresh_hook)
