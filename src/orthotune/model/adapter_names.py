"""peft's ``adapter_names`` on an AdapterModel's forward and ``generate``: checked, then every adapter layer and
saved module runs each sample through its own adapter (:mod:`orthotune.layer.mixed`) for the duration of the call."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..layer.mixed import BASE, MixedBatch

if TYPE_CHECKING:
    from .adapter_model import AdapterModel


def check_names(model: AdapterModel, adapter_names: Any) -> list[str]:
    """peft's checks: a list of known names (or ``"__base__"``), an eval-mode and unmerged model."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not adapter_names:
        raise TypeError(f"adapter_names must be a non-empty list of adapter names (one per sample), got {adapter_names!r}")
    names = list(adapter_names)
    unknown = sorted({n for n in names if n != BASE and n not in model.configs}, key=str)
    if unknown:
        raise ValueError(
            f"Trying to infer with non-existing adapter(s): {unknown}; adapters here: {sorted(model.configs)} "
            f"(or {BASE!r} for the base model)"
        )
    if model.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode: call model.eval() first")
    if model.merged:
        raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call `unmerge()` first")
    return names


@contextlib.contextmanager
def mixed_batch(model: AdapterModel, adapter_names: Any, generating: bool = False) -> Iterator[None]:
    """Inside the block every adapter layer of ``model`` runs each sample through its own adapter."""
    if adapter_names is None:
        yield
        return
    batch = MixedBatch(check_names(model, adapter_names), generating)
    wrappers = [m for _, m in model._wrappers()]
    for m in wrappers:
        m.mixed = batch
    try:
        yield
    finally:
        for m in wrappers:
            m.mixed = None


def call(model: AdapterModel, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], generating: bool = False) -> Any:
    """``fn(*args, **kwargs)`` with peft's ``adapter_names`` keyword taken out and applied per sample."""
    adapter_names = kwargs.pop("adapter_names", None)
    with mixed_batch(model, adapter_names, generating):
        return fn(*args, **kwargs)
