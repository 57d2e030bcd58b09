"""peft LoRA folders saved with ``target_parameters`` (adapters on bare MoE expert weights) in, as per-expert orthotune LoRA adapters (:mod:`orthotune.model.param_targets`)."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from ..methods.lora import LoRAConfig
from ..model.param_targets import add_param_adapter, fill_param_adapters, param_adapters, unload_param_adapters
from .peft import _lora_config_in, _read_peft_config, _read_peft_tensors


def load_peft_target_parameters(model: nn.Module, directory: str | Path) -> list[str]:
    """Load a peft LoRA folder saved with ``target_parameters`` (and no ``target_modules`` tensors) as
    per-expert orthotune LoRA adapters computing what peft computes."""
    directory = Path(directory)
    cfg = _read_peft_config(directory)
    targets = cfg.get("target_parameters") or []
    if cfg.get("peft_type") != "LORA" or not targets:
        raise ValueError(f"{directory} is not a peft LoRA folder with target_parameters; load it with orthotune.from_peft")
    fields = _lora_config_in({k: v for k, v in cfg.items() if k not in ("target_parameters", "target_modules")})
    if fields["rank_pattern"] or fields["alpha_pattern"]:
        raise ValueError("rank_pattern/alpha_pattern with target_parameters are not supported; use one r and lora_alpha")
    config = LoRAConfig(r=fields["r"], lora_alpha=fields["lora_alpha"], use_rslora=fields["use_rslora"])
    tensors = {k.removeprefix("base_model.model."): v for k, v in _read_peft_tensors(directory).items()}
    names = add_param_adapter(model, config, targets)
    state = _peft_lora_state(model, names, tensors, directory)
    fill_param_adapters(model, state, directory)
    return names


def _peft_lora_state(model: nn.Module, names: list[str], tensors: dict[str, Tensor], source: Path) -> dict[str, Tensor]:
    """peft's nested ParamWrapper tensors mapped onto per-expert LoRA: peft wraps a module's parameters in their
    registration order (``names``' order), so the first is innermost (``base_layer.`` once per wrapper around it); ``lora_A`` (r E, in) rows are expert-major,
    ``lora_B`` (out, r E) columns rank-major."""
    by_module: dict[str, list[str]] = {}
    for full in names:
        by_module.setdefault(full.rpartition(".")[0], []).append(full)
    state: dict[str, Tensor] = {}
    used: set[str] = set()
    for module, fulls in by_module.items():
        for depth, full in enumerate(fulls):
            prefix = f"{module}." + "base_layer." * (len(fulls) - 1 - depth)
            keys = (prefix + "lora_A.weight", prefix + "lora_B.weight")
            if any(k not in tensors for k in keys):
                raise ValueError(f"{source} holds no LoRA tensors for {full!r} (looked for {keys[0]!r})")
            A, B = (tensors[k] for k in keys)
            used.update(keys)
            adapters = dict(param_adapters(model))[full]
            E, r = len(adapters.experts), adapters.config.r
            A_e = A.reshape(E, r, A.shape[-1])
            B_e = B.reshape(B.shape[0], r, E)
            for e in range(E):
                state[f"{full}.{e}.lora_A"] = A_e[e]
                state[f"{full}.{e}.lora_B"] = B_e[:, :, e]
    left = sorted(set(tensors) - used)
    if left:
        unload_param_adapters(model, merge=False)
        raise ValueError(
            f"{source} also holds tensors of target_modules {left[:3]}: load those with orthotune.from_peft, which "
            "does not read target_parameters; a folder with both is not supported"
        )
    return state
