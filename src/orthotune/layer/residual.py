"""A residual base (PiSSA's ``residual_base``, peft's form): one adapter's principal part lives in the frozen weight.

An adapter whose method has ``residual = True`` declares a low-rank principal part ``P = s B0 A0`` by
``principal()`` (``(A0, B0, s)``). On attaching it, :func:`subtract` rewrites the layer's weight once to ``W0 - P``
(computed in float64, rounded once to the base dtype) and records the adapter in
:attr:`~orthotune.layer.adapter_layer.AdapterLayer.residual`; the adapter then runs plain LoRA on it.
While the adapter is not applied (disabled, inactive, a mixed batch's base rows) the layer adds ``P x``
back (``AdapterLayer._add_principal``), so it computes ``W0 x`` to the rounding of the stored residual;
:func:`restore` writes ``W0`` back (unload, delete). A layer with a residual base carries that adapter only: the base another adapter
composes on would be the residual, which is neither model, so :func:`check` refuses the combination.
``A0, B0`` are the method's saved buffers, so they define ``P``; :func:`kept` rebases the weight when a
load replaces them in place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from . import quantized
from .adapter_layer import AdapterLayer, layer_kind
from .merge_precision import merge_dtype
from .offload import onloaded


def is_residual(method: nn.Module) -> bool:
    """Whether ``method`` keeps its principal part in the base weight."""
    return bool(getattr(method, "residual", False))


def check(module: nn.Module, method: nn.Module, layer_name: str, adapter_name: str) -> None:
    """Raise ValueError (naming the fix) if ``method`` cannot be attached as ``adapter_name`` to the module now
    at ``layer_name`` (a plain layer or an AdapterLayer) because of a residual base, its own or one there."""
    held = [n for n in module.adapters if n != adapter_name] if isinstance(module, AdapterLayer) else []
    there = module.residual if isinstance(module, AdapterLayer) else None
    if there is not None and held:
        raise ValueError(
            f"{layer_name!r} holds adapter {there!r} with residual_base=True, whose base weight is rewritten to "
            f"W0 - s B0 A0: no other adapter can be added to that layer. Use residual_base=False for {there!r} "
            f"(the default form keeps W0), or exclude {layer_name!r} from adapter {adapter_name!r}"
        )
    if not is_residual(method):
        return
    if held:
        raise ValueError(
            f"adapter {adapter_name!r} has residual_base=True, which rewrites the base weight of {layer_name!r}, but "
            f"that layer already carries adapters {held}: use residual_base=False (the default form keeps W0), or "
            "exclude the layer"
        )
    base = module.base_layer if isinstance(module, AdapterLayer) else module
    if quantized.is_quantized(base) or layer_kind(base) not in ("linear", "conv1d"):
        raise ValueError(
            f"residual_base=True rewrites the frozen weight of {layer_name!r}, a {type(base).__name__}: supported for "
            "nn.Linear and GPT-2 Conv1D with float weights only; use residual_base=False there"
        )


@torch.no_grad()
def subtract(layer: AdapterLayer, name: str) -> None:
    """Rewrite the layer's weight to ``W0 - P`` of adapter ``name`` (attached already) and record it."""
    _shift(layer, None, layer.adapters[name].principal())
    layer.residual = name


@torch.no_grad()
def restore(layer: AdapterLayer) -> None:
    """Write ``W0`` back (``W0 - P + P``, one rounding) and forget the residual; nothing when the residual adapter is
    merged (the merged weight ``W0 - P + s B A`` is then the model)."""
    name = layer.residual
    if name is None or name in layer.merged_adapters:
        return
    _shift(layer, layer.adapters[name].principal(), None)
    layer.residual = None


@contextlib.contextmanager
def kept(layers: list[AdapterLayer], name: str) -> Iterator[None]:
    """Around a load that may replace adapter ``name``'s ``A0, B0`` in place: the layers whose residual it is get
    their weight moved from the old principal part to the new one (one rounding; untouched if it is unchanged)."""
    mine = [layer for layer in layers if layer.residual == name]
    before = [layer.adapters[name].principal() for layer in mine]
    before = [(A0.detach().clone(), B0.detach().clone(), s) for A0, B0, s in before]
    yield
    for layer, old in zip(mine, before):
        new = layer.adapters[name].principal()
        if not (torch.equal(old[0], new[0]) and torch.equal(old[1], new[1]) and old[2] == new[2]):
            with torch.no_grad():
                _shift(layer, old, new)


Principal = tuple[Tensor, Tensor, float]


def _shift(layer: AdapterLayer, add: Principal | None, sub: Principal | None) -> None:
    """``W <- W + P(add) - P(sub)`` (``P = s B0 A0``) in float64 (float32 on MPS), rounded once into the weight."""
    with onloaded(layer.base_layer):
        W = layer.weight_matrix()
        dtype = merge_dtype(W)
        W = W.to(dtype)
        for factors, sign in ((add, 1.0), (sub, -1.0)):
            if factors is not None:
                A0, B0, s = factors
                W = torch.addmm(W, B0.detach().to(W.device, dtype), A0.detach().to(W.device, dtype), alpha=sign * s)
        layer._write_weight(W)
