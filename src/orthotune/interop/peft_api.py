"""peft's module-level utilities under peft's names and signatures, so code written for peft runs.

``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` move one adapter's tensors (orthotune's
keys, :func:`orthotune.model.io.adapter_state_dict`); ``inject_adapter_in_model`` adapts a model in place;
``get_layer_status`` / ``get_model_status`` report what peft's functions of the same names report.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from torch import nn

from ..layer import residual
from ..model.adapter_model import AdapterModel
from ..model.io import adapter_state_dict, adapter_state_in
from ..model.meta_init import materialize

if TYPE_CHECKING:
    from ..methods.config import AdapterConfig

Irregular = Literal["irregular"]


class LoadResult(NamedTuple):
    """What ``set_peft_model_state_dict`` returns, as ``torch.nn.Module.load_state_dict`` does."""

    missing_keys: list[str]
    unexpected_keys: list[str]


@dataclass
class TunerLayerStatus:
    """One adapted layer, with peft's fields."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    """The whole model, with peft's fields; a field is "irregular" where layers disagree."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


def _ortho(model: nn.Module) -> AdapterModel:
    if not isinstance(model, AdapterModel):
        raise ValueError(f"expected a model with orthotune adapters (orthotune.get_model), got {type(model).__name__}")
    return model


def _grad_state(params: list[torch.Tensor]) -> bool | Irregular:
    flags = {p.requires_grad for p in params}
    return flags.pop() if len(flags) == 1 else "irregular"


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """Per adapted layer: enabled, active/merged/available adapters, requires_grad and devices per adapter."""
    ortho = _ortho(model)
    out = []
    for name, layer in ortho.adapter_layers():
        adapters = sorted(layer.adapters)
        out.append(TunerLayerStatus(
            name=name, module_type=f"orthotune.{layer.kind}", enabled=not layer.disabled,
            active_adapters=[n for n in layer.active_adapters if n in layer.adapters],
            merged_adapters=list(layer.merged_adapters),
            requires_grad={n: _grad_state(list(layer.adapters[n].parameters())) for n in adapters},
            available_adapters=adapters,
            devices={n: sorted({str(t.device.type) for t in layer.adapters[n].state_dict().values()}) for n in adapters},
            quantization_backend=None,
        ))  # fmt: skip
    return out


