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
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..layer import quantized
from ..layer.adapter_layer import CONV_KINDS, base_weight_matrix, layer_dims, layer_kind
from ..methods.base import AdapterMethod
from ..methods.config import AdapterConfig
from ..methods.fourierft import fourier_locations
from ..methods.loft.supports import principal_basis
from ..methods.pissa import principal_factors
from ..methods.psoft import PSOFTConfig, lowrank_output_factor
from ..methods.registry import METHODS
from ..methods.task_type import TASK_HEADS, check_task_type, saved_patterns
from ..model.inject import iter_named_layers
from ..model.io import CONFIG_NAME, SAVED_PREFIX, WEIGHTS_NAME, adapter_state_dict, build_adapter, write_folder

if TYPE_CHECKING:
    from ..model.adapter_model import AdapterModel

PEFT_PREFIX = "base_model.model."
PEFT_BIN_NAME = "adapter_model.bin"
# The peft release whose format export_peft writes (peft reads it to pick a parameterisation, e.g. OFT's
# Cayley-Neumann series, which changed in 0.18).
PEFT_FORMAT_VERSION = "0.21.2"


@dataclass(frozen=True)
class PeftFormat:
    """How one orthotune method reads and writes one peft tuner's folders.

    ``claims(cfg)``: whether a peft config of ``peft_type`` is this method's (LORA folders are LoRA
    or PiSSA). ``config_in(cfg)``: orthotune config fields (targets are added by the caller),
    raising ValueError for any peft option without an equivalent. ``tensors_in(config, layer,
    tensors)``: the method's state for one base layer from peft's tensors of that module (keys
    ``tensor_names``, and those of ``optional_names`` the file has). ``config_out`` /
    ``tensors_out``: the reverse, for export. ``tensors_in`` and ``tensors_out`` raise ValueError
    for a layer peft's format cannot hold; the caller adds the module's name. ``fit_tensors(fields,
    per_module)``, where given, returns the config fields peft itself computes with for the tensors
    the file holds (where peft's loader departs from its config), warning when they differ.
    """

    method: str
    peft_type: str
    tensor_names: tuple[str, ...]
    claims: Callable[[dict[str, Any]], bool]
    config_in: Callable[[dict[str, Any]], dict[str, Any]]
    tensors_in: Callable[[AdapterConfig, nn.Module, dict[str, Tensor]], dict[str, Tensor]]
    config_out: Callable[[AdapterConfig], dict[str, Any]]
    tensors_out: Callable[[AdapterMethod, nn.Module], dict[str, Tensor]]
    optional_names: tuple[str, ...] = ()
    fit_tensors: Callable[[dict[str, Any], dict[str, dict[str, Tensor]]], dict[str, Any]] | None = None
    #: the tensor names of an nn.Embedding module, where peft names them differently
    embedding_names: tuple[str, ...] = ()


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
    "rank_pattern", "alpha_pattern",
    "eva_config", "corda_config", "lora_ga_config", "runtime_config",
}  # fmt: skip
# Inits that only set the starting A, B: the saved A, B are the whole adapter.
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva", "mica")


def _lora_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("target_parameters"):
        raise ValueError(
            f"this peft LoRA adapts parameters (target_parameters={cfg['target_parameters']!r}): load it with "
            "orthotune.interop.peft_params.load_peft_target_parameters(model, directory)"
        )
    _check_options(
        cfg, _LORA_READ, "plain LoRA: r, lora_alpha, lora_dropout, use_rslora, rank_pattern, alpha_pattern, modules_to_save"
    )
    return {
        "r": cfg["r"],
        "lora_alpha": cfg.get("lora_alpha", 8),
        "lora_dropout": cfg.get("lora_dropout", 0.0),
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "rank_pattern": cfg.get("rank_pattern") or {},
        "alpha_pattern": cfg.get("alpha_pattern") or {},
    }


