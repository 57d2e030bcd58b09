"""Import timm (and with it torchvision) safely where torchvision's compiled ops cannot load.

``pip install torch==<cpu build> torchvision`` can pair a CPU torch with a CUDA build of
torchvision whose ``_C.so`` needs the CUDA torch libraries: ``import torchvision`` then dies in
``_meta_registrations`` ("operator torchvision::nms does not exist"), and so do ``import timm`` and
every transformers import that touches its image utilities (peft's included). Declaring the two
operator schemas that module registers fake kernels for lets torchvision import; its compiled ops
(``nms``...) stay unavailable, which neither timm's models nor orthotune use. Where ``_C.so`` loads,
as on a matching CUDA install, nothing is changed.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch

_SHIM: torch.library.Library | None = None
_CHECKED = False


def ensure_torchvision_importable() -> None:
    """Run before the first ``import torchvision`` (directly or through timm / transformers)."""
    global _SHIM, _CHECKED
    if _CHECKED:
        return
    _CHECKED = True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.origin:
        return
    try:
        torch.ops.load_library(os.path.join(os.path.dirname(spec.origin), "_C.so"))
    except (OSError, RuntimeError):
        _SHIM = torch.library.Library("torchvision", "DEF")
        _SHIM.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _SHIM.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def import_timm() -> ModuleType:
    """``timm``, imported after :func:`ensure_torchvision_importable`; a clear error if it is missing."""
    ensure_torchvision_importable()
    try:
        import timm
    except ImportError as err:
        raise ImportError("the image recipes need timm: pip install 'orthotune[vision]'") from err
    return timm
