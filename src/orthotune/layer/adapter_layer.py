"""The shared wrapper around a frozen layer: several named adapters, which are active, merge state.

Composition of active adapters is defined on weights: with adapters ``a_1 .. a_n`` active (in
that order) the layer computes ``f_n(... f_1(W0))`` where ``f_i`` is ``a_i``'s weight map
(``W -> W R_i`` for rotations, ``W -> W + dW_i`` for additive updates). On activations this is
``F_i(x) = a_i.forward(x, F_{i-1}, core_i)``, ``F_0(x) = W0 x``: for rotations ``W0 R_1 R_2 ... R_n x``,
so the rotation of the last active adapter touches ``x`` first. Merging folds them in the same
order, so merged and unmerged outputs agree.

Each adapter's core (the per-step tensors its forward needs) comes from the model's plan
(:mod:`orthotune.layer.plan`), which leaves it in :attr:`AdapterLayer.planned` for the forward that
computed it; without one (a direct layer call, an FSDP shard, a recompute after the plan ended)
the layer asks the method for ``core()``: the same values. A layer running eagerly with autograd keeps the
planned core it ran with in :attr:`AdapterLayer.replay`, for an activation checkpoint's recompute in the backward
after a compiled plan ended (a checkpoint dynamo could not trace runs eagerly), which must save the tensors the
original forward saved.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..methods.base import AdapterMethod, Base, Core, cast
from ..ops import lowrank
from . import quantized
from .merge_precision import in_float64, merge_dtype
from .mixed import BASE, MixedBatch, grouped
from .offload import offload_hook, onloaded, write_back


#: torch convolutions: the weight is a (C_out, C_in/groups * prod(kernel)) matrix, rows acting on their group's patch.
CONV_KINDS = {nn.Conv1d: "torch_conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}
#: Kinds whose forward applies the merged weight (their input is not a feature vector the methods can map).
MERGED_KINDS = (*CONV_KINDS.values(), "embedding")


def _in_backward() -> bool:
    """Whether this runs inside a backward pass (e.g. an activation checkpoint's recompute): the autograd
    engine has a current graph task only then."""
    return torch._C._current_graph_task_id() != -1


def layer_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d' (transformers' transposed GPT-2 Conv1D), 'torch_conv1d' / 'conv2d' / 'conv3d'
    (nn.Conv1d/2d/3d), 'embedding' (nn.Embedding), or None if unsupported."""
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return next((kind for cls, kind in CONV_KINDS.items() if isinstance(module, cls)), None)


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a supported layer: a convolution's input side is its flattened patch
    (C_in/groups * prod(kernel)); an embedding's is its embedding dimension (rotations turn e = W[i]
    into e R), its output side the vocabulary."""
    if quantized.is_quantized(module):
        return quantized.dims(module)
    kind = layer_kind(module)
    w = module.weight
    if kind in ("linear", "embedding"):
        return w.shape[1], w.shape[0]
    if kind == "conv1d":
        return w.shape[0], w.shape[1]
    if kind in CONV_KINDS.values():
        return w[0].numel(), w.shape[0]
    raise TypeError(f"unsupported layer type {type(module).__name__}")


def base_weight_matrix(module: nn.Module) -> Tensor:
    """A supported layer's weight as a (d_out, d_in) matrix (a view where possible, base dtype;
    a quantised layer's is dequantised, a new tensor)."""
    if quantized.is_quantized(module):
        return quantized.dequantize(module)
    d_in, d_out = layer_dims(module)
    w = module.weight
    return (w.T if layer_kind(module) == "conv1d" else w).reshape(d_out, d_in)