def _is_pissa(cfg: dict[str, Any]) -> bool:
    """A LoRA whose init residualises the base weight in a form orthotune's PiSSA computes: PiSSA or OLoRA."""
    init = str(cfg.get("init_lora_weights", True)).lower()
    return init.startswith("pissa") or init == "olora"


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
    init = str(cfg["init_lora_weights"]).lower()
    if init == "olora":
        return {**_lora_fields(cfg), "factorization": "qr"}
    if init == "pissa":
        return {**_lora_fields(cfg), "svd_niter": None}
    niter = init.removeprefix("pissa_niter_")
    if not niter.isdigit():
        raise ValueError(f"init_lora_weights={init!r} is neither 'pissa' nor 'pissa_niter_K' (K a number), as peft requires")
    warnings.warn(
        f"init_lora_weights={init!r}: as peft does on loading this folder, the principal part A0, B0 is recomputed "
        f"by a new random sketch (torch.svd_lowrank, niter={niter}), so the model differs from the one saved by that "
        "sketch's error; for the exact model convert the folder to plain LoRA in peft (save_pretrained(path, "
        "path_initial_model_for_weight_conversion=...))",
        stacklevel=4,
    )
    return {**_lora_fields(cfg), "svd_niter": int(niter)}


def _lora_tensors_in(config: AdapterConfig, layer: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    _check_lora_kind(layer)
    if "lora_embedding_A" in tensors:  # peft's (r, vocab) and (dim, r): dW^T = B A; orthotune's dW = B' A' on (vocab, dim)
        return {"lora_A": tensors["lora_embedding_B"].T, "lora_B": tensors["lora_embedding_A"].T}
    A, B = tensors["lora_A.weight"], tensors["lora_B.weight"]
    return {"lora_A": A.reshape(A.shape[0], -1), "lora_B": B.reshape(B.shape[0], -1)}


def _check_lora_kind(layer: nn.Module) -> None:
    if layer_kind(layer) in CONV_KINDS.values() and layer.groups > 1:
        raise ValueError(
            f"it is a grouped convolution (groups={layer.groups}): peft's LoRA there adds a full (ungrouped) conv A, "
            "which is no update of the grouped weight (peft cannot merge it); orthotune's LoRA updates the grouped "
            "weight itself, so the two do not map across. Save it with save_adapter(), or merge_and_unload() it"
        )


def _pissa_tensors_in(config: AdapterConfig, layer: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    # peft recomputes A0, B0 from the base weights it is given, as it does on loading a PiSSA or OLoRA folder
    if config.factorization == "qr" and layer_kind(layer) != "linear":
        raise ValueError(
            f"peft's OLoRA factors the stored weight tensor as a matrix, which for a {layer_kind(layer)} is not the "
            "(d_out, d_in) map orthotune adapts; OLoRA folders load for nn.Linear layers only"
        )
    A0, B0 = principal_factors(
        base_weight_matrix(layer).detach(), config.r, config.scaling, config.svd_niter, config.factorization
    )
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
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
    }


def _pissa_config_out(config: AdapterConfig) -> dict[str, Any]:
    # B A - B0 A0 is a LoRA of rank 2r; the scale s is kept: alpha / r -> 2 alpha / 2r (sqrt(2) alpha with rsLoRA)
    factor = math.sqrt(2) if config.use_rslora else 2
    return {
        **_lora_config_out(config),
        "r": 2 * config.r,
        "lora_alpha": config.lora_alpha * factor,
        "rank_pattern": {k: 2 * v for k, v in config.rank_pattern.items()},
        "alpha_pattern": {k: v * factor for k, v in config.alpha_pattern.items()},
    }


def _peft_lora_shapes(A: Tensor, B: Tensor, layer: nn.Module) -> dict[str, Tensor]:
    _check_lora_kind(layer)
    kind = layer_kind(layer)
    if kind == "embedding":
        return {"lora_embedding_A": B.T, "lora_embedding_B": A.T}
    if kind in CONV_KINDS.values():  # peft's lora_A is a conv with the base kernel, lora_B a 1x1 conv
        A = A.reshape(A.shape[0], *layer.weight.shape[1:])
        B = B.reshape(B.shape[0], B.shape[1], *[1] * (layer.weight.dim() - 2))
    return {"lora_A.weight": A, "lora_B.weight": B}


def _lora_tensors_out(method: AdapterMethod, layer: nn.Module) -> dict[str, Tensor]:
    return _peft_lora_shapes(method.lora_A, method.lora_B, layer)


def _pissa_tensors_out(method: AdapterMethod, layer: nn.Module) -> dict[str, Tensor]:
    left, right = method.difference_factors()  # the update on W0 in either form; no cancellation in half precision
    return _peft_lora_shapes(left, right, layer)


# ---------------------------------------------------------------------------------------------- FourierFT
def _fourierft_config_in(cfg: dict[str, Any]) -> dict[str, Any]:
    read = {"n_frequency", "scaling", "random_loc_seed", "init_weights", "n_frequency_pattern"}
    _check_options(cfg, read, "n_frequency, scaling, random_loc_seed, n_frequency_pattern")
    return {
        "n_frequency": cfg["n_frequency"],
        "scaling": cfg.get("scaling", 150.0),
        "random_loc_seed": cfg.get("random_loc_seed", 777),
        "n_frequency_pattern": cfg.get("n_frequency_pattern") or {},
    }


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
        "n_frequency_pattern": dict(config.n_frequency_pattern),
    }


