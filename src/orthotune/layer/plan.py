"""The per-step plan: every adapted layer's core, computed in batched calls at the start of a forward.

A rotation needs a small core every step (LoCO's ``2kr x 2kr`` chain core, ...); LoRA needs its
factors cast to 16-bit activations (in its parameters' dtype its cores are the parameters). Cheap in
FLOPs, but done layer by layer it is dozens of tiny kernel launches per layer, and on a GPU that
dominates the step (3.2x peft LoRA per layer, 1.04x when batched). So the model owns one :class:`Plan`,
whose hooks on the wrapped model (:meth:`Plan.attach`) group the methods the coming forward runs by (class, ``core_key()``,
the dtype the layer makes the core in), compute each group's cores in one ``cores()`` call, cast once to that dtype,
and leave each layer its adapters' cores in ``layer.planned`` (name -> core). A layer without a
planned core asks the method for ``core()``: the same values, computed there.

How long a planned core lives:

* Training (autograd): from the forward that computed it until its backward consumed it (a hook on
  the batched tensors), so that activation checkpointing's recompute during backward uses the cores
  the original forward used; a later training forward always computes its own.
* Inference (no autograd): the plan keeps the cores across forwards while their parameters' version
  counters and storages are unchanged (``copy_``, ``load_state_dict`` and non-fused optimizers bump
  them), so decoding does not recompute them per token; they are handed to the layers only for the
  duration of each forward. Fused optimizers and ``.data`` edits do not bump versions: a training
  forward in between (as every training step has) replaces them anyway, else call :func:`clear`.
* Under ``torch.compile`` the hooks trace into the graph and the plan ends with the forward. An activation
  checkpoint dynamo could not trace (a graph break inside it, e.g. transformers 5.25's Llama layers with the
  ``kernels`` package) runs its layers eagerly and recomputes them after the plan ended: such a layer keeps the
  planned core it ran with in :attr:`AdapterLayer.replay` for that recompute (only eager code writes it).

Serving (frozen cores). A compiled graph cannot read version counters, so for compiled inference the
cores are computed once, eagerly, outside the graph: :meth:`Plan.freeze` (run by the model's ``eval()``
and by every call of its API that changes adapters in eval mode: ``set_adapter``, ``add_adapter``,
``load_adapter``, ``delete_adapter``, ``merge``/``unmerge``, enabling/disabling, ``load_state_dict``,
``.to()``) computes every adapter's core and its layer's inference fold (``W0 U``) and leaves them in
:attr:`AdapterLayer.frozen`, which the graph reads as tensor inputs: a refresh replaces the tensors and
recompiles nothing. A compiled no-grad forward of a layer in eval mode uses them and the plan computes
no core there; with autograd on (e.g. attribution or training in eval mode) cores are computed in the
graph as in training, and the forward drops the frozen cores of the adapters it computes (an optimizer
step may follow): later compiled inference computes those in the graph until ``model.eval()``. The eager path keeps these same cores as its inference memo, so it still detects edits by
their version counters (and freezes again). The rule: an edit of adapter parameters in eval mode outside
orthotune's API (an optimizer step, ``.data`` or ``copy_`` on a parameter) reaches a compiled model
after ``model.eval()`` or :func:`clear` (``train()`` drops the frozen cores).

Modules whose parameters are FSDP2 shards (DTensors) when the hook runs are left to their layers:
FSDP gathers them only inside each block's own forward.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..methods.base import AdapterMethod, Core, compute_cores
from ..ops import lowrank
from .adapter_layer import MERGED_KINDS, AdapterLayer

#: One planned core's owner: the layer, the adapter's name there, and its method.
Member = tuple[AdapterLayer, str, AdapterMethod]


@dataclass
class _Kept:
    """Inference cores of one group, valid while the members and their parameters' stamp are unchanged."""

    members: list[Member]
    stamp: tuple[tuple[int, int], ...]
    cores: list[Core]


