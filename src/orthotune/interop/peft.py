"""peft adapter folders in and out: :func:`read_peft` (behind ``orthotune.from_peft``) and :func:`export_peft`.

peft writes ``adapter_config.json`` (its config fields, with ``peft_type``) and
``adapter_model.safetensors`` (or ``adapter_model.bin``) keyed ``base_model.model.<module>.<tensor>``,
saved modules as ``base_model.model.<module>.<param>``. One :class:`PeftFormat` entry per orthotune
method in :data:`FORMATS` says how its config and tensors map to one peft tuner's; supporting
another method is one entry there. peft itself is not needed to read or write these folders.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..config import AdapterConfig
from ..inject import iter_named_layers
from ..io import CONFIG_NAME, SAVED_PREFIX, WEIGHTS_NAME, adapter_state_dict, build_adapter, write_folder
from ..layer import base_weight_matrix, layer_dims, layer_kind
from ..methods.base import AdapterMethod
from ..methods.fourierft import fourier_locations
from ..methods.pissa import principal_factors
from ..registry import METHODS

if TYPE_CHECKING:
    from ..model import OrthoModel

PEFT_PREFIX = "base_model.model."
PEFT_BIN_NAME = "adapter_model.bin"


@dataclass(frozen=True)
class PeftFormat:
    """How one orthotune method reads and writes one peft tuner's folders.

    ``claims(cfg)``: whether a peft config of ``peft_type`` is this method's (LORA folders are LoRA
    or PiSSA). ``config_in(cfg)``: orthotune config fields (targets are added by the caller),
    raising ValueError for any peft option without an equivalent. ``tensors_in(config, layer,
    tensors)``: the method's state for one base layer from peft's tensors of that module (keys
    ``tensor_names``). ``config_out`` / ``tensors_out``: the reverse, for export.
    """

    method: str
    peft_type: str
    tensor_names: tuple[str, ...]
    claims: Callable[[dict[str, Any]], bool]
    config_in: Callable[[dict[str, Any]], dict[str, Any]]
    tensors_in: Callable[[AdapterConfig, nn.Module, dict[str, Tensor]], dict[str, Tensor]]
    config_out: Callable[[AdapterConfig], dict[str, Any]]
    tensors_out: Callable[[AdapterMethod, nn.Module], dict[str, Tensor]]


# Options of every peft config that orthotune reads or that do not change the adapted model (the
# tensors in the file say which modules were adapted).
_PEFT_COMMON = {
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "target_modules", "exclude_modules", "modules_to_save", "fan_in_fan_out",
    "layers_to_transform", "layers_pattern",
}  # fmt: skip


def _check_options(cfg: dict[str, Any], read: set[str], reads: str) -> None:
    """Refuse, by name, every option outside ``read`` set to a non-default value (a newer peft's included)."""
    for key, value in cfg.items():
        if key not in _PEFT_COMMON | read and value not in (None, False, {}, [], "none"):
            raise ValueError(
                f"the peft {cfg['peft_type']} option {key}={value!r} has no orthotune equivalent (orthotune reads "
                f"{reads}); merge or convert that adapter in peft first"
            )


# ---------------------------------------------------------------------------------------------- LoRA
_LORA_READ = {
    "r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights", "megatron_core", "qalora_group_size",
    "eva_config", "corda_config", "lora_ga_config", "runtime_config",
}  # fmt: skip
# Inits that only set the starting A, B: the saved A, B are the whole adapter.
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva", "mica")


def _lora_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    _check_options(cfg, _LORA_READ, "plain LoRA: r, lora_alpha, lora_dropout, use_rslora, modules_to_save")
    return {
        "r": cfg["r"],
        "lora_alpha": cfg.get("lora_alpha", 8),
        "lora_dropout": cfg.get("lora_dropout", 0.0),
        "use_rslora": bool(cfg.get("use_rslora", False)),
    }


def _is_pissa(cfg: dict[str, Any]) -> bool:
    return str(cfg.get("init_lora_weights", True)).lower().startswith("pissa")


def _lora_config_in(cfg: dict[str, Any]) -> dict[str, Any]:
    init = cfg.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise ValueError(
            f"this peft LoRA was initialised with init_lora_weights={init!r}, which rewrites the base weights: its "
            "A, B alone are not the adapter. Convert it to plain LoRA in peft first: save_pretrained(path, "
            "path_initial_model_for_weight_conversion=<the initial adapter>)"
        )
    return _lora_fields(cfg)


def _pissa_config_in(cfg: dict[str, Any]) -> dict[str, Any]:
    init = str(cfg["init_lora_weights"])
    if init.lower() != "pissa":
        raise ValueError(
            f"a peft PiSSA adapter with init_lora_weights={init!r} depends on the random sketch svd_lowrank drew when "
            "it was created, which cannot be reproduced. Convert it to plain LoRA in peft first: save_pretrained(path, "
            "path_initial_model_for_weight_conversion=<the initial adapter>), then load that with from_peft"
        )
    return {**_lora_fields(cfg), "svd_niter": None}


def _lora_tensors_in(config: AdapterConfig, layer: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    A, B = tensors["lora_A.weight"], tensors["lora_B.weight"]
    return {"lora_A": A.reshape(A.shape[0], -1), "lora_B": B.reshape(B.shape[0], -1)}


def _pissa_tensors_in(config: AdapterConfig, layer: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    # peft recomputes A0, B0 from the base weights it is given, as it does on loading a PiSSA folder
    A0, B0 = principal_factors(base_weight_matrix(layer).detach(), config.r, config.scaling, config.svd_niter)
    return {**_lora_tensors_in(config, layer, tensors), "lora_A0": A0, "lora_B0": B0}


def _lora_config_out(config: AdapterConfig) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora,
        "init_lora_weights": True,
        "bias": "none",
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _pissa_config_out(config: AdapterConfig) -> dict[str, Any]:
    # B A - B0 A0 is a LoRA of rank 2r; the scale s is kept: alpha / r -> 2 alpha / 2r (sqrt(2) alpha with rsLoRA)
    alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
    return {**_lora_config_out(config), "r": 2 * config.r, "lora_alpha": alpha}


def _peft_lora_shapes(A: Tensor, B: Tensor, layer: nn.Module) -> dict[str, Tensor]:
    if layer_kind(layer) == "conv2d":  # peft's lora_A is a conv with the base kernel, lora_B a 1x1 conv
        A = A.reshape(A.shape[0], *layer.weight.shape[1:])
        B = B.reshape(B.shape[0], B.shape[1], 1, 1)
    return {"lora_A.weight": A, "lora_B.weight": B}


def _lora_tensors_out(method: AdapterMethod, layer: nn.Module) -> dict[str, Tensor]:
    return _peft_lora_shapes(method.lora_A, method.lora_B, layer)


def _pissa_tensors_out(method: AdapterMethod, layer: nn.Module) -> dict[str, Tensor]:
    left, right = method.factors()  # [A - A0; A0], [B, B - B0]: no cancellation when read in half precision
    return _peft_lora_shapes(left, right, layer)


# ---------------------------------------------------------------------------------------------- FourierFT
def _fourierft_config_in(cfg: dict[str, Any]) -> dict[str, Any]:
    _check_options(cfg, {"n_frequency", "scaling", "random_loc_seed", "init_weights"}, "n_frequency, scaling, random_loc_seed")
    return {"n_frequency": cfg["n_frequency"], "scaling": cfg.get("scaling", 150.0), "random_loc_seed": cfg.get("random_loc_seed", 777)}


def _fourierft_tensors_in(config: AdapterConfig, layer: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    d_in, d_out = layer_dims(layer)  # the cells are peft's seeded draw, not stored in its file
    cells = fourier_locations(d_out, d_in, config.n_frequency, config.random_loc_seed)
    return {"spectrum": tensors["fourierft_spectrum"], "locations": cells}


def _fourierft_config_out(config: AdapterConfig) -> dict[str, Any]:
    return {
        "peft_type": "FOURIERFT",
        "n_frequency": config.n_frequency,
        "scaling": config.scaling,
        "random_loc_seed": config.random_loc_seed,
        "init_weights": False,
        "bias": "none",
        "n_frequency_pattern": {},
    }


def _fourierft_tensors_out(method: AdapterMethod, layer: nn.Module) -> dict[str, Tensor]:
    if layer_kind(layer) == "conv2d":
        raise ValueError("peft's FourierFT adapts Linear and Conv1D layers only: this adapter has a Conv2d target")
    return {"fourierft_spectrum": method.spectrum}


FORMATS: dict[str, PeftFormat] = {
    "lora": PeftFormat(
        "lora", "LORA", ("lora_A.weight", "lora_B.weight"), lambda c: not _is_pissa(c),
        _lora_config_in, _lora_tensors_in, _lora_config_out, _lora_tensors_out,
    ),
    "pissa": PeftFormat(
        "pissa", "LORA", ("lora_A.weight", "lora_B.weight"), _is_pissa,
        _pissa_config_in, _pissa_tensors_in, _pissa_config_out, _pissa_tensors_out,
    ),
    "fourierft": PeftFormat(
        "fourierft", "FOURIERFT", ("fourierft_spectrum",), lambda c: True,
        _fourierft_config_in, _fourierft_tensors_in, _fourierft_config_out, _fourierft_tensors_out,
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------- reading
def read_peft(base: nn.Module, directory: str | Path) -> tuple[AdapterConfig, dict[str, nn.Module], dict[str, dict]]:
    """Validate a peft folder against ``base`` and build orthotune modules for it; touches nothing in ``base``.

    Returns what :func:`orthotune.io.read_adapter` returns, for :func:`orthotune.model.attach_loaded`.
    """
    directory = Path(directory)
    cfg = _read_peft_config(directory)
    fmt = _format_for(cfg, directory)
    fields = fmt.config_in(cfg)  # refuses unsupported options before the tensors are read
    tensors = _read_peft_tensors(directory)
    per_module, saved = _split_tensors(tensors, fmt, directory)
    config = METHODS[fmt.method][0](target_modules=sorted(per_module), modules_to_save=cfg.get("modules_to_save"), **fields)
    saved_for = (cfg.get("auto_mapping") or {}).get("base_model_class") or cfg.get("base_model_name_or_path")

    layers = dict(iter_named_layers(base))
    targets: dict[str, list] = {}
    state: dict[str, Tensor] = {f"{SAVED_PREFIX}{k}": v for k, v in saved.items()}
    for lname, local in per_module.items():
        layer = layers.get(lname)
        if layer is None or layer_kind(layer) is None:
            raise ValueError(
                f"the peft adapter in {directory} adapts {lname!r}, which this model does not have as a linear layer: "
                f"it was trained on {saved_for or 'another model'}; load it into that architecture"
            )
        d_in, d_out = layer_dims(layer)
        targets[lname] = [d_out, d_in, layer_kind(layer)]
        state.update({f"{lname}.{k}": v for k, v in fmt.tensors_in(config, layer, local).items()})
    modules, saved_states = build_adapter(base, config, targets, state, directory, saved_for)
    return config, modules, saved_states


def _read_peft_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{directory} has no {CONFIG_NAME}: it is not a peft adapter folder")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        if isinstance(cfg, dict) and "format_version" in cfg:
            raise ValueError(f"{directory} is an orthotune adapter folder, not a peft one: load it with orthotune.load_adapter")
        raise ValueError(f"{path} has no peft_type: it is not a peft adapter config")
    return cfg


def _format_for(cfg: dict[str, Any], directory: Path) -> PeftFormat:
    supported = sorted({f.peft_type for f in FORMATS.values()})
    peft_type = cfg["peft_type"]
    for fmt in FORMATS.values():
        if fmt.peft_type == peft_type and fmt.claims(cfg):
            return fmt
    raise ValueError(
        f"{directory} holds a peft {peft_type!r} adapter, which orthotune cannot read; supported peft types: {supported}"
    )


def _read_peft_tensors(directory: Path) -> dict[str, Tensor]:
    if (directory / WEIGHTS_NAME).is_file():
        try:
            return load_file(str(directory / WEIGHTS_NAME))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{directory / WEIGHTS_NAME} is not a readable safetensors file ({err})") from err
    if (directory / PEFT_BIN_NAME).is_file():
        return torch.load(directory / PEFT_BIN_NAME, map_location="cpu", weights_only=True)
    raise ValueError(f"{directory} has neither {WEIGHTS_NAME} nor {PEFT_BIN_NAME}: the peft adapter has no weights")


def _split_tensors(tensors: dict[str, Tensor], fmt: PeftFormat, directory: Path) -> tuple[dict[str, dict], dict[str, Tensor]]:
    """peft keys -> ({module: {tensor name: tensor}}, {saved-module key: tensor}), every module complete."""
    per_module: dict[str, dict[str, Tensor]] = {}
    saved: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{directory}: tensor {key!r} does not start with {PEFT_PREFIX!r}: not a peft adapter file")
        key = key[len(PEFT_PREFIX):]
        name = next((n for n in fmt.tensor_names if key.endswith("." + n)), None)
        if name is None:
            saved[key] = value  # a modules_to_save tensor, or checked (and refused) as one by build_adapter
        else:
            per_module.setdefault(key[: -len(name) - 1], {})[name] = value
    for module, local in per_module.items():
        missing = sorted(set(fmt.tensor_names) - set(local))
        if missing:
            raise ValueError(f"{directory}: module {module!r} lacks peft tensors {missing}; the file is incomplete")
    if not per_module:
        raise ValueError(f"{directory} holds no {fmt.peft_type} tensors ({', '.join(fmt.tensor_names)})")
    return per_module, saved


# ---------------------------------------------------------------------------------------------- writing
def export_peft(model: OrthoModel, directory: str | Path, adapter_name: str) -> None:
    """Write one adapter as a peft folder (written atomically, like orthotune's own folders)."""
    config = model.configs.get(adapter_name)
    if config is None:
        raise ValueError(f"no adapter named {adapter_name!r}; adapters here: {sorted(model.configs)}")
    fmt = FORMATS.get(config.method)
    if fmt is None:
        raise ValueError(
            f"orthotune's {config.method!r} has no peft format to export to; exportable methods: {sorted(FORMATS)}. "
            "Save it with save_adapter(), or merge_and_unload() it for tools that read plain weights"
        )
    tensors: dict[str, Tensor] = {}
    layers = [(n, layer) for n, layer in model.adapter_layers() if adapter_name in layer.adapters]
    with torch.no_grad():
        for lname, layer in layers:
            for k, v in fmt.tensors_out(layer.adapters[adapter_name], layer.base_layer).items():
                tensors[f"{PEFT_PREFIX}{lname}.{k}"] = v
        for key, value in adapter_state_dict(model, adapter_name).items():
            if key.startswith(SAVED_PREFIX):
                tensors[PEFT_PREFIX + key[len(SAVED_PREFIX):]] = value
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    base_cfg = getattr(model.base_model, "config", None)
    peft_config = {
        **fmt.config_out(config),
        "target_modules": [n for n, _ in layers],
        "modules_to_save": config.modules_to_save,
        "fan_in_fan_out": all(layer.kind == "conv1d" for _, layer in layers),
        "task_type": None,
        "inference_mode": True,
        "base_model_name_or_path": getattr(base_cfg, "name_or_path", None) or None,
    }
    write_folder(directory, tensors, peft_config, {"format": "pt"}, checksum=False)