def _agree(values: list) -> object:
    return values[0] if values and all(v == values[0] for v in values) else ("irregular" if values else [])


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The model's adapter state in one record (peft's ``get_model_status``)."""
    ortho = _ortho(model)
    layers = get_layer_status(ortho)
    trainable, total = ortho.get_nb_trainable_parameters()
    grads: dict[str, list] = {}
    devices: dict[str, set] = {}
    for status in layers:
        for n, flag in status.requires_grad.items():
            grads.setdefault(n, []).append(flag)
        for n, devs in status.devices.items():
            devices.setdefault(n, set()).update(devs)
    return TunerModelStatus(
        base_model_type=type(ortho.base_model).__name__, adapter_model_type=type(ortho).__name__,
        peft_types={n: c.method.upper() for n, c in ortho.configs.items()},
        trainable_params=trainable, total_params=total, num_adapter_layers=len(layers),
        enabled=_agree([s.enabled for s in layers]) if layers else False,
        active_adapters=_agree([s.active_adapters for s in layers]),
        merged_adapters=_agree([s.merged_adapters for s in layers]),
        requires_grad={n: _agree(flags) for n, flags in grads.items()},
        available_adapters=sorted(ortho.configs), devices={n: sorted(d) for n, d in devices.items()},
        quantization_backend=None,
    )  # fmt: skip


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | Literal["auto"] = "auto",
) -> dict[str, torch.Tensor]:
    """One adapter's tensors (what ``save_pretrained`` writes), keyed as ``set_peft_model_state_dict`` reads them.

    ``state_dict`` (a full model state, e.g. gathered from FSDP shards) is accepted as peft accepts
    it: the adapter's keys are taken from it instead of the live parameters.
    """
    ortho = _ortho(getattr(model, "_orig_mod", model) if unwrap_compiled else model)
    return adapter_state_dict(ortho, adapter_name) if state_dict is None else adapter_state_in(ortho, state_dict, adapter_name)


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> LoadResult:
    """Copy tensors from :func:`get_peft_model_state_dict` into an existing adapter, in place.

    Returns the adapter's keys the dict lacks and the dict's keys the adapter lacks. A shape
    mismatch raises unless ``ignore_mismatched_sizes``, which skips (and reports) those tensors.
    ``low_cpu_mem_usage=True`` assigns the tensors instead of copying them (peft's): it fills an adapter
    added with ``low_cpu_mem_usage=True`` (parameters on the meta device), each layer's tensors in full.
    """
    ortho = _ortho(model)
    own = adapter_state_dict(ortho, adapter_name)
    given = dict(peft_model_state_dict)
    mismatched = [k for k in own if k in given and given[k].shape != own[k].shape]
    if mismatched and not ignore_mismatched_sizes:
        k = mismatched[0]
        raise ValueError(
            f"tensor {k!r} has shape {tuple(given[k].shape)}, adapter {adapter_name!r} has {tuple(own[k].shape)} "
            f"({len(mismatched)} such tensors): it comes from another config; pass ignore_mismatched_sizes=True to skip them"
        )
    if mismatched:
        warnings.warn(f"skipped {len(mismatched)} tensors of mismatched shape: {mismatched[:5]}", stacklevel=2)
    layers = [layer for _, layer in ortho.adapter_layers()]
    with torch.no_grad(), residual.kept(layers, adapter_name):  # new A0, B0 move a residual base with them
        to_copy = own
        if low_cpu_mem_usage:
            to_copy = _assign_layers(ortho, adapter_name, {k: v for k, v in given.items() if k not in mismatched}, own)
        for k, target in to_copy.items():
            if k in given and k not in mismatched:
                target.copy_(given[k])
    ortho._refreeze()
    return LoadResult(sorted(set(own) - set(given)) + mismatched, sorted(set(given) - set(own)))


def _assign_layers(
    ortho: AdapterModel, adapter_name: str, given: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Assign ``given`` to each adapter layer of ``adapter_name`` (:func:`orthotune.model.meta_init.materialize`); the
    entries of ``own`` left to copy (saved modules)."""
    rest = dict(own)
    for lname, layer in ortho.adapter_layers():
        if adapter_name in layer.adapters:
            method = layer.adapters[adapter_name]
            keys = {k: f"{lname}.{k}" for k in method.state_dict()}
            absent = [full for full in keys.values() if full not in given]
            if absent:
                raise ValueError(
                    f"low_cpu_mem_usage=True assigns whole layers, but the state dict lacks {absent[:3]}: pass every "
                    f"tensor of adapter {adapter_name!r} (get_peft_model_state_dict), or low_cpu_mem_usage=False"
                )
            materialize(method, {k: given[full] for k, full in keys.items()}, layer.base_layer, lname)
            for full in keys.values():
                rest.pop(full)
    ortho._refresh_trainable()
    return rest


def inject_adapter_in_model(
    peft_config: AdapterConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Adapt ``model`` in place (its base frozen, the adapter trainable) and return it, without a wrapper.

    ``state_dict`` (from :func:`get_peft_model_state_dict`) fills the new adapter's tensors.
    ``low_cpu_mem_usage=True``: parameters created on the meta device, then assigned ``state_dict``'s tensors.
    """
    ortho = AdapterModel(model)
    ortho.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
    ortho.set_adapter(adapter_name)
    if state_dict is not None:
        result = set_peft_model_state_dict(ortho, state_dict, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"state_dict does not fit adapter {adapter_name!r}: missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
    return model
