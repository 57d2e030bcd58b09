"""``OrthoModel``: a model with orthotune adapters and peft's ``PeftModel`` API, peft's folders included.

:class:`~orthotune.model.adapter_model.AdapterModel` knows orthotune's own adapter folders; the peft names that need
peft's format live here: ``from_pretrained`` and ``load_adapter`` read orthotune's or peft's folders
(or a Hub repo id), ``export_peft`` writes peft's, ``get_layer_status`` / ``get_model_status`` give
peft's records. :func:`ortho_class` makes, per base class, the subclass users get.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..methods.config import AdapterConfig
from ..model.adapter_model import AdapterModel
from ..model.hub import is_peft_folder, resolve_folder
from ..model.io import read_adapter
from .peft import export_peft, read_peft
from .peft_api import get_layer_status, get_model_status


class OrthoModel(AdapterModel):
    """A model with orthotune adapters and peft's API; build it with :func:`orthotune.get_model`."""

    def __reduce_ex__(self, protocol: int) -> Any:
        # Instances may be of a per-architecture subclass made at run time: rebuild it by name.
        return (_new_instance, (type(self.base_model),), self.__dict__.copy())

    def get_layer_status(self) -> list[Any]:
        """peft's per-layer status records (:func:`orthotune.interop.peft_api.get_layer_status`)."""
        return get_layer_status(self)

    def get_model_status(self) -> Any:
        """peft's model status record (:func:`orthotune.interop.peft_api.get_model_status`)."""
        return get_model_status(self)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: AdapterConfig | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> OrthoModel:
        """peft's ``PeftModel.from_pretrained``: ``model`` with the adapter in ``model_id`` (a folder or Hub repo id).

        Reads orthotune's and peft's folders. ``is_trainable=False`` (peft's default) loads the adapter
        for inference: frozen, model in eval mode. ``subfolder``, ``revision``, ``cache_dir``, ``token``
        reach the Hub download. ``low_cpu_mem_usage=True`` creates the adapter's parameters on the meta
        device and assigns the loaded tensors (no initialisation, no second copy; :mod:`orthotune.model.meta_init`).
        """
        if not autocast_adapter_dtype:
            raise ValueError("autocast_adapter_dtype is a property of the saved adapter (its config): it cannot be changed on load")
        read = _reader(model_id, kwargs, low_cpu_mem_usage)
        if config is not None:  # peft: the config object to use instead of the folder's; here it must describe it
            read = _with_config(read, config, model_id)
        loaded = attach_loaded(model, adapter_name, read)
        loaded._set_trainable(adapter_name, is_trainable)
        return loaded

    def load_adapter(
        self,
        model_id: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> None:
        """Load a saved adapter (orthotune's or peft's folder, or a Hub repo id) under ``adapter_name``, not activated.

        As in peft, ``is_trainable=False`` keeps it frozen (inference only) and puts the model in eval
        mode. The model is untouched on error. ``low_cpu_mem_usage`` as in :meth:`from_pretrained`.
        """
        self._check_new_name(adapter_name)
        self._attach_loaded(adapter_name, *_reader(model_id, kwargs, low_cpu_mem_usage)(self.base_model))
        self._set_trainable(adapter_name, is_trainable)

    def _set_trainable(self, adapter_name: str, is_trainable: bool) -> None:
        """Mark an adapter trainable or inference-only (frozen even when active; model in eval mode)."""
        if is_trainable:
            self._inference_only.discard(adapter_name)
        else:
            self._inference_only.add(adapter_name)
            self.eval()
        self._refresh_trainable()

    def export_peft(self, directory: str | Path, adapter_name: str | None = None) -> None:
        """Write one adapter in peft's format (see :mod:`orthotune.interop.peft`), for peft, vLLM and others."""
        export_peft(self, directory, adapter_name or self.active_adapter)


def _reader(
    model_id: str | Path, hub_kwargs: dict[str, Any], low_cpu_mem_usage: bool = False
) -> Callable[[nn.Module], tuple[AdapterConfig, dict, dict]]:
    """``read(base)`` for an orthotune or peft adapter folder, or a Hub repo id (downloaded first)."""
    allowed = {"subfolder", "revision", "cache_dir", "token", "local_files_only"}
    unknown = sorted(set(hub_kwargs) - allowed)
    if unknown:
        raise ValueError(f"unknown arguments {unknown}; loading accepts {sorted(allowed)} besides its named ones")
    folder = resolve_folder(model_id, **hub_kwargs)
    read = read_peft if is_peft_folder(folder) else read_adapter
    return lambda base: read(base, folder, low_cpu_mem_usage)


def _with_config(read: Callable[[nn.Module], tuple[AdapterConfig, dict, dict]], config: AdapterConfig, source: Any):
    """``read`` returning ``config`` in place of the folder's, refused unless both describe the same adapter."""

    def read_with(base: nn.Module) -> tuple[AdapterConfig, dict, dict]:
        saved, modules, states = read(base)
        ours, theirs = config.to_dict(), saved.to_dict()
        differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        if differ:
            raise ValueError(
                f"config= differs from the adapter saved in {source} in {differ}: the weights there were trained with "
                "the saved config; leave config= out to use it"
            )
        return config, modules, states

    return read_with


def attach_loaded(
    model: nn.Module, adapter_name: str, read: Callable[[nn.Module], tuple[AdapterConfig, dict, dict]]
) -> OrthoModel:
    """Read an adapter for ``model`` (plain or with adapters) with ``read(base)``, attach and activate it.

    ``read`` validates everything and touches nothing, so a failure leaves ``model`` as it was.
    """
    if isinstance(model, AdapterModel):
        model._check_new_name(adapter_name)
        loaded, wrapped = read(model.base_model), model
    else:
        cls = ortho_class(type(model))  # refuses a non-Module before anything is read
        loaded = read(model)
        wrapped = cls(model)
    wrapped._attach_loaded(adapter_name, *loaded)
    wrapped.set_adapter(adapter_name)
    return wrapped


_CLASSES: dict[type, type] = {}
_CLASSES_LOCK = threading.Lock()  # one class per base class, also when models are wrapped in threads


def ortho_class(base_cls: type) -> type:
    """A subclass of OrthoModel whose ``forward`` shows ``base_cls.forward``'s signature.

    transformers' Trainer reads argument names (``labels``, dataset columns) off
    ``inspect.signature(model.forward)``; this keeps that working through the wrapper.
    """
    if not (isinstance(base_cls, type) and issubclass(base_cls, nn.Module)):
        raise ValueError(f"model must be a torch.nn.Module, got {getattr(base_cls, '__name__', base_cls)}")
    with _CLASSES_LOCK:
        if base_cls not in _CLASSES:

            def forward(self: OrthoModel, *args: Any, **kwargs: Any) -> Any:
                return OrthoModel.forward(self, *args, **kwargs)

            forward.__wrapped__ = base_cls.forward  # type: ignore[attr-defined]
            forward.__doc__ = base_cls.forward.__doc__
            _CLASSES[base_cls] = type(f"Ortho{base_cls.__name__}", (OrthoModel,), {"forward": forward, "__module__": __name__})
        return _CLASSES[base_cls]


def _new_instance(base_cls: type) -> OrthoModel:
    cls = ortho_class(base_cls)
    return cls.__new__(cls)
