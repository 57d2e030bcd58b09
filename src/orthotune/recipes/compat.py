"""Import timm (the image recipes' ViT), naming the fix when its torchvision does not match torch.

timm imports torchvision. A torchvision built for another torch (``pip install torch==2.13.0`` takes
a CPU build; PyPI's torchvision 0.28.0 is a CUDA build for another torch) fails on import with
``operator torchvision::nms does not exist``, in timm and in anything else that imports it. The fix
is a matching pair, not a patch: ``pip install torch==2.14.1 torchvision==0.29.1`` (README, Set-up).
"""

from __future__ import annotations

from types import ModuleType

MATCHING_PAIR = "pip install torch==2.14.1 torchvision==0.29.1"


def import_timm() -> ModuleType:
    """``timm``; a clear error if it is missing or its torchvision was built for another torch."""
    try:
        import timm
    except ImportError as err:
        raise ImportError("the image recipes need timm: pip install 'orthotune[vision]'") from err
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        import torch

        raise ImportError(
            f"torchvision does not match torch {torch.__version__} ({err}): timm, which the image recipes use, "
            f"imports it. Install a matching pair, e.g. {MATCHING_PAIR} (see README, Set-up)"
        ) from err
    return timm