def _fourierft_tensors_out(method: AdapterMethod, layer: nn.Module) -> dict[str, Tensor]:
    if layer_kind(layer) not in ("linear", "conv1d"):
        raise ValueError(f"peft's FourierFT adapts Linear and Conv1D layers only: this adapter has a {type(layer).__name__} target")
    c = method.config
    if not torch.equal(method.locations.cpu(), fourier_locations(method.d_out, method.d_in, c.n_frequency, c.random_loc_seed)):
        raise ValueError(
            "this FourierFT adapter's cells are not peft's seeded draw (e.g. made by add_weighted_adapter(..., "
            "combination_type='cat')): peft recomputes the cells from random_loc_seed, so it cannot load them; "
            "save it with save_adapter() instead"
        )
    return {"fourierft_spectrum": method.spectrum}


# ---------------------------------------------------------------------------------------------- orthogonal
_OWN_FORMAT = "save the adapter with save_adapter(), or merge_and_unload() it for tools that read plain weights"


def _peft_kinds(layer: nn.Module, peft_type: str, kinds: tuple[str, ...]) -> None:
    """Refuse a layer peft's tuner cannot adapt (export only: peft's own folders never hold one)."""
    kind = layer_kind(layer)
    if kind not in kinds:
        names = {"linear": "Linear", "conv1d": "GPT-2 Conv1D", "conv2d": "Conv2d", "torch_conv1d": "Conv1d",
                 "conv3d": "Conv3d", "embedding": "Embedding"}  # fmt: skip
        raise ValueError(
            f"peft's {peft_type} adapts {' and '.join(names[k] for k in kinds)} layers only, this is a {names[kind]}: "
            + _OWN_FORMAT
        )
    if kind == "conv2d" and layer.groups > 1:
        raise ValueError(f"peft's {peft_type} takes a Conv2d's input as all C_in channels, this one is grouped: " + _OWN_FORMAT)
    if kind == "conv2d" and layer.kernel_size[0] != layer.kernel_size[1]:
        raise ValueError(
            f"peft 0.21's {peft_type} takes Conv2d kernels to be square (kernel_size[0] twice), this one is "
            f"{tuple(layer.kernel_size)}: " + _OWN_FORMAT
        )


def _warn_oft_conv(layer: nn.Module) -> None:
    if layer_kind(layer) == "conv2d" and tuple(layer.kernel_size) != (1, 1):
        warnings.warn(
            "peft 0.21's unmerged OFT forward on a Conv2d with a kernel larger than 1x1 is not its merged model (it "
            "rotates stride-1 unpadded patches and sums them back, so even its identity start changes the output); "
            "orthotune computes peft's merged model, W0 R, as merge_and_unload() gives it in peft"
        )


def _version(text: str | None) -> tuple[int, int]:
    parts = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(parts[1]), int(parts[2])) if parts else (0, 0)


