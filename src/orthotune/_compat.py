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
    import torch

    # torchvision < 0.29 ships its ops as _C.so, 0.29 as _C_stable.so (loading it twice is a no-op)
    folder = os.path.dirname(spec.origin)
    extensions = [path for name in ("_C.so", "_C_stable.so") if os.path.exists(path := os.path.join(folder, name))]
    try:
        for path in extensions or [os.path.join(folder, "_C.so")]:
            torch.ops.load_library(path)
    except (OSError, RuntimeError):
        _LIBRARY = torch.library.Library("torchvision", "DEF")
        _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
