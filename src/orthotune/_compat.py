"""Work around a torchvision whose compiled ops cannot load (a CUDA build next to a CPU torch).

``pip install torch==2.13.0 torchvision`` on a CPU machine pairs the CPU torch with a CUDA build of
torchvision; importing it then fails on two operator registrations, and so do timm and parts of
transformers that import it. Declaring the two operator schemas before torchvision's first import
lets everything but the compiled ops (e.g. nms) work. Where the extension loads, nothing changes.
"""

from __future__ import annotations

import importlib.util
import os
import sys

_LIBRARY = None


def patch_torchvision() -> None:
    """Make ``import torchvision`` work when its compiled extension does not match torch."""
    global _LIBRARY
    if _LIBRARY is not None or "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.origin:
        return
    library = os.path.join(os.path.dirname(spec.origin), "_C.so")
    if not os.path.exists(library):  # torchvision >= 0.29 ships _C_stable.so, which registers its ops itself
        return
    import torch

    try:
        torch.ops.load_library(library)
    except (OSError, RuntimeError):
        _LIBRARY = torch.library.Library("torchvision", "DEF")
        _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
