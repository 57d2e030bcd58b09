"""``OrthoModel``: a model with named adapters, and everything users do with them.

It wraps the user's model like peft's ``PeftModel``: attribute access, ``forward`` and
``generate`` pass through to the wrapped model, whose targeted layers carry
:class:`~orthotune.layer.AdapterLayer` wrappers. Every operation validates before it mutates, so
a failed call leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import batching
from .config import AdapterConfig
from .finite import all_finite
from .inject import find_modules_to_save, find_targets, unwrap_all, wrap
from .layer import AdapterLayer, ModulesToSave, base_weight_matrix, layer_dims
from .offload import onloaded
from .registry import method_class


class OrthoModel(nn.Module):
    """A model with orthotune adapters; build it with :func:`orthotune.get_model`."""

    def __init__(self, model: nn.Module, config: AdapterConfig | None = None, adapter_name: str = "default") -> None:
        super().__init__()
        if isinstance(model, OrthoModel):
            raise ValueError("this model already carries orthotune adapters: use its add_adapter() instead")
        self.base_model = model
        self.configs: dict[str, AdapterConfig] = {}
        self._active: list[str] = []
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        if config is not None:
            try:
                self.add_adapter(adapter_name, config)
            except Exception:
                for p in trainable:  # a failed get_model leaves the user's model as it was
                    p.requires_grad_(True)
                raise
        batching.attach(model)  # per-step cores of all layers in one batched call per forward
        if config is not None:
            self.set_adapter(adapter_name)
        if _is_checkpointing(model):
            self._enable_input_require_grads()

    # ------------------------------------------------------------------ pass-through
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (still carrying adapter layers)."""
        return self.base_model

    def __reduce_ex__(self, protocol: int) -> Any:
        # Instances may be of a per-architecture subclass made at run time: rebuild it by name.
        return (_new_instance, (type(self.base_model),), self.__dict__.copy())

    # ------------------------------------------------------------------ introspection
    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """(name, layer) for every adapted layer, names relative to the wrapped model."""
        for name, module in self.base_model.named_modules():
            if isinstance(module, AdapterLayer):
                yield name, module

    def saved_modules(self) -> Iterator[tuple[str, ModulesToSave]]:
        """(name, wrapper) for every module trained in full (``modules_to_save``)."""
        for name, module in self.base_model.named_modules():
            if isinstance(module, ModulesToSave):
                yield name, module

    @property
    def active_adapters(self) -> list[str]:
        """Names of the adapters applied in forward, in composition order."""
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        """The first active adapter (peft's name for the single-adapter case)."""
        return self._active[0]

    def trainable_parameters(self) -> dict[str, Any]:
        """Exact counts: trainable, total, and trainable per adapted layer and per adapter."""
        per_layer: dict[str, int] = {}
        per_adapter: dict[str, int] = {n: 0 for n in self.configs}
        for lname, layer in self.adapter_layers():
            for aname, adapter in layer.adapters.items():
                n = sum(p.numel() for p in adapter.parameters())
                per_adapter[aname] += n
                if aname in self._active:
                    per_layer[lname] = per_layer.get(lname, 0) + n
        for mname, saved in self.saved_modules():
            for aname, clone in saved.copies.items():
                n = sum(p.numel() for p in clone.parameters())
                per_adapter[aname] += n
                if aname in self._active:
                    per_layer[mname] = per_layer.get(mname, 0) + n
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"trainable": trainable, "total": total, "per_layer": per_layer, "per_adapter": per_adapter}

    def print_trainable_parameters(self) -> None:
        """peft's one-line summary."""
        c = self.trainable_parameters()
        pct = 100.0 * c["trainable"] / max(c["total"], 1)
        print(f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || trainable%: {pct:.4f}")

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        """Add an adapter (inactive unless it is the first); nothing changes if any check fails."""
        if not isinstance(config, AdapterConfig):
            raise ValueError(f"config must be an orthotune AdapterConfig (e.g. LoCOConfig), got {type(config).__name__}")
        self._check_new_name(adapter_name)
        targets = find_targets(self.base_model, config)
        saved = find_modules_to_save(self.base_model, config.modules_to_save) if config.modules_to_save else []
        for sname, _ in saved:
            inside = [t for t, _ in targets if t.startswith(sname + ".") or t == sname]
            if inside:
                raise ValueError(
                    f"{inside[0]!r} is both a target and inside modules_to_save entry {sname!r}; "
                    "exclude it from target_modules (a saved module is trained in full)"
                )
        modules = {name: build_method(config, module, name) for name, module in targets}
        _check_finite_init(adapter_name, modules, dict(targets))
        self._attach(adapter_name, config, modules, [n for n, _ in saved])

    def _check_new_name(self, adapter_name: str) -> None:
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name or "/" in adapter_name:
            raise ValueError(f"adapter name {adapter_name!r} must be a non-empty string without '.' or '/'")
        if adapter_name in self.configs:
            raise ValueError(f"an adapter named {adapter_name!r} exists already; delete_adapter() it or pick another name")

    def _attach(self, name: str, config: AdapterConfig, modules: dict[str, nn.Module], saved: list[str]) -> None:
        """Wire built method modules (and saved-module copies) into the model under ``name``."""
        for lname, method in modules.items():
            layer = wrap(self.base_model, lname, AdapterLayer)
            layer.adapters[name] = method
            layer.active_adapters = list(self._active)
        for sname in saved:
            wrapper = wrap(self.base_model, sname, ModulesToSave)
            wrapper.add(name)
            wrapper.active_adapters = list(self._active)
        self.configs[name] = config
        self._refresh_trainable()

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Make these adapters active, in this composition order (first = innermost, see layer.py).

        Switching adapters on a merged model unmerges it first (with a warning, as peft does): merged
        weights hold the previous composition.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.configs]
        if unknown or not names:
            raise ValueError(f"unknown adapter(s) {unknown or names}; adapters here: {sorted(self.configs)}")
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names repeat in {names}")
        if names != self._active and self.merged:
            warnings.warn("Adapters cannot be switched while merged: unmerging the model first.", stacklevel=2)
            self.unmerge()
        self._active = names
        for _, module in self._wrappers():
            module.active_adapters = list(names)
        self._refresh_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; refuses (changing nothing) while it is merged."""
        if adapter_name not in self.configs:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters here: {sorted(self.configs)}")
        if any(adapter_name in layer.merged_adapters for _, layer in self.adapter_layers()):
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge() before deleting it")
        for _, layer in list(self.adapter_layers()):
            if adapter_name in layer.adapters:
                del layer.adapters[adapter_name]
        for _, saved in self.saved_modules():
            if adapter_name in saved.copies:
                del saved.copies[adapter_name]
        del self.configs[adapter_name]
        self._active = [n for n in self._active if n != adapter_name]
        for _, module in self._wrappers():
            module.active_adapters = list(self._active)
        self._refresh_trainable()

    def _wrappers(self) -> Iterator[tuple[str, AdapterLayer | ModulesToSave]]:
        yield from self.adapter_layers()
        yield from self.saved_modules()

    def _refresh_trainable(self) -> None:
        """Only the active adapters' parameters (and their saved-module copies) train."""
        for _, layer in self.adapter_layers():
            for name, adapter in layer.adapters.items():
                adapter.requires_grad_(name in self._active)
        for _, saved in self.saved_modules():
            for name, clone in saved.copies.items():
                clone.requires_grad_(name in self._active)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model computes the base outputs, merged adapters included.

        Merged adapters are unmerged on entry and merged again on exit; the previous state is
        restored also when the block raises, and blocks may nest.
        """
        merged = {name: list(layer.merged_adapters) for name, layer in self.adapter_layers()}
        self.unmerge()
        wrappers = [m for _, m in self._wrappers()]
        before = [m.disabled for m in wrappers]
        for m in wrappers:
            m.disabled = True
        try:
            yield
        finally:
            for m, state in zip(wrappers, before):
                m.disabled = state
            for name, layer in self.adapter_layers():
                layer.merge(merged.get(name, []))

    # ------------------------------------------------------------------ merging
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights, float32 then rounded once.

        Adapters are folded in the order given, after those merged already; the forward pass then
        applies the unmerged active ones on top. For multiplicative (rotation) adapters the merged
        model equals the unmerged one only if the merged adapters lead the active order: a warning
        says when they do not. ``safe_merge=True`` computes every merged weight first and raises,
        writing nothing, if any holds NaN or Inf.
        """
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        names = self._active if adapter_names is None else list(adapter_names)
        unknown = [n for n in names if n not in self.configs]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; adapters here: {sorted(self.configs)}")
        layers = list(self.adapter_layers())
        todo = [n for n in names if any(n in layer.adapters and n not in layer.merged_adapters for _, layer in layers)]
        if not todo:
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
            return
        if safe_merge:
            for lname, layer in layers:
                pending = [n for n in todo if n in layer.adapters and n not in layer.merged_adapters]
                if pending and not torch.isfinite(layer.merged_matrix(pending)).all():
                    raise ValueError(
                        f"NaNs or Infs detected in the merged weights of {lname!r} for adapter(s) {pending}; "
                        "the adapter seems to be broken. Nothing was merged."
                    )
        self._warn_if_order_changes(layers, todo)
        self._warn_if_tied([(n, layer) for n, layer in layers if any(a in layer.adapters for a in todo)])
        for _, layer in layers:
            layer.merge(todo)

    def _warn_if_tied(self, layers: list[tuple[str, AdapterLayer]]) -> None:
        """Warn (as peft does) when a merged weight is shared with another module, e.g. tied input/output embeddings."""
        owners: dict[int, list[str]] = {}
        for pname, p in self.base_model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(p), []).append(pname)
        for lname, layer in layers:
            others = [n for n in owners.get(id(layer.base_layer.weight), []) if not n.startswith(lname + ".")]
            if others:
                warnings.warn(
                    f"merging into {lname!r} also changes {others}, which share its weight (tied embeddings): the merged "
                    "model differs from the unmerged one there; untie the weights first to merge only this layer",
                    stacklevel=3,
                )

    def _warn_if_order_changes(self, layers: list[tuple[str, AdapterLayer]], todo: list[str]) -> None:
        for lname, layer in layers:
            active = [n for n in self._active if n in layer.adapters]
            folded = layer.merged_adapters + [n for n in todo if n in layer.adapters and n not in layer.merged_adapters]
            if (
                all(n in active for n in folded)
                and folded != active[: len(folded)]
                and any(layer.adapters[n].multiplicative for n in active)
            ):
                warnings.warn(
                    f"merging {folded} into {lname!r} does not follow the active order {active}: rotations do not "
                    "commute, so the merged model differs from the unmerged one; merge in the active order",
                    stacklevel=3,
                )
                return

    def unmerge(self) -> None:
        """Undo all merges (restores the base weights within float rounding)."""
        for _, layer in self.adapter_layers():
            layer.unmerge()

    @property
    def merged(self) -> bool:
        """True if any adapter is merged into any layer."""
        return any(layer.merged_adapters for _, layer in self.adapter_layers())

    def merge_and_unload(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> nn.Module:
        """Merge, then remove every wrapper: returns the plain model (saved modules keep their trained copy)."""
        if self._active or adapter_names:
            self.merge(adapter_names, safe_merge=safe_merge)
        unwrap_all(self.base_model)
        return self.base_model

    def unload(self) -> nn.Module:
        """Remove every adapter without merging: returns the original model."""
        self.unmerge()
        for _, saved in self.saved_modules():
            saved.disabled = True
        unwrap_all(self.base_model)
        return self.base_model

    # ------------------------------------------------------------------ saving and loading
    def save_adapter(self, directory: str | Path, adapter_name: str | None = None) -> None:
        """Write one adapter as ``adapter_config.json`` + ``adapter_model.safetensors``, atomically."""
        from .io import save_adapter

        save_adapter(self, directory, adapter_name or self.active_adapter)

    def save_pretrained(self, directory: str | Path) -> None:
        """peft's layout: the first active adapter in ``directory``, every other one in ``directory/<name>``."""
        first = self.active_adapter
        self.save_adapter(directory, first)
        for name in self.configs:
            if name != first:
                self.save_adapter(Path(directory) / name, name)

    def load_adapter(self, directory: str | Path, adapter_name: str = "default") -> None:
        """Load a saved adapter under ``adapter_name`` (not activated); the model is untouched on error."""
        from .io import read_adapter

        self._check_new_name(adapter_name)
        self._attach_loaded(adapter_name, *read_adapter(self.base_model, directory))

    def _attach_loaded(self, name: str, config: AdapterConfig, modules: dict[str, nn.Module], saved_states: dict[str, dict]) -> None:
        """Wire in an adapter read by :func:`orthotune.io.build_adapter` (weights loaded, saved modules' states)."""
        self._attach(name, config, modules, list(saved_states))
        with torch.no_grad():
            for sname, state in saved_states.items():
                wrapper = self.base_model.get_submodule(sname)
                wrapper.copies[name].load_state_dict(state)

    def load_adapter_weights(self, directory: str | Path, adapter_name: str | None = None) -> None:
        """Overwrite an existing adapter's weights from a folder saved with the same config (resuming).

        Tensors are copied in place, so optimizers holding the parameters stay valid; the folder
        is validated in full before anything changes.
        """
        from .io import read_adapter

        name = adapter_name or self.active_adapter
        if name not in self.configs:
            raise ValueError(f"no adapter named {name!r}; adapters here: {sorted(self.configs)}")
        if any(name in layer.merged_adapters for _, layer in self.adapter_layers()):
            raise ValueError(f"adapter {name!r} is merged; unmerge() before loading weights into it")
        config, modules, saved_states = read_adapter(self.base_model, directory)
        if config.to_dict() != self.configs[name].to_dict():
            raise ValueError(
                f"{directory} holds a different configuration than adapter {name!r}: load it as a new adapter with "
                "load_adapter(directory, new_name) instead"
            )
        layers = {lname: layer for lname, layer in self.adapter_layers() if name in layer.adapters}
        if set(modules) != set(layers):
            raise ValueError(f"{directory} adapts other modules than adapter {name!r}: load it with load_adapter() instead")
        with torch.no_grad():
            for lname, method in modules.items():
                layers[lname].adapters[name].load_state_dict(method.state_dict())
            for sname, state in saved_states.items():
                self.base_model.get_submodule(sname).copies[name].load_state_dict(state)

    def export_peft(self, directory: str | Path, adapter_name: str | None = None) -> None:
        """Write one adapter in peft's format (see :mod:`orthotune.interop.peft`), for peft, vLLM and others."""
        from .interop.peft import export_peft

        export_peft(self, directory, adapter_name or self.active_adapter)

    # ------------------------------------------------------------------ transformers integration
    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """The wrapped model's checkpointing, with its input embeddings' outputs requiring grad (as peft does).

        The base is frozen, so without that a reentrant checkpointed block gets no input that
        requires grad and the adapters inside it get no gradient.
        """
        self.base_model.activation_checkpointing_enable(*args, **kwargs)
        self._enable_input_require_grads()

    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """transformers' older name of :meth:`activation_checkpointing_enable`."""
        self.base_model.gradient_checkpointing_enable(*args, **kwargs)
        self._enable_input_require_grads()

    def _enable_input_require_grads(self) -> None:
        enable = getattr(self.base_model, "enable_input_require_grads", None)
        hooks = getattr(self.base_model, "_require_grads_hooks", None) or getattr(self.base_model, "_require_grads_hook", None)
        if enable is not None and not hooks:  # each call adds hooks: enable once
            enable()


def attach_loaded(
    model: nn.Module, adapter_name: str, read: Callable[[nn.Module], tuple[AdapterConfig, dict, dict]]
) -> OrthoModel:
    """Read an adapter for ``model`` (plain or OrthoModel) with ``read(base)``, attach and activate it.

    ``read`` validates everything and touches nothing, so a failure leaves ``model`` as it was.
    """
    if isinstance(model, OrthoModel):
        model._check_new_name(adapter_name)
        loaded, wrapped = read(model.base_model), model
    else:
        cls = ortho_class(type(model))  # refuses a non-Module before anything is read
        loaded = read(model)
        wrapped = cls(model)
    wrapped._attach_loaded(adapter_name, *loaded)
    wrapped.set_adapter(adapter_name)
    return wrapped


def _is_checkpointing(model: nn.Module) -> bool:
    """Whether a transformers model has activation checkpointing on (False for other models)."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return bool(getattr(model, attr))
    return False


@torch.no_grad()
def _check_finite_init(adapter_name: str, modules: dict[str, nn.Module], bases: dict[str, nn.Module]) -> None:
    """Refuse an adapter that starts with NaN/Inf in its tensors or its output (e.g. an init scale
    that overflows the adapter dtype): one probe row per layer, one fused check for all of them."""
    probes: dict[str, Tensor] = {}
    for lname, method in modules.items():
        with onloaded(bases[lname]):
            W = base_weight_matrix(bases[lname])
            try:
                if method.activation_path:
                    probes[lname] = method(torch.ones(1, W.shape[1], dtype=W.dtype, device=W.device), lambda z, W=W: z @ W.T)
                else:
                    probes[lname] = method.merged_weight(W.float())
            except ValueError:
                pass  # not runnable yet (a LOFT support awaiting select_supports): its first forward says why
    tensors = [t for m in modules.values() for t in m.state_dict().values() if t.dtype.is_floating_point]
    if all_finite(tensors + list(probes.values())):
        return
    for lname, method in modules.items():
        named = [(repr(k), t) for k, t in method.state_dict().items() if t.dtype.is_floating_point]
        named += [("its output", probes[lname])] if lname in probes else []
        bad = next((k for k, t in named if not bool(torch.isfinite(t).all())), None)
        if bad is not None:
            raise ValueError(
                f"adapter {adapter_name!r} would start with NaN or Inf in {bad} on layer {lname!r}: the config's scales "
                "or init are too large for this layer or the adapter dtype; lower them. Nothing was added"
            )


def build_method(config: AdapterConfig, module: nn.Module, name: str) -> nn.Module:
    """A method module for the base layer called ``name`` (its pattern overrides applied), on its device,
    adapter dtype from the config."""
    d_in, d_out = layer_dims(module)
    with onloaded(module):  # an offloaded layer's adapter is created where accelerate computes the layer
        return method_class(config)(config.for_layer(name), d_in, d_out, base_weight_matrix(module).detach())


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
                return self.base_model(*args, **kwargs)

            forward.__wrapped__ = base_cls.forward  # type: ignore[attr-defined]
            forward.__doc__ = base_cls.forward.__doc__
            _CLASSES[base_cls] = type(f"Ortho{base_cls.__name__}", (OrthoModel,), {"forward": forward, "__module__": __name__})
        return _CLASSES[base_cls]


def _new_instance(base_cls: type) -> OrthoModel:
    cls = ortho_class(base_cls)
    return cls.__new__(cls)