# peft's defaults where a folder lacks a field (oft_block_size is required, as peft requires it)
_OFT_DEFAULTS = {
    "r": 0, "use_cayley_neumann": True, "num_cayley_neumann_terms": 5, "block_share": False, "module_dropout": 0.0,
}  # fmt: skip


def _oft_config_in(cfg: dict[str, Any]) -> dict[str, Any]:
    names = ["oft_block_size", *_OFT_DEFAULTS]
    _check_options(cfg, {*names, "eps", "init_weights"}, ", ".join(names))
    if "oft_block_size" not in cfg:
        raise ValueError(
            "this peft OFT adapter predates peft 0.14 (its config has no oft_block_size), whose OFT parameterisation "
            "peft itself no longer reads; merge it with peft 0.13 or retrain it"
        )
    fields = {"oft_block_size": cfg["oft_block_size"], **{k: cfg.get(k, v) for k, v in _OFT_DEFAULTS.items()}}
    if fields["use_cayley_neumann"] and _version(cfg.get("peft_version")) < (0, 18):
        warnings.warn(
            f"this peft OFT adapter was trained with the Cayley-Neumann series of peft < 0.18 (peft_version="
            f"{cfg.get('peft_version')!r}), which peft 0.18 changed (its last term). peft 0.21 loads it with the new "
            "series, and so does orthotune: outputs differ slightly from those it was trained with. For the exact "
            "old model, merge it with the peft that trained it (merge_and_unload)",
            stacklevel=4,
        )
    return fields


def _oft_fit_tensors(fields: dict[str, Any], per_module: dict[str, dict[str, Tensor]]) -> dict[str, Any]:
    """peft adjusts an oft_block_size that does not divide a layer's input to the nearest divisor ('Invalid
    oft_block_size' warning); where every module got the same block size, that is the size it computes with."""
    blocks = [local.get("oft_R.weight", local.get("oft_embedding_R.weight")) for local in per_module.values()]
    sizes = {round((1 + math.sqrt(1 + 8 * R.shape[-1])) / 2) for R in blocks}  # R holds each block's b(b-1)/2 entries
    b = fields["oft_block_size"]
    if b and len(sizes) == 1 and b not in sizes:
        (adjusted,) = sizes
        warnings.warn(
            f"this peft OFT folder's config says oft_block_size={b}, its oft_R tensors hold blocks of size {adjusted}: "
            f"peft adjusted the size to a divisor of the layers' inputs. Loading it with oft_block_size={adjusted}, "
            "the model peft computes",
            stacklevel=4,
        )
        return {**fields, "oft_block_size": adjusted}
    return fields


def _oft_sign(config: AdapterConfig, layer: nn.Module) -> float:
    # peft's Neumann series approximates the transpose of its exact rotation, orthotune's its own exact one.
    # peft rotates rows (x R_p): on a linear layer that is orthotune's R = R_p^T, on an Embedding (whose rows
    # are the outputs e, turned into e R) it is R = R_p, the transpose: the sign flips
    sign = -1.0 if config.use_cayley_neumann else 1.0
    return -sign if layer_kind(layer) == "embedding" else sign


