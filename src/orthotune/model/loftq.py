"""LoftQ's start for LoRA on a quantised base (Li et al. 2023, arXiv:2310.08659; peft's ``replace_lora_weights_loftq``
and ``LoftQConfig``).

QLoRA starts ``s B A = 0`` on ``Q(W)``, the rounded weight, so the adapter must first learn back what the rounding
lost. LoftQ starts it at the rank-r SVD of the rounding error instead, ``s B A = SVD_r(W - Q(W))``, so the adapted
model begins as close to the full-precision one as rank r allows. With one alternation (peft's
``replace_lora_weights_loftq``) the base stays as bitsandbytes loaded it; with T (the paper's Algorithm 1, peft's
``loftq_iter``) each adapted layer is re-quantised as ``Q = q(W - s B A)`` and the SVD taken again, T - 1 times, so
the base itself changes and must travel with the adapter (:func:`save_loftq_base`, :func:`load_loftq_base`). The
original weights are read, one tensor at a time, from the model's float safetensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..layer import quantized
from ..methods.config import check_positive_int
from ..methods.lora import LoRA
from ..methods.pissa import principal_factors


class _Weights:
    """Original weights by name, from a mapping, one ``.safetensors`` file or a folder (sharded or not)."""

    def __init__(self, source: str | Path | Mapping[str, Tensor]) -> None:
        self.mapping = source if isinstance(source, Mapping) else None
        self.files: dict[str, Path] = {}
        if self.mapping is not None:
            return
        path = Path(source)
        index = path / "model.safetensors.index.json"
        if path.is_file():
            files = [path]
        elif index.is_file():
            shards = json.loads(index.read_text())["weight_map"]
            self.files = {k: path / v for k, v in shards.items()}
            return
        else:
            files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
        if not files:
            raise FileNotFoundError(
                f"no safetensors weights at {str(path)!r}: pass the folder the model was loaded from (its "
                "model.safetensors or model.safetensors.index.json), one .safetensors file, or a state dict"
            )
        for f in files:
            with safe_open(f, framework="pt") as handle:
                self.files.update({k: f for k in handle.keys()})

    def names(self) -> set[str]:
        return set(self.mapping) if self.mapping is not None else set(self.files)

    def get(self, name: str) -> Tensor:
        if self.mapping is not None:
            return self.mapping[name]
        with safe_open(self.files[name], framework="pt") as handle:
            return handle.get_tensor(name)


def _key(layer_name: str, names: set[str], prefix: str) -> str:
    """The checkpoint key of ``layer_name``'s weight: as named, or with the model's ``base_model_prefix`` dropped or added."""
    candidates = [f"{layer_name}.weight"]
    if prefix:
        head = f"{prefix}."
        candidates.append(layer_name[len(head):] + ".weight" if layer_name.startswith(head) else f"{head}{layer_name}.weight")
    for key in candidates:
        if key in names:
            return key
    raise KeyError(
        f"the original weights have no {' or '.join(repr(c) for c in candidates)}: pass the float checkpoint of this "
        "very model (the folder it was quantised from)"
    )


def loftq_init(
    model: Any, weights: str | Path | Mapping[str, Tensor], adapter_name: str = "default", iterations: int = 1
) -> dict[str, tuple[float, float]]:
    """Start adapter ``adapter_name``'s LoRA factors on every 4-bit or 8-bit layer at LoftQ's ``SVD_r(W - Q(W)) / s``.

    ``model`` is an :class:`~orthotune.AdapterModel` on a bitsandbytes base, ``weights`` the float checkpoint it was
    quantised from (folder, file or state dict). Layers in float weights keep LoRA's usual start (their error is
    zero). Returns, per quantised layer, ``(||W - Q|| / ||W||, ||W - Q - s B A|| / ||W||)``: the rounding error
    before and after, both relative to the original weight. An adapter started this way belongs to the quantised
    base: on the float base it adds the rank-r rounding error once more.

    ``iterations`` > 1 runs LoftQ's alternation, re-quantising each adapted layer as ``q(W - s B A)``: a smaller
    error after (the paper's T = 5), but the base is no longer what loading the checkpoint quantised gives, so save
    it beside the adapter with :func:`save_loftq_base` and restore it with :func:`load_loftq_base` before loading
    the adapter again (merged models need nothing: they hold ``Q + s B A``).
    """
    check_positive_int("iterations (LoftQ's alternations; 1 keeps the quantised base)", iterations)
    source = _Weights(weights)
    names = source.names()
    prefix = getattr(getattr(model, "base_model", None), "base_model_prefix", "") or ""
    todo = []  # every layer is checked before any changes
    for name, layer in model.adapter_layers():
        method = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        if method is None or not quantized.is_quantized(layer.base_layer):
            continue
        if type(method) is not LoRA:
            raise TypeError(
                f"loftq_init starts LoRA factors; adapter {adapter_name!r} on {name!r} is {type(method).__name__}: "
                "use it with method 'lora' (other methods keep their own start on a quantised base)"
            )
        if layer.merged_adapters:
            raise ValueError(f"{name!r} has adapters merged into its base ({sorted(layer.merged_adapters)}): unmerge() "
                             "before loftq_init, whose rounding error is that of the checkpoint's weight")
        if iterations > 1 and len(layer.adapters) > 1:
            raise ValueError(f"loftq_init(iterations > 1) re-quantises {name!r}'s base, which adapters "
                             f"{sorted(set(layer.adapters) - {adapter_name})} share: start it before adding them, or "
                             "use iterations=1, which leaves the base as loaded")
        todo.append((name, layer, method, _key(name, names, prefix)))
    report: dict[str, tuple[float, float]] = {}
    for name, layer, method, key in todo:
        W = source.get(key).to(device=method.lora_A.device, dtype=torch.float32)
        error = W - quantized.dequantize(layer.base_layer).to(W)
        rounding = float(error.norm() / W.norm())
        A, B = principal_factors(error, method.config.r, method.scaling)
        for _ in range(iterations - 1):  # LoftQ's alternation: Q = q(W - s B A), then s B A = SVD_r(W - Q)
            quantized.requantize(layer.base_layer, W - method.scaling * (B @ A))
            error = W - quantized.dequantize(layer.base_layer).to(W)
            A, B = principal_factors(error, method.config.r, method.scaling)
        if iterations > 1:
            quantized.merge_errors({name: layer.base_layer})  # a start, not a merge: nothing for merging to report
            quantized.mark_own_base(layer.base_layer)
        with torch.no_grad():
            method.lora_A.copy_(A)
            method.lora_B.copy_(B)
        left = error - method.delta_weight().detach().to(W)
        report[name] = (rounding, float(left.norm() / W.norm()))
    if not report:
        raise ValueError(
            f"no LoRA adapter {adapter_name!r} on a bitsandbytes layer: load the base with BitsAndBytesConfig "
            "(load_in_4bit or load_in_8bit) and add a LoRA adapter before loftq_init"
        )
    model._refreeze()
    return report


def _root(model: nn.Module) -> nn.Module:
    """The module layer names are relative to: an AdapterModel's wrapped model, or ``model`` itself."""
    return model.base_model if hasattr(model, "adapter_layers") else model


def save_loftq_base(model: nn.Module, path: str | Path) -> int:
    """Write the layers :func:`loftq_init` re-quantised (``iterations`` > 1) to the safetensors file ``path``,
    atomically: their packed weights and quant states, keyed by layer name. Returns how many layers it holds."""
    tensors, names = {}, []
    for name, module in _root(model).named_modules():
        if quantized.has_own_base(module):
            name = name.removesuffix(".base_layer")
            names.append(name)
            tensors.update({f"{name}.{k}": v.detach().to("cpu").contiguous() for k, v in quantized.stored_weight(module).items()})
    if not names:
        raise ValueError("no layer of this model was re-quantised by loftq_init(iterations > 1): with one alternation "
                         "the base is the checkpoint's own rounding, and only the adapter needs saving")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"format": "orthotune-loftq-base", "layers": json.dumps(names)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind
    return len(names)


def load_loftq_base(model: nn.Module, path: str | Path) -> int:
    """Restore the re-quantised layers :func:`save_loftq_base` wrote into ``model``, loaded with the same
    ``BitsAndBytesConfig``, before its adapter folder is loaded (which refuses a base without them) or under an adapter
    made afresh; every layer is checked before any changes. Returns how many layers it restored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: it is written by save_loftq_base (the recipes: the run "
                                "folder's loftq_base.safetensors) beside an adapter started with loftq iterations > 1")
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata() or {}
    if meta.get("format") != "orthotune-loftq-base":
        raise ValueError(f"{path} is not a file save_loftq_base wrote (its metadata has no format "
                         "'orthotune-loftq-base'): pass the loftq_base.safetensors saved beside the adapter")
    names = json.loads(meta["layers"])
    tensors = load_file(str(path))
    root = _root(model)
    layers, stored = {}, {}
    for name in names:
        try:
            module = root.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path} holds layer {name!r}, which this model does not have: load the base it was saved "
                             "from") from None
        layers[name] = getattr(module, "base_layer", module)
        stored[name] = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
    states = {name: quantized.check_stored_weight(layers[name], stored[name], name) for name in names}
    for name in names:
        quantized.load_stored_weight(layers[name], stored[name], states[name])
        quantized.mark_own_base(layers[name])
    return len(names)