class AdapterLayer(nn.Module):
    """A frozen ``nn.Linear`` / GPT-2 ``Conv1D`` / ``nn.Conv1d/2d/3d`` / ``nn.Embedding`` with named adapters."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        kind = layer_kind(base_layer)
        if kind is None:
            raise TypeError(
                f"cannot adapt {type(base_layer).__name__}: supported are nn.Linear, Conv1D, nn.Conv1d/2d/3d and nn.Embedding"
            )
        self.base_layer = base_layer
        self.kind = kind
        self.d_in, self.d_out = layer_dims(base_layer)
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.mixed: MixedBatch | None = None  # set for the duration of a mixed-adapter forward (layer/mixed.py)
        #: adapter name -> its core, set by the model's plan for the forward (and backward) that computed it
        self.planned: dict[str, Core] = {}
        #: adapter name -> the planned core of this layer's last eager forward with autograd, read only inside a
        #: backward: by an activation checkpoint's recompute after a compiled plan ended (see the module docstring)
        self.replay: dict[str, Core] = {}
        #: adapter name -> (U, weight key, W0 U): the inference fold, valid while U and the base weight are unchanged
        self.folds: dict[str, tuple[Tensor, tuple[int, int, torch.dtype], Tensor]] = {}
        #: adapter name -> (core, W0 U or None): inference cores computed outside any graph, which compiled
        #: no-grad forwards in eval mode read as inputs (:meth:`orthotune.layer.plan.Plan.freeze`)
        self.frozen: dict[str, tuple[Core, Tensor | None]] = {}
        #: the adapter whose principal part the base weight lacks (PiSSA residual_base, layer/residual.py), or None
        self.residual: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles carry no per-step cores (a training core is part of an autograd graph)."""
        state = dict(self.__dict__)
        state["planned"], state["replay"], state["folds"], state["frozen"] = {}, {}, {}, {}
        return state

    # Attributes that transformers and user code read off a linear layer.
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.d_in

    @property
    def out_features(self) -> int:
        return self.d_out

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the base layer computes in (a quantised layer's float dtype, not its storage's)."""
        if quantized.is_quantized(self.base_layer):
            return quantized.compute_dtype(self.base_layer)
        return self.base_layer.weight.dtype

    def core_dtype_of(self, name: str) -> torch.dtype:
        """The dtype adapter ``name``'s core is made in on this layer: its method's choice for the layer's compute
        dtype on its frozen base (a spectral update on a 4-bit base: that base's matmul dtype)."""
        return self.adapters[name].core_dtype(self.compute_dtype, FrozenBase(self, name))

    def __getattr__(self, name: str) -> Any:
        """Other attributes of the wrapped layer (an embedding's num_embeddings, a conv's stride), as peft's layers do."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def weight_matrix(self) -> Tensor:
        """The base weight as a (d_out, d_in) matrix (a view, in the base dtype)."""
        return base_weight_matrix(self.base_layer)

    @torch.no_grad()
    def _write_weight(self, W: Tensor) -> None:
        """Round a float (d_out, d_in) matrix once into the base weight, in place (re-quantising a quantised one)."""
        if quantized.is_quantized(self.base_layer):
            return quantized.requantize(self.base_layer, W)
        w = self.base_layer.weight
        if self.kind == "conv1d":
            W = W.T
        w.copy_(W.reshape(w.shape).to(w.dtype))
        if offload_hook(self.base_layer) is not None:  # accelerate offloads it: store it where accelerate reads it
            write_back(self.base_layer, "weight", w)

    def forward_names(self) -> list[str]:
        """The adapters the next forward runs through (a mixed batch: every name it holds), in order."""
        if self.disabled:
            return []
        if self.mixed is not None:
            return [n for n in dict.fromkeys(self.mixed.names) if n in self.adapters]
        return [n for n in self.active_adapters if n in self.adapters and n not in self.merged_adapters]

    def _sample_adapters(self, name: str) -> list[str]:
        """What one group of a mixed batch runs through: its adapter, or nothing (base, or not adapted here)."""
        return [name] if name != BASE and name in self.adapters else []

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.mixed is not None and not self.disabled:
            return grouped(x, self.mixed, lambda name, rows: self._run(rows, self._sample_adapters(name), *args, **kwargs))
        return self._run(x, self.forward_names(), *args, **kwargs)

    def _run(self, x: Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> Tensor:
        """The layer with the named ``adapters`` composed in order on the frozen base."""
        if not adapters:
            if self.residual is not None and self.residual not in self.merged_adapters:  # W0 x = (W0 - P) x + P x
                return self._add_principal(self.base_layer(x, *args, **kwargs), x)
            return self.base_layer(x, *args, **kwargs)
        if offload_hook(self.base_layer) is not None:
            with onloaded(self.base_layer):
                return self._adapted_forward(x, adapters)
        return self._adapted_forward(x, adapters)

    def _add_principal(self, out: Tensor, x: Tensor) -> Tensor:
        """``out + s B0 A0 x`` of the residual adapter: the residual base's output made ``W0 x`` again (rank r)."""
        A0, B0, s = self.adapters[self.residual].principal()
        return lowrank.add_lowrank(out, x, A0.to(x.dtype), (s * B0).to(x.dtype))

    def _adapted_forward(self, x: Tensor, adapters: list[str]) -> Tensor:
        if self.kind in MERGED_KINDS:
            W = self.weight_matrix()
            W = W.to(torch.promote_types(W.dtype, torch.float32))  # float32 at least (float64 stays)
            for n in adapters:
                W = self.adapters[n].merged_weight(W)
            return self._apply_weight(x, W.reshape(self.base_layer.weight.shape))
        serving = torch.compiler.is_compiling() and not torch.is_grad_enabled() and not self.training
        return self._composed(x, adapters, self.frozen if serving else {})

    def _composed(self, x: Tensor, adapters: list[str], frozen: dict[str, tuple[Core, Tensor | None]]) -> Tensor:
        """The adapters composed on the frozen base, each with its ``frozen`` core if given, else the planned
        one, else its own."""
        first = frozen.get(adapters[0])
        fold = None if first is None or first[1] is None or first[1].dtype != x.dtype else first[1]
        base: Base = FrozenBase(self, adapters[0], fold)
        for n in adapters:
            method = self.adapters[n]
            core = frozen[n][0] if n in frozen else self._planned(n)
            dtype = method.core_dtype(x.dtype, base)
            core = method.core(dtype) if core is None else cast(core, dtype)
            base = _compose(method, base, core)
        out = base(x)
        bias = self.base_layer.bias
        return out if bias is None else out + bias

    def _planned(self, name: str) -> Core | None:
        """The plan's core for adapter ``name``, or None (the method computes it). Eager code with autograd keeps it
        in :attr:`replay` and an eager recompute in the backward finds it there; compiled graphs do neither (a
        fully traced checkpoint recomputes inside the graph, and a write would make every core a graph output)."""
        core = self.planned.get(name)
        if torch.compiler.is_compiling():
            return core
        if core is None:
            return self.replay.get(name) if self.replay and _in_backward() else None
        if torch.is_grad_enabled():
            self.replay[name] = core
        return core

    def _apply_weight(self, x: Tensor, w: Tensor) -> Tensor:
        """The base layer's own computation with weight ``w`` (convolutions, embeddings)."""
        base = self.base_layer
        if self.kind == "embedding":  # the frozen base needs no sparse gradient; the adapters' are dense
            return F.embedding(x, w.to(base.weight.dtype), base.padding_idx, None, 2.0, base.scale_grad_by_freq)
        return base._conv_forward(x, w.to(x.dtype), base.bias)

    def frozen_matrix(self) -> Tensor | None:
        """The frozen (d_out, d_in) weight an additive update may be folded into, or None: a quantised weight
        (folding would dequantise it every step) or an offloaded one (a new tensor each call, which nothing
        keyed on it, such as :attr:`folds`, may outlive)."""
        if quantized.is_quantized(self.base_layer) or offload_hook(self.base_layer) is not None:
            return None
        return self.weight_matrix()

    @torch.no_grad()
    def freeze(self, cores: dict[str, Core]) -> None:
        """Keep ``cores`` (adapter name -> current inference core) in :attr:`frozen`, with the inference fold
        of the adapter that meets the frozen weight first, which its method asks for in a one-row forward."""
        names = self.forward_names()
        fold, W0 = None, self.frozen_matrix()
        if names and names[0] in cores and W0 is not None and not W0.is_meta:
            self.folds.pop(names[0], None)
            self._composed(W0.new_zeros(1, self.d_in, dtype=self.compute_dtype), names[:1], {names[0]: (cores[names[0]], None)})
            memo = self.folds.get(names[0])
            fold = None if memo is None else memo[2]
        self.frozen = {n: (core, fold if n == names[0] else None) for n, core in cores.items()}

    def inference_fold(self, name: str, U: Tensor, *others: Tensor) -> Tensor | None:
        """``W0 U`` for adapter ``name`` applied directly on the frozen weight, memoised in :attr:`folds`
        while ``U`` is the same tensor (the plan reuses inference cores) and the weight is unchanged; None
        under autograd or ``torch.compile`` (see :meth:`Base.fold`; compiled inference reads the fold kept
        in :attr:`frozen` instead)."""
        if torch.compiler.is_compiling() or lowrank.tracked(U, *others):  # training forwards stop here
            return None
        W0 = self.frozen_matrix()
        if W0 is None or lowrank.tracked(W0):
            return None
        key = (W0.data_ptr(), W0._version, W0.dtype)
        memo = self.folds.get(name)
        if memo is not None and memo[0] is U and memo[1] == key:
            return memo[2]
        dtype = torch.promote_types(torch.promote_types(W0.dtype, U.dtype), torch.float32)  # float32 at least
        W0U = (W0.to(dtype) @ U.to(dtype)).to(U.dtype)
        self.folds[name] = (U, key, W0U)
        return W0U

    def _base_no_bias(self, x: Tensor) -> Tensor:
        if quantized.is_quantized(self.base_layer):
            return quantized.matmul(self.base_layer, x)
        if self.kind == "conv1d":
            return x @ self.base_layer.weight
        return F.linear(x, self.base_layer.weight)

    @torch.no_grad()
    def merged_matrix(self, names: list[str]) -> Tensor:
        """The weight after folding ``names`` (in order) into the current weight, in float64 on the activation
        path (see :mod:`~orthotune.layer.merge_precision`); nothing written."""
        with onloaded(self.base_layer):
            W = self.weight_matrix()
            W = W.to(self._merge_dtype(W))
            for n in names:
                with self._merge_precision(self.adapters[n]):
                    W = self.adapters[n].merged_weight(W)
        return W

    def _merge_dtype(self, W: Tensor) -> torch.dtype:
        """float64 where the forward runs on activations; the forward's own dtype (float32 at least) where it
        applies the merged weight (convolutions, embeddings), so that merging writes exactly what it computes."""
        return torch.promote_types(W.dtype, torch.float32) if self.kind in MERGED_KINDS else merge_dtype(W)

    def _merge_precision(self, adapter: AdapterMethod) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.kind in MERGED_KINDS else in_float64(adapter)

    @torch.no_grad()
    def merge(self, names: list[str]) -> None:
        """Fold adapters into the base weight (float64 on the activation path), rounding once to the base dtype."""
        names = [n for n in names if n in self.adapters and n not in self.merged_adapters]
        if names:
            with onloaded(self.base_layer):
                self._write_weight(self.merged_matrix(names))
            self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge, last merged first."""
        if not self.merged_adapters:
            return
        with onloaded(self.base_layer):
            W = self.weight_matrix()
            W = W.to(self._merge_dtype(W))
            for n in reversed(self.merged_adapters):
                with self._merge_precision(self.adapters[n]):
                    W = self.adapters[n].unmerged_weight(W)
            self._write_weight(W)
        self.merged_adapters = []

    def extra_repr(self) -> str:
        return f"kind={self.kind}, active={self.active_adapters}, merged={self.merged_adapters}"


class FrozenBase(Base):
    """The layer's own frozen map without bias, as the first adapter ``name`` sees it: its weight and its fold."""

    def __init__(self, layer: AdapterLayer, name: str, frozen_fold: Tensor | None = None) -> None:
        self.layer = layer
        self.name = name
        self.frozen_fold = frozen_fold  # W0 U of the frozen core the adapter runs with (compiled inference)

    def __call__(self, x: Tensor) -> Tensor:
        return self.layer._base_no_bias(x)

    @property
    def weight(self) -> Tensor | None:  # type: ignore[override]
        return self.layer.frozen_matrix()

    @property
    def matmul_dtype(self) -> torch.dtype | None:  # type: ignore[override]
        base = self.layer.base_layer
        return quantized.matmul_dtype(base) if quantized.is_quantized(base) else None

    def fold(self, U: Tensor, *others: Tensor) -> Tensor | None:
        if self.frozen_fold is not None:
            return self.frozen_fold
        return self.layer.inference_fold(self.name, U, *others)


def _compose(adapter: AdapterMethod, inner: Base, core: Core) -> Base:
    return Base(lambda z: adapter(z, inner, core))


class ModulesToSave(nn.Module):
    """A module trained in full for some adapters (e.g. a new classifier head): one copy per adapter."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.mixed: MixedBatch | None = None  # set for the duration of a mixed-adapter forward (layer/mixed.py)

    def add(self, name: str) -> None:
        clone = copy.deepcopy(self.original)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.copies[name] = clone

    def current(self) -> nn.Module:
        """The copy of the first active adapter that has one, else the frozen original."""
        if not self.disabled:
            for n in self.active_adapters:
                if n in self.copies:
                    return self.copies[n]
        return self.original

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.mixed is not None and not self.disabled:
            if not args or not isinstance(args[0], Tensor):
                raise TypeError("a mixed-adapter batch needs the saved module's input as its first positional argument")
            return grouped(args[0], self.mixed, lambda name, rows: self._copy(name)(rows, *args[1:], **kwargs))
        return self.current()(*args, **kwargs)

    def _copy(self, name: str) -> nn.Module:
        """The copy that one group of a mixed batch runs through (the original for the base or no copy)."""
        return self.copies[name] if name != BASE and name in self.copies else self.original