class Plan:
    """The per-step cores of one model's adapted layers (see the module docstring)."""

    def __init__(self) -> None:
        self._kept: dict[Hashable, _Kept] = {}  # inference cores, by group
        self._handed: list[tuple[AdapterLayer, str, Core, bool]] = []  # this forward's (layer, name, core, training)
        self._handles: list[Any] = []
        self._frozen = False  # freeze() ran, thaw() not since: the layers hold frozen inference cores

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles start with no cores (a training core is part of an autograd graph)."""
        return {"_kept": {}, "_handed": [], "_handles": [], "_frozen": False}

    def attach(self, model: nn.Module) -> None:
        """Run :meth:`start` before and :meth:`end` after every forward of ``model`` (once)."""
        if not self._handles:
            self._handles = [
                model.register_forward_pre_hook(self._pre_hook),
                model.register_forward_hook(self._post_hook, always_call=True),
            ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre_hook(self, model: nn.Module, args: Any) -> None:
        # no adapter layer left (e.g. after merge_and_unload): nothing to plan; the hooks go at the next eager call
        # (a compiled graph cannot remove them: dynamo does not trace hook handles)
        if self.start(model) is None and not torch.compiler.is_compiling():
            self.detach()

    def _post_hook(self, model: nn.Module, args: Any, output: Any) -> None:
        self.end()

    def start(self, root: nn.Module, may_freeze: bool = True) -> int | None:
        """Compute and hand out the cores of every batchable method under ``root`` for the coming forward.

        Returns the number of batched ``cores()`` calls made, or None if ``root`` holds no adapter layer.
        An eager inference forward of a frozen plan (``root`` in eval mode) that finds its kept cores stale
        or missing freezes again first (``may_freeze``), so that compiled forwards see the change too.
        """
        layers = adapter_layers(root)
        if not layers:
            return None
        compiling = torch.compiler.is_compiling()
        serving = compiling and not torch.is_grad_enabled()
        if not compiling:  # the cores an eager checkpoint in a compiled forward kept for its recompute are stale now
            for layer in layers:
                if layer.replay:
                    layer.replay = {}
        kept: dict[Hashable, _Kept] = {}
        calls = 0
        for group, members in _groups(layers).items():
            if serving and all(not layer.training and name in layer.frozen for layer, name, _ in members):
                continue  # compiled inference: the layers read their frozen cores, inputs of the graph
            cls, _, dtype = group
            methods = [m for _, _, m in members]
            training, stamp = True, ()
            if not compiling:
                params = [_tensors(m) for m in methods]
                if any(_sharded(p) for p in params):
                    continue  # FSDP: parameters are shards until each block's own forward; cores per layer there
                training = any(lowrank.tracked(*p) for p in params)
                stamp = tuple(s for p in params for s in _stamp(p))
            if training and torch.is_grad_enabled():  # an optimizer step may follow (training in eval mode): compiled
                for layer, name, _ in members:  # inference computes these cores until model.eval() freezes them again
                    layer.frozen.pop(name, None)
            old = None if compiling else self._kept.get(group)  # a graph must not guard on the eager memo
            if not training and old is not None and old.stamp == stamp and _same(old.members, members):
                cores = old.cores  # inference: parameters unchanged since these cores were computed
            elif not training and not compiling and may_freeze and self._frozen and not root.training:
                return self.freeze(root) + self.start(root, may_freeze=False)
            else:
                cores = compute_cores(cls, methods, dtype)
                calls += 1
            released = _release_after_backward(members, cores) if training and not compiling else set()
            if not training:
                kept[group] = _Kept(members, stamp, cores)
            for i, ((layer, name, _), core) in enumerate(zip(members, cores)):
                layer.planned[name] = core
                self._handed.append((layer, name, core, i in released))
        if not compiling:
            self._kept = kept
        return calls

    def end(self) -> None:
        """After the forward: take back the cores that must not outlive it (all but training cores, which
        their backward releases)."""
        for layer, name, core, training in self._handed:
            mine = layer.planned.get(name)  # still this forward's core (compared by its first tensor: dynamo traces no tuple identity)
            if not training and mine is not None and mine[0] is core[0]:
                del layer.planned[name]
        self._handed = []

    def clear(self) -> None:
        """Forget the inference cores kept across forwards (after an edit that bumps no version counter)."""
        self._kept = {}

    @torch.no_grad()
    def freeze(self, root: nn.Module) -> int:
        """Compute every active adapter's core under ``root`` now, eagerly, and leave it with its layer's
        inference fold in :attr:`AdapterLayer.frozen` for compiled inference (see the module docstring); the
        eager path keeps the same cores as its memo. Returns the number of batched ``cores()`` calls made."""
        layers = adapter_layers(root)
        kept: dict[Hashable, _Kept] = {}
        for group, members in _groups(layers).items():
            cls, _, dtype = group
            methods = [m for _, _, m in members]
            params = [_tensors(m) for m in methods]
            if all(_computable(m, p) for m, p in zip(methods, params)):
                kept[group] = _Kept(members, tuple(s for p in params for s in _stamp(p)), compute_cores(cls, methods, dtype))
        batched = {(id(layer), name): core for k in kept.values() for (layer, name, _), core in zip(k.members, k.cores)}
        for layer in layers:
            cores: dict[str, Core] = {}
            for name in layer.forward_names() if layer.kind not in MERGED_KINDS else []:
                core, method = batched.get((id(layer), name)), layer.adapters[name]
                if core is None and method.core_key() is None and _computable(method, _tensors(method)):
                    core = method.core(layer.core_dtype_of(name))
                if core is not None:
                    cores[name] = core
            layer.freeze(cores)
        self._kept, self._frozen = kept, True
        return len(kept)

    def thaw(self, root: nn.Module) -> None:
        """Drop the frozen inference cores under ``root`` (training mode: parameters change every step)."""
        if self._frozen:
            for layer in adapter_layers(root):
                layer.frozen = {}
            self._frozen = False


def adapter_layers(root: nn.Module) -> list[AdapterLayer]:
    """Every adapter layer under ``root`` in module order (a plain walk: cheaper than ``modules()``)."""
    found, stack = [], [root]
    while stack:
        module = stack.pop()
        if isinstance(module, AdapterLayer):
            found.append(module)
        else:
            stack.extend(reversed([m for m in module._modules.values() if m is not None]))
    return found


def clear(root: nn.Module) -> None:
    """Drop every core and inference fold under ``root`` and in its plan (they are recomputed on demand); a
    frozen plan freezes again, so compiled inference sees parameters edited outside orthotune's API."""
    frozen = []
    for module in (root, getattr(root, "base_model", root)):  # the wrapped model, or the OrthoModel around it
        for fn in module._forward_pre_hooks.values():
            plan = getattr(fn, "__self__", None)
            if isinstance(plan, Plan):
                plan.clear()
                if plan._frozen:
                    frozen.append(plan)
    for layer in adapter_layers(root):
        layer.planned.clear()
        layer.replay = {}
        layer.folds.clear()
        layer.frozen = {}
    for plan in frozen:
        plan.freeze(root)


