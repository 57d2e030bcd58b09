"""Training recipes: real models and data loaded offline, one training loop, evaluation, plots.

Importing this package first makes torchvision importable where its compiled ops cannot load
(see :mod:`orthotune.train.compat`), since transformers and timm import it.
"""

from .compat import ensure_torchvision_importable

ensure_torchvision_importable()
