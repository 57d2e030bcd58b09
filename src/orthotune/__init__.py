"""orthotune: structure-preserving parameter-efficient fine-tuning.

    model = orthotune.get_model(model, orthotune.LoCOConfig(target_modules=["query", "value"]))
    ...train...
    model.save_adapter("out/adapter")
    model = orthotune.load_adapter(fresh_model, "out/adapter")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .interop.auto import (
    AutoOrthoModel,
    AutoOrthoModelForCausalLM,
    AutoOrthoModelForFeatureExtraction,
    AutoOrthoModelForQuestionAnswering,
    AutoOrthoModelForSeq2SeqLM,
    AutoOrthoModelForSequenceClassification,
    AutoOrthoModelForTokenClassification,
)
from .interop.peft import read_peft
from .interop.peft_api import (
    get_layer_status,
    get_model_status,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from .interop.peft_model import OrthoModel, attach_loaded, ortho_class
from .layer.quantized import prepare_model_for_kbit_training
from .methods.boft import BOFTConfig
from .methods.config import AdapterConfig
from .methods.fourierft import FourierFTConfig
from .methods.goft import GOFTConfig
from .methods.hra import HRAConfig, orthogonality_loss as hra_orthogonality_loss
from .methods.loca.loca import LoCAConfig
from .methods.loca.schedule import LocationLearner
from .methods.loco import LoCO, LoCOConfig, approximation_error
from .methods.loft.rotation import LOFTConfig
from .methods.lora import LoRAConfig
from .methods.oft import OFTConfig
from .methods.pissa import PiSSAConfig
from .methods.psoft import PSOFTConfig
from .methods.registry import METHODS
from .methods.task_type import TaskType
from .model.adapter_model import AdapterModel
from .model.io import read_adapter
from .model.loftq import load_loftq_base, loftq_init, save_loftq_base
from .training.finite import check_finite, guard_finite
from .training.graphs import GraphedStep
from .training.rank_split import split_rank_by_width
from .training.reselect import add_rotation_stage
from .training.support_selection import select_supports
from .version import __version__

PeftModel = OrthoModel  # peft's name: PeftModel.from_pretrained(base, folder) reads the same


def get_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> OrthoModel:
    """Wrap ``model`` with one adapter: base weights frozen, the adapter (and modules_to_save) trainable."""
    return ortho_class(type(model))(model, config, adapter_name)


def get_peft_model(
    model: nn.Module,
    peft_config: AdapterConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    low_cpu_mem_usage: bool = False,
) -> OrthoModel:
    """peft's name and signature for :func:`get_model` (adapters of different methods always mix, so ``mixed``
    changes nothing). ``low_cpu_mem_usage=True`` leaves the adapter's parameters on the meta device, to be
    filled by ``set_peft_model_state_dict(..., low_cpu_mem_usage=True)``, as peft's does."""
    if autocast_adapter_dtype != peft_config.autocast_adapter_dtype:
        peft_config = peft_config.replace(autocast_adapter_dtype=autocast_adapter_dtype)
    if not low_cpu_mem_usage:
        return get_model(model, peft_config, adapter_name)
    wrapped = ortho_class(type(model))(model)
    wrapped.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=True)
    wrapped.set_adapter(adapter_name)
    return wrapped


def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> OrthoModel:
    """Load a saved adapter into ``model`` (a plain model or an OrthoModel) and activate it.

    Everything is validated before the model changes: a missing, corrupted, tampered or mismatched
    folder raises ValueError and leaves ``model`` as it was.
    """
    return attach_loaded(model, adapter_name, lambda base: read_adapter(base, directory))


def from_peft(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> OrthoModel:
    """Load an adapter folder saved by peft into orthotune's implementation of the same method.

    Supported peft types and options: :mod:`orthotune.interop.peft`; anything else raises a
    ValueError that names it, before ``model`` changes.
    """
    return attach_loaded(model, adapter_name, lambda base: read_peft(base, directory))


def loco_approximation_error(model: AdapterModel, adapter_name: str | None = None) -> dict[str, dict[str, float]]:
    """Per LoCO layer: the parallel approximation's gap to the exact chain, its bound, orthogonality."""
    name = adapter_name or model.active_adapter
    return {
        lname: approximation_error(layer.adapters[name])
        for lname, layer in model.adapter_layers()
        if isinstance(layer.adapters[name] if name in layer.adapters else None, LoCO)
    }



def __getattr__(name: str) -> Any:
    """``orthotune.OrthoTrainer`` (the HF Trainer saving adapter folders), imported on first use: ``import orthotune``
    does not import transformers."""
    if name == "OrthoTrainer":
        from .training.trainer import OrthoTrainer

        return OrthoTrainer
    raise AttributeError(f"module 'orthotune' has no attribute {name!r}")

__all__ = [
    "AdapterModel",
    "AutoOrthoModel",
    "AutoOrthoModelForCausalLM",
    "AutoOrthoModelForFeatureExtraction",
    "AutoOrthoModelForQuestionAnswering",
    "AutoOrthoModelForSeq2SeqLM",
    "AutoOrthoModelForSequenceClassification",
    "AutoOrthoModelForTokenClassification",
    "PeftModel",
    "TaskType",
    "get_layer_status",
    "get_model_status",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "set_peft_model_state_dict",
    "METHODS",
    "AdapterConfig",
    "FourierFTConfig",
    "LoCAConfig",
    "LocationLearner",
    "BOFTConfig",
    "GOFTConfig",
    "GraphedStep",
    "HRAConfig",
    "LOFTConfig",
    "OFTConfig",
    "PSOFTConfig",
    "hra_orthogonality_loss",
    "select_supports",
    "split_rank_by_width",
    "add_rotation_stage",
    "LoCOConfig",
    "LoRAConfig",
    "OrthoModel",
    "PiSSAConfig",
    "check_finite",
    "from_peft",
    "get_model",
    "guard_finite",
    "load_adapter",
    "load_loftq_base",
    "loftq_init",
    "loco_approximation_error",
    "prepare_model_for_kbit_training",
    "save_loftq_base",
]
