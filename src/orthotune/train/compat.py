"""Import timm safely: torchvision (which timm imports) is patched first where its ops cannot load.

See :mod:`orthotune._compat`: a CUDA build of torchvision next to a CPU torch fails on import
unless two operator schemas are declared before it; ``import orthotune`` does that, and this helper
does it again for code that reaches timm by another path. Every timm import in orthotune goes here.
"""

from __future__ import annotations

from types import ModuleType

from .._compat import patch_torchvision


def import_timm() -> ModuleType:
    """``timm``, imported after the torchvision patch; a clear error if it is missing."""
    patch_torchvision()
    try:
        import timm
    except ImportError as err:
        raise ImportError("the image recipes need timm: pip install 'orthotune[vision]'") from err
    return timm
