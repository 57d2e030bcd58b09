"""peft's ``target_parameters``: adapters on bare ``nn.Parameter`` weights, such as MoE experts' stacked
``experts.gate_up_proj`` of shape (num_experts, out, in) (or (num_experts, in, out) where the module sets
``is_transposed``, as GPT-OSS does), or a 2-D (out, in) weight.

Each targeted parameter gets one adapter per expert slice, of any orthotune method, and becomes
``torch.nn.utils.parametrize``'s ``W -> stack_e merged_weight_e(W_e)``: rotations rotate each expert's
input side, additive methods add each expert's update. Every module that reads the parameter (the
experts' own forward, grouped-mm kernels) sees the adapted weight, and gradients reach the adapters.

    add_param_adapter(model, orthotune.LoRAConfig(r=4), ["experts.gate_up_proj"])   # any method's config
    ...train...
    save_param_adapter(model, "out")             # orthotune's folder for these adapters
    merge_param_adapters(model) / unmerge_param_adapters(model) / unload_param_adapters(model, merge=True)
    load_peft_target_parameters(model, "peft-folder")   # peft LoRA folders with target_parameters (interop.peft_params)

This is a separate entry point next to :class:`~orthotune.OrthoModel` (whose adapters wrap layers);
the two can be used on one model, each with its own save and merge calls.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..layer.merge_precision import in_float64
from ..methods.config import AdapterConfig
from ..methods.registry import config_from_dict, method_class

CONFIG_FILE = "param_adapter_config.json"
WEIGHTS_FILE = "param_adapter.safetensors"


class ExpertAdapters(nn.Module):
    """The parametrization of one targeted parameter: one adapter method per expert slice."""

    def __init__(self, config: AdapterConfig, weight: Tensor, transposed: bool, name: str) -> None:
        super().__init__()
        self.config = config
        self.transposed = transposed
        self.squeeze = weight.dim() == 2
        mats = self._matrices(weight.detach())
        d_out, d_in = mats.shape[-2:]
        cls = method_class(config)
        cls.check_layer(config, d_in, d_out, name)
        self.experts = nn.ModuleList(cls(config, d_in, d_out, w) for w in mats)
        self.merged = False
        self.enabled = True

    def _matrices(self, W: Tensor) -> Tensor:
        """(E, d_out, d_in) view of a 2-D (out, in) or 3-D (E, out, in) / transposed (E, in, out) parameter."""
        W = W.unsqueeze(0) if self.squeeze else W
        return W.transpose(-1, -2) if self.transposed else W

    def _layout(self, mats: Tensor) -> Tensor:
        mats = mats.transpose(-1, -2) if self.transposed else mats
        return mats.squeeze(0) if self.squeeze else mats

    def apply_map(self, W: Tensor, inverse: bool = False) -> Tensor:
        """Every expert's ``merged_weight`` (or ``unmerged_weight``) of its slice of ``W``, in W's layout and dtype."""
        mats = self._matrices(W)
        work = torch.promote_types(W.dtype, torch.float32)
        out = [(m.unmerged_weight if inverse else m.merged_weight)(w.to(work)) for m, w in zip(self.experts, mats)]
        return self._layout(torch.stack(out)).to(W.dtype)

    def forward(self, W: Tensor) -> Tensor:
        if self.merged or not self.enabled:
            return W
        return self.apply_map(W)


def _transposed(module: nn.Module, weight: Tensor) -> bool:
    return weight.dim() == 3 and bool(getattr(module, "is_transposed", False))


def find_parameters(model: nn.Module, target_parameters: list[str]) -> list[str]:
    """Full names of the parameters matching ``target_parameters`` (the name or a dotted suffix), in model order;
    an entry matching nothing raises."""
    names = [
        n.replace(".parametrizations.", ".").removesuffix(".original")
        for n, _ in model.named_parameters()
        if ".parametrizations." not in n or n.endswith(".original")
    ]
    found = [n for n in names if any(n == t or n.endswith("." + t) for t in target_parameters)]
    for t in target_parameters:
        if not any(n == t or n.endswith("." + t) for n in found):
            raise ValueError(f"target_parameters entry {t!r} matches no parameter of the model; check its spelling")
    return found


def add_param_adapter(model: nn.Module, config: AdapterConfig, target_parameters: list[str]) -> list[str]:
    """Adapt every parameter matching ``target_parameters``; returns their full names. The base parameters are
    frozen, the adapters trainable. One adapter per parameter: ``unload_param_adapters`` before adding another."""
    names = find_parameters(model, target_parameters)
    built: dict[str, ExpertAdapters] = {}
    for full in names:
        owner, attr = _split(model, full)
        if parametrize.is_parametrized(owner, attr):
            raise ValueError(f"{full!r} already carries a parameter adapter; unload_param_adapters(model) first")
        weight = getattr(owner, attr)
        if weight.dim() not in (2, 3):
            raise ValueError(f"{full!r} has {weight.dim()} dimensions; target_parameters adapts 2-D and 3-D (experts) weights")
        built[full] = ExpertAdapters(config, weight, _transposed(owner, weight), full)
    for full, adapters in built.items():
        owner, attr = _split(model, full)
        getattr(owner, attr).requires_grad_(False)
        parametrize.register_parametrization(owner, attr, adapters, unsafe=True)
        owner.parametrizations[attr].original.requires_grad_(False)
    return names


def param_adapters(model: nn.Module) -> Iterator[tuple[str, ExpertAdapters]]:
    """(full parameter name, its :class:`ExpertAdapters`) for every adapted parameter."""
    for mname, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for attr, plist in module.parametrizations.items():
                for p in plist:
                    if isinstance(p, ExpertAdapters):
                        yield (f"{mname}.{attr}" if mname else attr), p


@torch.no_grad()
def merge_param_adapters(model: nn.Module) -> None:
    """Fold each expert's adapter into the stored parameter (float64, rounded once); undone by unmerge."""
    _rewrite(model, inverse=False)