def _oft_tensors_in(config: AdapterConfig, layer: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    weight = tensors["oft_embedding_R.weight" if "oft_embedding_R.weight" in tensors else "oft_R.weight"]
    d_in, _ = layer_dims(layer)
    b = config.block(d_in)
    expected = (1 if config.block_share else d_in // b, b * (b - 1) // 2)
    if (config.r and d_in % config.r) or d_in % b or tuple(weight.shape) != expected:
        theirs = round((1 + math.sqrt(1 + 8 * weight.shape[-1])) / 2)
        raise ValueError(
            f"its oft_R holds blocks of size {theirs} where the config gives {b} for an input of {d_in}: peft "
            "adjusted r / oft_block_size on this layer ('Invalid oft_block_size' warning). orthotune uses one block "
            f"size for every layer and needs a divisor of each input size: retrain with e.g. oft_block_size={theirs} "
            "if it divides every target"
        )
    _warn_oft_conv(layer)
    return {"transform.weight": _oft_sign(config, layer) * weight}


def _oft_config_out(config: AdapterConfig) -> dict[str, Any]:
    fields = {k: getattr(config, k) for k in ["oft_block_size", *_OFT_DEFAULTS]}
    return {"peft_type": "OFT", **fields, "coft": False, "eps": 6e-5, "init_weights": True, "bias": "none"}


def _oft_tensors_out(method: AdapterMethod, layer: nn.Module) -> dict[str, Tensor]:
    _peft_kinds(layer, "OFT", ("linear", "conv2d", "embedding"))
    _warn_oft_conv(layer)
    key = "oft_embedding_R.weight" if layer_kind(layer) == "embedding" else "oft_R.weight"
    return {key: _oft_sign(method.config, layer) * method.transform.weight}


_BOFT_DEFAULTS = {"boft_block_size": 4, "boft_block_num": 0, "boft_n_butterfly_factor": 1, "boft_dropout": 0.0}


def _boft_config_in(cfg: dict[str, Any]) -> dict[str, Any]:
    _check_options(cfg, {*_BOFT_DEFAULTS, "init_weights"}, ", ".join(_BOFT_DEFAULTS))
    return {k: cfg.get(k, v) for k, v in _BOFT_DEFAULTS.items()}


def _boft_fit_tensors(fields: dict[str, Any], per_module: dict[str, dict[str, Tensor]]) -> dict[str, Any]:
    """peft without its CUDA extension builds (and loads) BOFT with one butterfly factor whatever its config
    says; a folder it saved so holds one factor per module, and peft computes with that one."""
    m = fields["boft_n_butterfly_factor"]
    if m > 1 and all(local["boft_R"].shape[0] == 1 for local in per_module.values()):
        warnings.warn(
            f"this peft BOFT folder's config says boft_n_butterfly_factor={m}, its boft_R tensors hold 1 factor: peft "
            "built it without its CUDA extension, which uses one factor (and so does peft on loading it without the "
            "extension). Loading it with boft_n_butterfly_factor=1, the model peft trained and computes",
            stacklevel=4,
        )
        return {**fields, "boft_n_butterfly_factor": 1}
    return fields


def _boft_tensors_in(config: AdapterConfig, layer: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    R, s = tensors["boft_R"], tensors["boft_s"]  # an old checkpoint's boft_P is peft's fixed permutations
    return {"transform.weight": R, "boft_s": s.reshape(-1, 1)}  # peft's Conv2d keeps s as (1, d_out)


def _boft_config_out(config: AdapterConfig) -> dict[str, Any]:
    return {"peft_type": "BOFT", **{k: getattr(config, k) for k in _BOFT_DEFAULTS}, "init_weights": True, "bias": "none"}


def _boft_tensors_out(method: AdapterMethod, layer: nn.Module) -> dict[str, Tensor]:
    _peft_kinds(layer, "BOFT", ("linear", "conv2d"))
    s = method.boft_s.reshape(1, -1) if layer_kind(layer) == "conv2d" else method.boft_s
    return {"boft_R": method.transform.weight, "boft_s": s}


def _hra_config_in(cfg: dict[str, Any]) -> dict[str, Any]:
    _check_options(cfg, {"r", "apply_GS", "init_weights"}, "r, apply_GS")
    r, gs = cfg.get("r", 8), cfg.get("apply_GS", False)
    return {"r": r, "apply_GS": gs, "init_identity": not (gs or r % 2)}  # only orthotune's init checks it


def _hra_config_out(config: AdapterConfig) -> dict[str, Any]:
    return {"peft_type": "HRA", "r": config.r, "apply_GS": config.apply_GS, "init_weights": True, "bias": "none"}


def _hra_tensors_out(method: AdapterMethod, layer: nn.Module) -> dict[str, Tensor]:
    _peft_kinds(layer, "HRA", ("linear", "conv2d"))
    return {"hra_u": method.transform.u}


_PSOFT_FIELDS = (
    "r", "psoft_orth", "psoft_mag_a", "psoft_mag_b", "use_cayley_neumann", "num_cayley_neumann_terms",
    "cayley_neumann_eps", "psoft_dropout",
)  # fmt: skip
_PSOFT_VECTORS = ("vector_a", "vector_b")
_PSOFT_SVD = ("psoft_svd", "psoft_svd_lowrank_niter", "random_seed")


def _psoft_config_in(cfg: dict[str, Any]) -> dict[str, Any]:
    read = {*_PSOFT_FIELDS, *_PSOFT_SVD, "psoft_alpha", "ab_svd_init", "init_weights"}
    _check_options(cfg, read, ", ".join(_PSOFT_FIELDS + _PSOFT_SVD) + " (psoft_alpha cancels out)")
    if cfg.get("ab_svd_init", "psoft_init") != "psoft_init":
        raise ValueError(
            f"the peft PSOFT option ab_svd_init={cfg['ab_svd_init']!r} splits the singular values between A and B, so "
            "its update is not a map of W0 inside the principal subspace, which orthotune's PSOFT is; merge it in peft "
            "(merge_and_unload) or train with ab_svd_init='psoft_init'"
        )
    defaults = PSOFTConfig()
    return {k: cfg.get(k, getattr(defaults, k)) for k in _PSOFT_FIELDS + _PSOFT_SVD}


def _psoft_factors(config: AdapterConfig, layer: nn.Module) -> dict[str, Tensor]:
    """The fixed factors peft recomputes from the base weights on loading, by its same SVD: the subspace ``A^T``
    and, for ``psoft_svd="lowrank"``, the output factor ``scaling * B``."""
    W = base_weight_matrix(layer)
    c = config
    out = {"support.P": principal_basis(W, c.r, c.psoft_svd, c.psoft_svd_lowrank_niter, c.random_seed)}
    if c.psoft_svd == "lowrank":
        out["output_factor"] = lowrank_output_factor(W, c)
    return out


def _psoft_tensors_in(config: AdapterConfig, layer: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    state = {**_psoft_factors(config, layer), "transform.weight": tensors["psoft_R.weight"]}
    for v in _PSOFT_VECTORS:
        if f"psoft_R.{v}" in tensors:
            state[f"transform.{v}"] = tensors[f"psoft_R.{v}"]
    return state


def _psoft_config_out(config: AdapterConfig) -> dict[str, Any]:
    eps = config.cayley_neumann_eps
    if config.use_cayley_neumann and eps is not None and eps >= 1:
        raise ValueError(
            f"peft's PSOFT takes cayley_neumann_eps in (0, 1), this adapter has {eps}: export_peft would write a folder "
            "peft refuses; save it with save_adapter(), or train with a bound below 1"
        )
    return {
        "peft_type": "PSOFT",
        **{k: getattr(config, k) for k in _PSOFT_FIELDS + _PSOFT_SVD},
        "psoft_alpha": config.r,  # cancels out of the update; r makes peft's scaling exactly 1
        "ab_svd_init": "psoft_init",
        "init_weights": True,
    }


def _psoft_tensors_out(method: AdapterMethod, layer: nn.Module) -> dict[str, Tensor]:
    _peft_kinds(layer, "PSOFT", ("linear",))
    # peft recomputes the factors from the base weights; T acts in its basis, which may differ from the stored one
    # by column signs D (another SVD backend): D T D then is the same map, and the skew weights change sign likewise
    theirs = _psoft_factors(method.config, layer)
    overlap = method.support.P.T.float() @ theirs["support.P"]
    d = torch.sign(torch.diagonal(overlap))
    same = torch.allclose(overlap, torch.diag(d), atol=1e-4)
    if same and "output_factor" in theirs:  # and B's columns flip with A's rows
        B = method.output_factor.float() * d
        same = bool(torch.linalg.matrix_norm(B - theirs["output_factor"]) <= 1e-4 * torch.linalg.matrix_norm(B))
    if not same:
        raise ValueError(
            "its principal subspace is not the one peft recomputes from this layer's weights (they changed since the "
            "adapter was created, or it is merged, or its lowrank SVD ran on another device): unmerge() first, or "
            "export with the base model it was created on, on that device"
        )
    tr = method.transform
    out = {f"psoft_R.{v}": getattr(tr, v) for v in _PSOFT_VECTORS if getattr(tr, v) is not None}
    signs = torch.outer(d, d).to(tr.weight)
    out["psoft_R.weight"] = tr.weight * (signs[tr.rows, tr.cols] if method.config.psoft_orth else signs)
    return out


FORMATS: dict[str, PeftFormat] = {
    "lora": PeftFormat(
        "lora", "LORA", ("lora_A.weight", "lora_B.weight"), lambda c: not _is_pissa(c),
        _lora_config_in, _lora_tensors_in, _lora_config_out, _lora_tensors_out,
        embedding_names=("lora_embedding_A", "lora_embedding_B"),
    ),
    "pissa": PeftFormat(
        "pissa", "LORA", ("lora_A.weight", "lora_B.weight"), _is_pissa,
        _pissa_config_in, _pissa_tensors_in, _pissa_config_out, _pissa_tensors_out,
        embedding_names=("lora_embedding_A", "lora_embedding_B"),
    ),
    "fourierft": PeftFormat(
        "fourierft", "FOURIERFT", ("fourierft_spectrum",), lambda c: True,
        _fourierft_config_in, _fourierft_tensors_in, _fourierft_config_out, _fourierft_tensors_out,
    ),
    "oft": PeftFormat(
        "oft", "OFT", ("oft_R.weight",), lambda c: True,
        _oft_config_in, _oft_tensors_in, _oft_config_out, _oft_tensors_out, fit_tensors=_oft_fit_tensors,
        embedding_names=("oft_embedding_R.weight",),
    ),
    "boft": PeftFormat(
        "boft", "BOFT", ("boft_R", "boft_s"), lambda c: True,
        _boft_config_in, _boft_tensors_in, _boft_config_out, _boft_tensors_out, optional_names=("boft_P",),
        fit_tensors=_boft_fit_tensors,
    ),
    "hra": PeftFormat(
        "hra", "HRA", ("hra_u",), lambda c: True,
        _hra_config_in, lambda config, layer, t: {"transform.u": t["hra_u"]}, _hra_config_out, _hra_tensors_out,
    ),
    "psoft": PeftFormat(
        "psoft", "PSOFT", ("psoft_R.weight",), lambda c: True,
        _psoft_config_in, _psoft_tensors_in, _psoft_config_out, _psoft_tensors_out,
        optional_names=tuple(f"psoft_R.{v}" for v in _PSOFT_VECTORS),
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------- reading
def read_peft(
    base: nn.Module, directory: str | Path, low_cpu_mem_usage: bool = False
) -> tuple[AdapterConfig, dict[str, nn.Module], dict[str, dict]]:
    """Validate a peft folder against ``base`` and build orthotune modules for it; touches nothing in ``base``.

    Returns what :func:`orthotune.model.io.read_adapter` returns, for :func:`orthotune.interop.peft_model.attach_loaded`
    (``low_cpu_mem_usage`` as there).
    """
    directory = Path(directory)
    cfg = _read_peft_config(directory)
    fmt = _format_for(cfg, directory)
    fields = fmt.config_in(cfg)  # refuses unsupported options before the tensors are read
    tensors = _read_peft_tensors(directory)
    per_module, saved = split_peft_tensors(tensors, fmt, directory)
    if fmt.fit_tensors is not None:
        fields = fmt.fit_tensors(fields, per_module)
    task_type = cfg.get("task_type")
    check_task_type(task_type)
    heads = TASK_HEADS.get(task_type or "", ())  # peft wrote them into modules_to_save; only they may match nothing
    own = [m for m in cfg.get("modules_to_save") or [] if m not in heads]
    config = METHODS[fmt.method][0](
        target_modules=sorted(per_module), modules_to_save=list(dict.fromkeys(own)) or None, task_type=task_type, **fields
    )
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
        try:
            local = fmt.tensors_in(config.for_layer(lname), layer, local)
        except ValueError as err:
            raise ValueError(f"{directory}, module {lname!r}: {err}") from None
        state.update({f"{lname}.{k}": v for k, v in local.items()})
    modules, saved_states = build_adapter(base, config, targets, state, directory, saved_for, low_cpu_mem_usage)
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


def split_peft_tensors(
    tensors: dict[str, Tensor], fmt: PeftFormat, source: str | Path
) -> tuple[dict[str, dict], dict[str, Tensor]]:
    """peft keys (a file's, or ``get_peft_model_state_dict``'s) -> ({module: {tensor name: tensor}},
    {saved-module key: tensor}), every module with all of ``fmt.tensor_names``; ``source`` names them in errors."""
    per_module: dict[str, dict[str, Tensor]] = {}
    saved: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{source}: tensor {key!r} does not start with {PEFT_PREFIX!r}: not a peft adapter file")
        key = key[len(PEFT_PREFIX):]
        name = next((n for n in fmt.tensor_names + fmt.optional_names + fmt.embedding_names if key.endswith("." + n)), None)
        if name is None:
            saved[key] = value  # a modules_to_save tensor, or checked (and refused) as one by build_adapter
        else:
            per_module.setdefault(key[: -len(name) - 1], {})[name] = value
    for module, local in per_module.items():
        embedding = bool(set(fmt.embedding_names) & set(local))
        missing = sorted(set(fmt.embedding_names if embedding else fmt.tensor_names) - set(local))
        if missing:
            raise ValueError(f"{source}: module {module!r} lacks peft tensors {missing}; the file is incomplete")
    if not per_module:
        raise ValueError(f"{source} holds no {fmt.peft_type} tensors ({', '.join(fmt.tensor_names)})")
    return per_module, saved


# ---------------------------------------------------------------------------------------------- writing
def export_peft(model: AdapterModel, directory: str | Path, adapter_name: str) -> None:
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
    peft_config = fmt.config_out(config)  # refuses options peft's format cannot express, before the tensors
    for pfield in config.patterns:
        if getattr(config, pfield) and pfield not in peft_config:
            raise ValueError(
                f"peft's {peft_config['peft_type']} has no {pfield}: this adapter's per-module sizes cannot be written in "
                "its format; save it with save_adapter(), or merge_and_unload() it for tools that read plain weights"
            )
    tensors: dict[str, Tensor] = {}
    layers = [(n, layer) for n, layer in model.adapter_layers() if adapter_name in layer.adapters]
    own = [n for n, layer in layers if quantized.has_own_base(layer.base_layer)]
    if own:
        warnings.warn(
            f"adapter {adapter_name!r} was started by loftq_init(iterations > 1) on {len(own)} re-quantised layers, which "
            "a peft folder cannot carry: it matches only that base (orthotune.save_loftq_base), not the checkpoint "
            "quantised afresh; for other tools merge_and_unload(dequantize=torch.bfloat16) instead",
            stacklevel=3,
        )
    with torch.no_grad():
        for lname, layer in layers:
            try:
                local = fmt.tensors_out(layer.adapters[adapter_name], layer.base_layer)
            except ValueError as err:
                raise ValueError(f"cannot export adapter {adapter_name!r} to peft, module {lname!r}: {err}") from None
            tensors.update({f"{PEFT_PREFIX}{lname}.{k}": v for k, v in local.items()})
        for key, value in adapter_state_dict(model, adapter_name).items():
            if key.startswith(SAVED_PREFIX):
                tensors[PEFT_PREFIX + key[len(SAVED_PREFIX):]] = value
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    base_cfg = getattr(model.base_model, "config", None)
    peft_config.update(
        target_modules=[n for n, _ in layers],
        modules_to_save=[p for ps in saved_patterns(config) for p in ps] or None,
        task_type=config.task_type,
        inference_mode=True,
        base_model_name_or_path=getattr(base_cfg, "name_or_path", None) or None,
        peft_version=PEFT_FORMAT_VERSION,
    )
    if all(layer.kind == "conv1d" for _, layer in layers):  # GPT-2 Conv1D (not every peft config has the field)
        peft_config["fan_in_fan_out"] = True
    write_folder(directory, tensors, peft_config, {"format": "pt"}, checksum=False)
