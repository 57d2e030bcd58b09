"""Method name -> (config class, module class): the only place a method is registered.

Adding a method costs one file in ``methods/`` and one line here; the shared contract tests in
``tests/methods/test_contract.py`` pick it up from :data:`METHODS`.
"""

from __future__ import annotations

from .base import AdapterMethod
from .boft import BOFT, BOFTConfig
from .config import AdapterConfig
from .fourierft import FourierFT, FourierFTConfig
from .goft import GOFT, GOFTConfig
from .hra import HRA, HRAConfig
from .loca.loca import LoCA, LoCAConfig
from .loco import LoCO, LoCOConfig
from .loft.rotation import LOFT, LOFTConfig
from .lora import LoRA, LoRAConfig
from .oft import OFT, OFTConfig
from .pissa import PiSSA, PiSSAConfig
from .psoft import PSOFT, PSOFTConfig

METHODS: dict[str, tuple[type[AdapterConfig], type[AdapterMethod]]] = {
    "loco": (LoCOConfig, LoCO),
    "lora": (LoRAConfig, LoRA),
    "pissa": (PiSSAConfig, PiSSA),
    "loca": (LoCAConfig, LoCA),
    "fourierft": (FourierFTConfig, FourierFT),
    "loft": (LOFTConfig, LOFT),
    "oft": (OFTConfig, OFT),
    "boft": (BOFTConfig, BOFT),
    "hra": (HRAConfig, HRA),
    "psoft": (PSOFTConfig, PSOFT),
    "goft": (GOFTConfig, GOFT),
}


def method_class(config: AdapterConfig) -> type[AdapterMethod]:
    """The module class that implements ``config``'s method."""
    try:
        return METHODS[config.method][1]
    except KeyError:
        raise ValueError(f"unknown method {config.method!r}; registered methods: {sorted(METHODS)}") from None


def config_from_dict(data: dict) -> AdapterConfig:
    """Rebuild any registered method's config from its JSON form."""
    name = data.get("method")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} in adapter config; registered methods: {sorted(METHODS)}")
    return METHODS[name][0].from_dict(data)
