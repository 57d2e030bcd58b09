"""peft's ``low_cpu_mem_usage``: adapter tensors created on the meta device, materialised by the loaded ones.

A method module built here allocates no parameter and runs no parameter initialisation (accelerate's
``init_empty_weights(include_buffers=False)``; buffers such as index tables are built as usual);
:func:`materialize` then puts the loaded tensors in with ``load_state_dict(assign=True)``, so each
adapter tensor exists once, as read from the file (moved only if its device or dtype differs).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from ..layer.offload import execution_device
from ..methods.config import AdapterConfig
from .inject import build_method


def build_on_meta(config: AdapterConfig, module: nn.Module, name: str) -> nn.Module:
    """The method module for the base layer ``name`` with its parameters on the meta device: their
    initialisation computes nothing. Buffers (index tables, a principal basis) are built as usual."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build_method(config, module, name)


def materialize(method: nn.Module, state: dict[str, Tensor], module: nn.Module, name: str) -> None:
    """Assign ``state`` (the method's full state dict) to a meta-built ``method``, on ``module``'s device, in the
    dtypes the method would have created; raise if the method keeps a tensor the state does not hold."""
    device = execution_device(module) or next(module.parameters()).device
    refs = method.state_dict()
    method.load_state_dict({k: v.to(device=device, dtype=refs[k].dtype) for k, v in state.items()}, assign=True)
    left = [n for n, t in _tensors(method) if t.is_meta]
    if left:
        raise ValueError(
            f"low_cpu_mem_usage=True cannot build {type(method).__name__} at {name!r}: its tensors {left[:3]} are computed "
            "at initialisation and not saved; load it with low_cpu_mem_usage=False"
        )


def _tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Parameters, buffers and plain tensor attributes of ``module`` and its children."""
    yield from module.named_parameters()
    yield from module.named_buffers()
    for prefix, sub in module.named_modules():
        for key, value in vars(sub).items():
            if isinstance(value, Tensor):
                yield (f"{prefix}.{key}" if prefix else key), value
