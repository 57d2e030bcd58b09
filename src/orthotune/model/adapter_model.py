"""``AdapterModel``: a model with named adapters, and everything users do with them in orthotune's own format.

It wraps the user's model like peft's ``PeftModel``: attribute access, ``forward`` and
``generate`` pass through to the wrapped model, whose targeted layers carry
:class:`~orthotune.layer.adapter_layer.AdapterLayer` wrappers. Every operation validates before it mutates, so
a failed call leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..layer import quantized, residual
from ..layer.adapter_layer import AdapterLayer, ModulesToSave, base_weight_matrix
from ..layer.offload import onloaded
from ..layer.plan import Plan
from ..methods.base import Base
from ..methods.config import AdapterConfig
from ..methods.task_type import saved_patterns
from ..ops.finite import all_finite
from .adapter_names import call as call_with_adapter_names
from .combine import add_weighted_adapter
from .hub import push_adapters, write_model_card
from .inject import build_method, find_modules_to_save, find_targets, unwrap_all, wrap
from .io import adapter_state_in, read_adapter, save_adapter
from .meta_init import build_on_meta


class AdapterModel(nn.Module):
    """A model with named orthotune adapters; :class:`orthotune.OrthoModel` adds peft's API on top."""

    def __init__(self, model: nn.Module, config: AdapterConfig | None = None, adapter_name: str = "default") -> None:
        super().__init__()
        if isinstance(model, AdapterModel):
            raise ValueError("this model already carries orthotune adapters: use its add_adapter() instead")
        self.base_model = model
        self.configs: dict[str, AdapterConfig] = {}
        self._active: list[str] = []
        self.requantization_errors: dict[str, float] = {}  # per layer, from the last merge into a quantised base
        self._inference_only: set[str] = set()  # loaded with is_trainable=False: frozen even when active
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
        self.plan = Plan()  # per-step cores of all layers in batched calls at the start of every forward
        self.plan.attach(model)
        if config is not None:
            self.set_adapter(adapter_name)
        if _is_checkpointing(model):
            self._enable_input_require_grads()

    # ------------------------------------------------------------------ pass-through
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return call_with_adapter_names(self, self.base_model, args, kwargs)

    @property
    def generate(self) -> Callable[..., Any]:
        """The wrapped model's ``generate``, also taking peft's ``adapter_names`` (one adapter per sample)."""
        generate = self.base_model.generate  # no generate: AttributeError, and __getattr__ raises it again

        @functools.wraps(generate)
        def run(*args: Any, **kwargs: Any) -> Any:
            return call_with_adapter_names(self, generate, args, kwargs, generating=True)

        return run

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            if name in _FULL_MODEL_IO:
                raise AttributeError(
                    f"{type(self).__name__} has no {name!r}: the wrapped model's {name} would write or upload the full "
                    "base model. Use save_pretrained / push_to_hub (the adapters only), or merge_and_unload() first "
                    "to get the plain model"
                ) from None
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (still carrying adapter layers)."""
        return self.base_model

    # ------------------------------------------------------------------ serving: frozen inference cores
    def train(self, mode: bool = True) -> AdapterModel:
        """``nn.Module.train``; in eval mode every adapter's inference core is computed now, outside any compiled
        graph, for compiled forwards to read (:mod:`orthotune.layer.plan`); training mode drops them."""
        super().train(mode)
        self._refreeze()
        return self

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> AdapterModel:
        """``.to()``, ``.cuda()``, ``.half()``...: the frozen cores follow the new device and dtype."""
        super()._apply(fn, *args, **kwargs)
        self._refreeze()
        return self

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """``nn.Module.load_state_dict``, then the frozen cores of the loaded parameters."""
        result = super().load_state_dict(*args, **kwargs)
        self._refreeze()
        return result

    def _refreeze(self) -> None:
        """After a change of adapters: compute the frozen inference cores again in eval mode, drop them in training mode."""
        plan = self.__dict__.get("plan")  # None while __init__ adds the first adapter
        if plan is not None:
            plan.thaw(self.base_model) if self.training else plan.freeze(self.base_model)

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
        if not self._active:
            raise ValueError(
                f"no adapter is active, so the model computes its base model; set_adapter(name) to activate one "
                f"(adapters here: {sorted(self.configs)})"
            )
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
    def add_adapter(self, adapter_name: str, config: AdapterConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add an adapter (inactive unless it is the first); nothing changes if any check fails.

        ``low_cpu_mem_usage=True`` (peft's) creates its parameters on the meta device, uninitialised, to be
        filled by ``set_peft_model_state_dict(..., low_cpu_mem_usage=True)``; it cannot run before that.
        """
        if not isinstance(config, AdapterConfig):
            raise ValueError(f"config must be an orthotune AdapterConfig (e.g. LoCOConfig), got {type(config).__name__}")
        self._check_new_name(adapter_name)
        quantized.keep_training_layout(self.base_model)
        targets = find_targets(self.base_model, config)
        saved = find_modules_to_save(self.base_model, *saved_patterns(config))
        for sname, _ in saved:
            inside = [t for t, _ in targets if t.startswith(sname + ".") or t == sname]
            if inside:
                raise ValueError(
                    f"{inside[0]!r} is both a target and inside modules_to_save entry {sname!r}; "
                    "exclude it from target_modules (a saved module is trained in full)"
                )
        if low_cpu_mem_usage:
            modules = {name: build_on_meta(config, module, name) for name, module in targets}
        else:
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
        for lname, method in modules.items():  # a residual base (PiSSA residual_base) holds one adapter only
            residual.check(self.base_model.get_submodule(lname), method, lname, name)
        for lname, method in modules.items():
            layer = wrap(self.base_model, lname, AdapterLayer)
            layer.adapters[name] = method
            layer.active_adapters = list(self._active)
            if residual.is_residual(method):
                residual.subtract(layer, name)
        for sname in saved:
            wrapper = wrap(self.base_model, sname, ModulesToSave)
            wrapper.add(name)
            wrapper.active_adapters = list(self._active)
        self.configs[name] = config
        self._refresh_trainable()
        self._refreeze()

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Make these adapters active, in this composition order (first = innermost, see layer/adapter_layer.py).

        Switching adapters on a merged model unmerges it first (with a warning, as peft does): merged
        weights hold the previous composition. As in peft, they become trainable, or frozen with
        ``inference_mode=True`` (also those loaded with ``is_trainable=False``).
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
        self._inference_only = (self._inference_only | set(names)) if inference_mode else (self._inference_only - set(names))
        for _, module in self._wrappers():
            module.active_adapters = list(names)
        self._refresh_trainable()
        self._refreeze()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; refuses (changing nothing) while it is merged."""
        if adapter_name not in self.configs:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters here: {sorted(self.configs)}")
        if any(adapter_name in layer.merged_adapters for _, layer in self.adapter_layers()):
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge() before deleting it")
        was_active = list(self._active)
        for _, layer in list(self.adapter_layers()):
            if layer.residual == adapter_name:
                residual.restore(layer)
            if adapter_name in layer.adapters:
                del layer.adapters[adapter_name]
        for _, saved in self.saved_modules():
            if adapter_name in saved.copies:
                del saved.copies[adapter_name]
        del self.configs[adapter_name]
        self._inference_only.discard(adapter_name)
        self._active = [n for n in self._active if n != adapter_name]
        if adapter_name in was_active and not self._active:  # as peft: the first remaining adapter takes over
            if self.configs:
                self._active = [sorted(self.configs)[0]]
                warnings.warn(
                    f"adapter {adapter_name!r} was active and is deleted: adapter {self._active[0]!r} is active now",
                    stacklevel=2,
                )
            else:
                warnings.warn(
                    f"adapter {adapter_name!r} was the last adapter: the model now computes its base model", stacklevel=2
                )
        for _, module in self._wrappers():
            module.active_adapters = list(self._active)
        self._refresh_trainable()
        self._refreeze()

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str | None = None, **kwargs: Any
    ) -> None:
        """peft's ``add_weighted_adapter``: a new (inactive) adapter combining ``adapters``; see :mod:`orthotune.model.combine`."""
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, **kwargs)

    def _wrappers(self) -> Iterator[tuple[str, AdapterLayer | ModulesToSave]]:
        yield from self.adapter_layers()
        yield from self.saved_modules()

    def _refresh_trainable(self) -> None:
        """Only the active adapters' parameters (and their saved-module copies) train."""
        trains = [n for n in self._active if n not in self._inference_only]
        for _, layer in self.adapter_layers():
            for name, adapter in layer.adapters.items():
                adapter.requires_grad_(name in trains)
        for _, saved in self.saved_modules():
            for name, clone in saved.copies.items():
                clone.requires_grad_(name in trains)

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
            self._refreeze()

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
        self._refreeze()
        self.requantization_errors = quantized.merge_errors({n: layer.base_layer for n, layer in layers})
        quantized.warn_requantized(self.requantization_errors)

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
        self._refreeze()

    @property
    def merged(self) -> bool:
        """True if any adapter is merged into any layer."""
        return any(layer.merged_adapters for _, layer in self.adapter_layers())

    def merge_and_unload(
        self, adapter_names: list[str] | None = None, safe_merge: bool = False, dequantize: torch.dtype | None = None
    ) -> nn.Module:
        """Merge, then remove every wrapper: returns the plain model (saved modules keep their trained copy).

        On a bitsandbytes base, ``dequantize=None`` (the default, as peft) re-quantises each merged layer
        in its own format; the error is warned and kept in ``requantization_errors``. A dtype (e.g.
        ``torch.bfloat16``) turns each adapted quantised layer into a plain ``nn.Linear`` of that dtype,
        one layer at a time, holding the exact merged weight (docs/quantized.md).
        """
        if dequantize is not None:
            if self.merged:
                raise ValueError("unmerge() before merge_and_unload(dequantize=...): merged layers were re-quantised")
            quantized.dequantize_adapted([layer for _, layer in self.adapter_layers()], dequantize)
        if self._active or adapter_names:
            self.merge(adapter_names, safe_merge=safe_merge)
        for _, layer in self.adapter_layers():  # a residual base not merged into is W0 again
            residual.restore(layer)
        unwrap_all(self.base_model)
        return self.base_model

    def unload(self) -> nn.Module:
        """Remove every adapter without merging: returns the original model."""
        self.unmerge()
        for _, layer in self.adapter_layers():
            residual.restore(layer)
        for _, saved in self.saved_modules():
            saved.disabled = True
        unwrap_all(self.base_model)
        return self.base_model

    # ------------------------------------------------------------------ peft's names
    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        """Adapter name -> config (peft's name for :attr:`configs`)."""
        return self.configs

    @property
    def active_peft_config(self) -> AdapterConfig:
        """The config of :attr:`active_adapter`."""
        return self.configs[self.active_adapter]

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), as peft counts them."""
        c = self.trainable_parameters()
        return c["trainable"], c["total"]

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """peft's name for :meth:`merge`."""
        self.merge(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """peft's name for :meth:`unmerge`."""
        self.unmerge()

    def disable_adapter_layers(self) -> None:
        """Compute the base model until :meth:`enable_adapter_layers` (merged adapters are unmerged first, with a warning)."""
        if self.merged:
            warnings.warn("Unmerging merged adapters before disabling the adapter layers.", stacklevel=2)
            self.unmerge()
        for _, module in self._wrappers():
            module.disabled = True
        for _, layer in self.adapter_layers():
            layer.adapters.requires_grad_(False)
        for _, saved in self.saved_modules():
            saved.copies.requires_grad_(False)
        self._refreeze()

    def enable_adapter_layers(self) -> None:
        """Undo :meth:`disable_adapter_layers`: the active adapters apply (and train) again."""
        for _, module in self._wrappers():
            module.disabled = False
        self._refresh_trainable()
        self._refreeze()

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Turn gradients of these adapters' parameters (and saved-module copies) on or off, as peft does."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.configs]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; adapters here: {sorted(self.configs)}")
        for _, layer in self.adapter_layers():
            for n in names:
                if n in layer.adapters:
                    layer.adapters[n].requires_grad_(requires_grad)
        for _, saved in self.saved_modules():
            for n in names:
                if n in saved.copies:
                    saved.copies[n].requires_grad_(requires_grad)

    # ------------------------------------------------------------------ saving and loading
    def save_adapter(self, directory: str | Path, adapter_name: str | None = None) -> None:
        """Write one adapter as ``adapter_config.json`` + ``adapter_model.safetensors``, atomically."""
        save_adapter(self, directory, adapter_name or self.active_adapter)

    def save_pretrained(
        self,
        save_directory: str | Path,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        **kwargs: Any,
    ) -> None:
        """peft's layout: adapter ``default`` in ``save_directory``, every other one in ``save_directory/<name>``.

        Only adapter folders (and a model card, ``README.md``, in ``save_directory``) are written, never
        the base model's weights. ``selected_adapters`` picks the adapters (default: all); files are
        safetensors whatever ``safe_serialization`` says; modules_to_save are saved with their adapter.
        """
        if path_initial_model_for_weight_conversion is not None:
            raise ValueError(
                "path_initial_model_for_weight_conversion is for peft's PiSSA/OLoRA, whose base weights change; "
                "orthotune's folders store A0, B0 (also with residual_base=True, where loading reapplies the "
                "residual to the untouched base), so save without it; export_peft() writes the plain LoRA it makes"
            )
        unknown_kwargs = sorted(set(kwargs) - {"state_dict"})
        if unknown_kwargs:
            raise ValueError(f"save_pretrained got unknown arguments {unknown_kwargs}")
        names = list(self.configs) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.configs]
        if unknown:
            raise ValueError(f"selected_adapters {unknown} do not exist; adapters here: {sorted(self.configs)}")
        if not names:
            raise ValueError(
                "nothing to save: the model has no adapters (the last one was deleted, so it is the base model); "
                "add or load an adapter first" if not self.configs else "selected_adapters is empty"
            )
        if not safe_serialization:
            warnings.warn("orthotune writes adapters as safetensors only; safe_serialization=False is ignored", stacklevel=2)
        if not is_main_process:
            return
        state = kwargs.get("state_dict")
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        write_model_card(self, save_directory, names)  # one card for the folder, as peft writes it
        for name in names:
            folder = adapter_folder(save_directory, name)
            if state is None:
                self.save_adapter(folder, name)
            else:
                save_adapter(self, folder, name, adapter_state_in(self, state, name))

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        selected_adapters: list[str] | None = None,
    ) -> Any:
        """Upload the adapter folders (``save_pretrained``'s, never the base model) to a Hub repo; the commit info."""
        return push_adapters(self, repo_id, commit_message, private, token, revision, create_pr, selected_adapters)

    def _attach_loaded(self, name: str, config: AdapterConfig, modules: dict[str, nn.Module], saved_states: dict[str, dict]) -> None:
        """Wire in an adapter read by :func:`orthotune.model.io.build_adapter` (weights loaded, saved modules' states)."""
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
        with torch.no_grad(), residual.kept(list(layers.values()), name):
            for lname, method in modules.items():
                layers[lname].adapters[name].load_state_dict(method.state_dict())
            for sname, state in saved_states.items():
                self.base_model.get_submodule(sname).copies[name].load_state_dict(state)
        self._refreeze()

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


def adapter_folder(directory: str | Path, adapter_name: str) -> Path:
    """Where ``save_pretrained`` puts an adapter: ``default`` in ``directory``, any other in ``directory/<name>``."""
    return Path(directory) if adapter_name == "default" else Path(directory) / adapter_name


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
                probes[lname] = method(torch.ones(1, W.shape[1], dtype=W.dtype, device=W.device),
                                        Base(lambda z, W=W: z @ W.T), method.core(W.dtype))
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


#: Methods of a transformers model that write or upload its full weights: never reached through the wrapper.
#: (AdapterModel's own save_pretrained and push_to_hub act on the adapters.)
_FULL_MODEL_IO = frozenset({"_upload_modified_files", "save_distributed_checkpoint"})