def _groups(layers: list[AdapterLayer]) -> dict[Hashable, list[Member]]:
    """The methods the next forward runs, by (class, core key, core dtype on the layer); per-layer ones left out."""
    groups: dict[Hashable, list[Member]] = defaultdict(list)
    for layer in layers:
        if layer.kind in MERGED_KINDS:
            continue
        for name in layer.forward_names():
            method = layer.adapters[name]
            key = method.core_key()
            if key is not None:
                groups[(type(method), key, layer.core_dtype_of(name))].append((layer, name, method))
    return groups


def _same(a: list[Member], b: list[Member]) -> bool:
    return len(a) == len(b) and all(x[2] is y[2] for x, y in zip(a, b))


def _tensors(module: nn.Module) -> list[Tensor]:
    """The module's parameters and buffers (what its core depends on, e.g. a LOFT support), as
    ``parameters()`` and ``buffers()`` without their name bookkeeping: this runs once per layer per forward."""
    out = [p for p in module._parameters.values() if p is not None]
    out += [b for b in module._buffers.values() if b is not None]
    for child in module._modules.values():
        if child is not None:
            out += _tensors(child)
    return out


def _computable(method: AdapterMethod, tensors: list[Tensor]) -> bool:
    """Whether ``method``'s core can be computed now: not on FSDP shards or meta tensors (parameters still to
    be loaded), and the method ready (e.g. a LOFT support selected)."""
    return method.ready and not _sharded(tensors) and not any(t.is_meta for t in tensors)


def _stamp(tensors: list[Tensor]) -> tuple[tuple[int, int], ...]:
    return tuple((t._version, t.data_ptr()) for t in tensors)


def _sharded(tensors: list[Tensor]) -> bool:
    """Whether any tensor is a DTensor (a parameter sharded by FSDP2's ``fully_shard``); by class name,
    as builds without ``torch.distributed`` have no DTensor to import."""
    return any(type(t).__name__ == "DTensor" for t in tensors)


def _release_after_backward(members: list[Member], cores: list[Core]) -> set[int]:
    """Take the cores back from the layers once the backward has computed their gradients (so a later call
    without a plan, e.g. a reentrant checkpoint's recompute or a direct layer call, computes its own).

    Returns the indices of the members whose cores the backward releases: those with a tensor computed
    from trainable parameters. Any other core (nothing trainable in it, or a core that is a parameter
    itself, where a hook would outlive every backward) is released after the forward instead. The hook
    holds the layers and cores by weak reference only: it lives in the batched tensor's C++ hook table,
    which Python's cycle collector cannot see, so a strong reference there (tensor -> hook -> core ->
    tensor, and -> layer) kept every model that had trained alive."""
    batched: dict[int, Tensor] = {}
    released: set[int] = set()
    for i, core in enumerate(cores):
        t = next((t for t in core if t.requires_grad and not t.is_leaf), None)
        if t is not None:
            t = t._base if t._base is not None else t  # the batched tensor the per-layer slices are views of
            batched.setdefault(id(t), t)
            released.add(i)
    if not batched:
        return released
    owners = [(weakref.ref(layer), name, weakref.ref(cores[i][0])) for i, (layer, name, _) in enumerate(members) if i in released]

    def release(*grads: Any) -> None:
        for layer_ref, name, first in owners:
            layer = layer_ref()
            for kept in () if layer is None else (layer.planned, layer.replay):
                core = kept.get(name)
                if core is not None and core[0] is first():
                    del kept[name]

    tensors = list(batched.values())
    if len(tensors) == 1:
        tensors[0].register_hook(release)
    else:
        torch.autograd.graph.register_multi_grad_hook(tensors, release, mode="all")
    return released
