"""orthotune: structure-preserving parameter-efficient fine-tuning.

    model = orthotune.get_model(model, orthotune.LoCOConfig(target_modules=["query", "value"]))
    ...train...
    model.save_adapter("out/adapter")
    model = orthotune.load_adapter(fresh_model, "out/adapter")
"""

from __future__ import annotations

__version__ = "0.1.0"

from pathlib import Path  # noqa: E402

from torch import nn  # noqa: E402

from .config import AdapterConfig  # noqa: E402
from .finite import check_finite, guard_finite  # noqa: E402
from .graphs import GraphedStep  # noqa: E402
from .loca_schedule import LocationLearner  # noqa: E402
from .methods.fourierft import FourierFTConfig  # noqa: E402
from .methods.loca import LoCAConfig  # noqa: E402
from .methods.loco import LoCOConfig, approximation_error  # noqa: E402
from .methods.lora import LoRAConfig  # noqa: E402
from .methods.pissa import PiSSAConfig  # noqa: E402
from .methods.boft import BOFTConfig  # noqa: E402
from .methods.goft import GOFTConfig  # noqa: E402
from .methods.hra import HRAConfig, orthogonality_loss as hra_orthogonality_loss  # noqa: E402
from .methods.loft import LOFTConfig  # noqa: E402
from .methods.oft import OFTConfig  # noqa: E402
from .methods.psoft import PSOFTConfig  # noqa: E402
from .model import OrthoModel, attach_loaded, ortho_class  # noqa: E402
from .quantized import prepare_model_for_kbit_training  # noqa: E402
from .registry import METHODS  # noqa: E402
from .supports import select_supports  # noqa: E402


def get_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> OrthoModel:
    """Wrap ``model`` with one adapter: base weights frozen, the adapter (and modules_to_save) trainable."""
    return ortho_class(type(model))(model, config, adapter_name)


def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> OrthoModel:
    """Load a saved adapter into ``model`` (a plain model or an OrthoModel) and activate it.

    Everything is validated before the model changes: a missing, corrupted, tampered or mismatched
    folder raises ValueError and leaves ``model`` as it was.
    """
    from .io import read_adapter

    return attach_loaded(model, adapter_name, lambda base: read_adapter(base, directory))


def from_peft(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> OrthoModel:
    """Load an adapter folder saved by peft into orthotune's implementation of the same method.

    Supported peft types and options: :mod:`orthotune.interop.peft`; anything else raises a
    ValueError that names it, before ``model`` changes.
    """
    from .interop.peft import read_peft

    return attach_loaded(model, adapter_name, lambda base: read_peft(base, directory))


def loco_approximation_error(model: OrthoModel, adapter_name: str | None = None) -> dict[str, dict[str, float]]:
    """Per LoCO layer: the parallel approximation's gap to the exact chain, its bound, orthogonality."""
    from .methods.loco import LoCO

    name = adapter_name or model.active_adapter
    return {
        lname: approximation_error(layer.adapters[name])
        for lname, layer in model.adapter_layers()
        if isinstance(layer.adapters[name] if name in layer.adapters else None, LoCO)
    }


__all__ = [
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
    "LoCOConfig",
    "LoRAConfig",
    "OrthoModel",
    "PiSSAConfig",
    "check_finite",
    "from_peft",
    "get_model",
    "guard_finite",
    "load_adapter",
    "loco_approximation_error",
    "prepare_model_for_kbit_training",
]