@torch.no_grad()
def unmerge_param_adapters(model: nn.Module) -> None:
    """Undo :func:`merge_param_adapters`."""
    _rewrite(model, inverse=True)


def _rewrite(model: nn.Module, inverse: bool) -> None:
    for full, adapters in param_adapters(model):
        if adapters.merged != inverse:
            continue
        owner, attr = _split(model, full)
        original = owner.parametrizations[attr].original
        with in_float64(adapters.experts):
            original.copy_(adapters.apply_map(original.double(), inverse=inverse).to(original.dtype))
        adapters.merged = not inverse


def unload_param_adapters(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every parameter adapter: with ``merge`` the parameters keep the adapted weights (peft's
    ``merge_and_unload``), else the base weights come back (``unload``)."""
    if not merge:
        unmerge_param_adapters(model)
    else:
        merge_param_adapters(model)
    for full, _ in list(param_adapters(model)):
        parametrize.remove_parametrizations(*_split(model, full), leave_parametrized=False)  # the stored weight
    return model


def set_param_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """peft's enable/disable_adapter_layers for parameter adapters (disabled: the base weights)."""
    for _, adapters in param_adapters(model):
        adapters.enabled = enabled


def param_adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every adapter tensor, keyed ``<parameter>.<expert>.<tensor>``."""
    return {
        f"{full}.{e}.{k}": v.detach()
        for full, adapters in param_adapters(model)
        for e, m in enumerate(adapters.experts)
        for k, v in m.state_dict().items()
    }


def save_param_adapter(model: nn.Module, directory: str | Path) -> None:
    """Write the parameter adapters' config and tensors (safetensors) to ``directory``."""
    found = list(param_adapters(model))
    if not found:
        raise ValueError("the model has no parameter adapters to save (add_param_adapter first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"config": found[0][1].config.to_dict(), "target_parameters": [full for full, _ in found]}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    save_file({k: v.contiguous() for k, v in param_adapter_state_dict(model).items()}, str(directory / WEIGHTS_FILE))


def load_param_adapter(model: nn.Module, directory: str | Path) -> list[str]:
    """Add the parameter adapters saved by :func:`save_param_adapter`; every tensor must fit."""
    directory = Path(directory)
    meta = json.loads((directory / CONFIG_FILE).read_text())
    names = add_param_adapter(model, config_from_dict(meta["config"]), meta["target_parameters"])
    fill_param_adapters(model, load_file(str(directory / WEIGHTS_FILE)), directory)
    return names


def fill_param_adapters(model: nn.Module, state: dict[str, Tensor], source: Any) -> None:
    """Copy ``state`` into the model's parameter adapters in place, refusing (and unloading them) if it does not fit."""
    own = param_adapter_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        unload_param_adapters(model, merge=False)
        raise ValueError(
            f"the tensors in {source} do not fit this model's parameters: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, other shapes {bad[:3]}; it was saved for another model"
        )
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k])


def _split(model: nn.Module, full: str) -> tuple[nn.Module, str]:
    owner, _, attr = full.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr
