"""LoftQ's start for LoRA on a quantised base (Li et al. 2023, arXiv:2310.08659; peft's ``replace_lora_weights_loftq``).

QLoRA starts ``s B A = 0`` on ``Q(W)``, the rounded weight, so the adapter must first learn back what the rounding
lost. LoftQ starts it at the rank-r SVD of the rounding error instead, ``s B A = SVD_r(W - Q(W))``, so the adapted
model begins as close to the full-precision one as rank r allows. bitsandbytes fixed ``Q`` when the model was
loaded, so this is LoftQ with one alternation (as peft's function): the original weights are read, one tensor at
a time, from the model's float safetensors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from ..layer import quantized
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


def loftq_init(model: Any, weights: str | Path | Mapping[str, Tensor], adapter_name: str = "default") -> dict[str, tuple[float, float]]:
    """Start adapter ``adapter_name``'s LoRA factors on every 4-bit or 8-bit layer at LoftQ's ``SVD_r(W - Q(W)) / s``.

    ``model`` is an :class:`~orthotune.AdapterModel` on a bitsandbytes base, ``weights`` the float checkpoint it was
    quantised from (folder, file or state dict). Layers in float weights keep LoRA's usual start (their error is
    zero). Returns, per quantised layer, ``(||W - Q|| / ||W||, ||W - Q - s B A|| / ||W||)``: the rounding error
    before and after, both relative to the original weight. An adapter started this way belongs to the quantised
    base: on the float base it adds the rank-r rounding error once more.
    """
    source = _Weights(weights)
    names = source.names()
    prefix = getattr(getattr(model, "base_model", None), "base_model_prefix", "") or ""
    report: dict[str, tuple[float, float]] = {}
    for name, layer in model.adapter_layers():
        method = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        if method is None or not quantized.is_quantized(layer.base_layer):
            continue
        if type(method) is not LoRA:
            raise TypeError(
                f"loftq_init starts LoRA factors; adapter {adapter_name!r} on {name!r} is {type(method).__name__}: "
                "use it with method 'lora' (other methods keep their own start on a quantised base)"
            )
        W = source.get(_key(name, names, prefix)).to(device=method.lora_A.device, dtype=torch.float32)
        error = W - quantized.dequantize(layer.base_layer).to(W)
        A, B = principal_factors(error, method.config.r, method.scaling)
        with torch.no_grad():
            method.lora_A.copy_(A)
            method.lora_B.copy_(B)
        left = error - method.delta_weight().detach().to(W)
        report[name] = (float(error.norm() / W.norm()), float(left.norm() / W.norm()))
    if not report:
        raise ValueError(
            f"no LoRA adapter {adapter_name!r} on a bitsandbytes layer: load the base with BitsAndBytesConfig "
            "(load_in_4bit or load_in_8bit) and add a LoRA adapter before loftq_init"
        )
    model._refreeze()
    return report
