"""What a method is: one adapter on one frozen weight, its parameters and its math, nothing else.

The shared wrapper (:mod:`orthotune.layer.adapter_layer`) owns adapter names, activity, merge state, dtypes and
devices; the model's per-step plan (:mod:`orthotune.layer.plan`) computes the cores. A method answers:

* ``cores(modules, dtype)`` (classmethod): its **core**, the per-step tensors its forward needs
  (LoCO's ``(U, M V^T)``, LoRA's ``(A, s B)``, OFT's Cayley blocks), for many layers in batched
  calls; ``core()`` is the same for one layer, so a layer alone runs the same code.
  ``core_key()``: layers whose methods have equal class, key and compute dtype share one call
  (None: per layer).
* ``core_dtype(dtype, base)``: the dtype the layer hands it its core in (the activations' by default).
* ``forward(x, base, core)``: the adapted layer on activations, pure math on its arguments:
  ``base`` (:class:`Base`) is the frozen layer or the previously composed adapters, without bias.
  Rotations call ``base(R x)``; additive methods return ``base(x) + delta(x)``.
* ``merged_weight(W)`` / ``unmerged_weight(W)``: the weight map ``W -> W'`` (float32, W of shape
  (d_out, d_in)) and its inverse, so that ``forward(x, Base(lambda z: z @ W.T), core()) == x @ merged_weight(W).T``.
* identity at init (``init_identity=True``) and a perturbed start otherwise.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from .config import AdapterConfig

#: The per-step tensors one layer's forward needs, computed from its parameters (see the module docstring).
Core = tuple[Tensor, ...]


class Base:
    """What a method composes onto: callable ``base(x)`` (the frozen map or the adapters composed so far).

    ``weight`` is the frozen (d_out, d_in) weight when ``base`` is the layer's own plain frozen map
    (so an additive update may be folded into it), else None; :meth:`fold` is the layer's memoised
    ``W0 U`` for inference (None where it does not apply). ``matmul_dtype`` is the dtype the frozen
    matmul itself computes in where that is below the activations' (a quantised layer's compute dtype),
    else None: an update as costly as that matmul may run at its precision. A plain ``Base(fn)`` has none.
    """

    weight: Tensor | None = None
    matmul_dtype: torch.dtype | None = None

    def __init__(self, fn: Callable[[Tensor], Tensor], matmul_dtype: torch.dtype | None = None) -> None:
        self.fn = fn
        self.matmul_dtype = matmul_dtype

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def computes_in(self, dtype: torch.dtype, x: Tensor) -> bool:
        """Whether the frozen matmul computes in ``dtype``, not ``x``'s (a quantised layer's compute dtype): it then
        takes ``x`` cast to ``dtype`` as it is, the one cast it would make itself."""
        return dtype != x.dtype and self.matmul_dtype == dtype

    def fold(self, U: Tensor, *others: Tensor) -> Tensor | None:
        """``W0 U`` for serving ``base(x R^T)``, ``R = I + U (M V^T)``, as ``base(x) + (x (M V^T)^T) (W0 U)^T``;
        None under autograd (``U`` or ``others`` tracked) or when ``base`` is not a plain frozen weight."""
        return None


def in_matmul_dtype(x: Tensor, dtype: torch.dtype, base: Base, run: Callable[[Tensor], Tensor]) -> Tensor:
    """``run(x)`` for what runs in front of ``base``'s matmul (a rotation): where that matmul computes in ``dtype``
    (:meth:`Base.computes_in`), on ``x`` cast to ``dtype`` once and with the output cast back, as bitsandbytes'
    own forward casts them."""
    if base.computes_in(dtype, x):
        return run(x.to(dtype)).to(x.dtype)
    return run(x)


class AdapterMethod(nn.Module):
    """Base class of every method module; subclasses implement the three answers above."""

    config_class: ClassVar[type[AdapterConfig]]
    #: True for methods whose weight map is multiplicative (rotations, scales): unmerging inverts it. A class
    #: default: an instance whose config makes its update additive sets False (PSOFT's psoft_svd="lowrank").
    multiplicative: bool = False

    def __init__(self, config: AdapterConfig, d_in: int, d_out: int, weight: Tensor) -> None:
        super().__init__()
        self.config = config
        self.d_in = d_in
        self.d_out = d_out

    @classmethod
    def check_layer(cls, config: AdapterConfig, d_in: int, d_out: int, name: str) -> None:
        """Raise ValueError if ``config`` cannot adapt a (d_out x d_in) layer called ``name``."""

    def core_key(self) -> Hashable | None:
        """Methods of one class, key and compute dtype get their cores in one batched call; None: per layer."""
        return None

    @classmethod
    def cores(cls, modules: list[AdapterMethod], dtype: torch.dtype | None = None) -> list[Core]:  # pragma: no cover - abstract
        """The cores of ``modules`` (one class, one :meth:`core_key`) in batched calls, floating tensors cast
        once to ``dtype`` (None: as computed); gradients flow through them to every module's parameters."""
        raise NotImplementedError

    def core_dtype(self, dtype: torch.dtype, base: Base) -> torch.dtype:
        """The dtype this layer's core is made in for activations of ``dtype`` on ``base``: ``dtype`` (a method
        whose forward runs at another precision, e.g. a quantised base's matmul, says so here)."""
        return dtype

    @staticmethod
    def matmul_core_dtype(dtype: torch.dtype, base: Base) -> torch.dtype:
        """For :meth:`core_dtype`: the frozen matmul's compute dtype where it is below ``dtype`` (a quantised base's
        bf16/fp16 under float32 activations), else ``dtype``."""
        low = base.matmul_dtype
        return low if low is not None and low.itemsize < dtype.itemsize else dtype

    def core(self, dtype: torch.dtype | None = None) -> Core:
        """This layer's core: :meth:`cores` of one module, the same code path as a batched plan."""
        return compute_cores(type(self), [self], dtype)[0]

    @property
    def ready(self) -> bool:
        """Whether :meth:`core` can run now (False while data-driven state is still to be set, e.g. a LOFT support)."""
        return True

    def forward(self, x: Tensor, base: Base, core: Core) -> Tensor:  # pragma: no cover - abstract
        """The adapted layer on ``x`` from ``base`` and this step's ``core``."""
        raise NotImplementedError

    def merged_weight(self, W: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def unmerged_weight(self, W: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def diagnostics(self) -> dict[str, Any]:
        """Per-layer numbers for `inspect` (orthogonality error, angles); empty by default."""
        return {}

    def rotation(self) -> Tensor | None:
        """The dense input-side rotation R (d_in x d_in) for orthogonal methods, else None (tests, inspect)."""
        return None

    def _param_like(self, *shape: int, weight: Tensor) -> Tensor:
        """An empty float tensor on the base weight's device, in the adapter dtype."""
        dtype = torch.float32 if self.config.autocast_adapter_dtype else weight.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        return torch.empty(*shape, dtype=dtype, device=weight.device)


#: Device kinds whose autocast state :func:`compute_cores` checks (``torch.is_autocast_enabled`` refuses others, e.g. meta).
_AUTOCAST_KINDS = ("cuda", "cpu", "xpu", "mps", "hpu")


def compute_cores(cls: type[AdapterMethod], modules: list[AdapterMethod], dtype: torch.dtype | None = None) -> list[Core]:
    """``cls.cores(modules, dtype)`` at the parameters' precision even under ``torch.autocast``, then cast to ``dtype``.

    Autocast would run a core's small matmuls in bf16/fp16 (LoCO's orthogonality error 3e-8 -> 7e-4 in bf16); a
    core is computed once per step and cast once, so the activations' matmuls still run at autocast's precision.
    """
    param = next(modules[0].parameters(), None)
    kind = None if param is None else param.device.type
    # Only the device kinds autocast knows (a meta-device adapter has none); a plain test, which dynamo traces.
    if kind in _AUTOCAST_KINDS and torch.is_autocast_enabled(kind):
        with torch.autocast(kind, enabled=False):
            return cls.cores(modules, dtype)
    return cls.cores(modules, dtype)


def cast(core: Core, dtype: torch.dtype | None) -> Core:
    """``core`` with its floating tensors in ``dtype`` (None: unchanged)."""
    if dtype is None:
        return core
    return tuple(t if t.dtype == dtype or not t.is_floating_point() else t.to(dtype) for t in core)


def split(stacked: Core, dtype: torch.dtype | None = None) -> list[Core]:
    """Per-layer cores from tensors stacked along a new first dimension, cast once to ``dtype`` first."""
    return list(zip(*(t.unbind(0) for t in cast(stacked, dtype))))


def each(modules: list[AdapterMethod], dtype: torch.dtype | None, core: Callable[[Any], Core]) -> list[Core]:
    """:meth:`AdapterMethod.cores` of methods without a batched form: ``core(module)`` per module, cast."""
    return [cast(core(m), dtype) for m in modules]


def cast_to(x: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Cast small adapter tensors to the activations' dtype (activation-sized work runs in x's dtype)."""
    return tuple(t if t.dtype == x.dtype else t.to(x.dtype) for t in tensors)
