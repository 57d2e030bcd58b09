"""Configurations the shared contract suite runs for each registered method.

Adding a method to ``orthotune.methods.registry.METHODS`` without cases here fails
``test_every_method_has_cases``: one entry below is all a new method needs to get the suite.
``params(d_in, d_out)`` is the method's trainable-parameter count per layer, written from the paper.
``models`` restricts a case to the test models whose shapes it fits (default: all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from orthotune.methods.base import Base


@dataclass(frozen=True)
class Case:
    method: str
    kwargs: dict[str, Any]
    params: Callable[[int, int], int]
    models: tuple[str, ...] = ("mlp", "conv1d", "conv2d")
    orthogonal: bool = False  # exact orthogonality of the input rotation is asserted after training

    @property
    def id(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.method}({args})"


CASES: list[Case] = [
    Case("loco", dict(rank=2, chain_length=3), lambda i, o: 2 * 3 * 2 * i, orthogonal=True),
    Case("loco", dict(rank=1, chain_length=4, mode="sequential"), lambda i, o: 2 * 4 * 1 * i, orthogonal=True),
    Case("loco", dict(rank=2, chain_length=2, mode="approx"), lambda i, o: 2 * 2 * 2 * i, orthogonal=True),
    Case("lora", dict(r=4, lora_alpha=8), lambda i, o: 4 * (i + o)),
    Case("lora", dict(r=2, lora_alpha=4, use_rslora=True), lambda i, o: 2 * (i + o)),
    Case("pissa", dict(r=4, lora_alpha=8), lambda i, o: 4 * (i + o)),
    Case("pissa", dict(r=2, lora_alpha=2, use_rslora=True, svd_niter=2), lambda i, o: 2 * (i + o)),
    Case("loca", dict(n_frequency=32, scale=2.0), lambda i, o: 32),
    Case("loca", dict(n_frequency=20, compute="dense"), lambda i, o: 20),
    Case("fourierft", dict(n_frequency=32, scaling=300.0), lambda i, o: 32),
    Case("fourierft", dict(n_frequency=16, scaling=100.0, random_loc_seed=3, compute="dense"), lambda i, o: 16),
    Case("loft", dict(r=4), lambda i, o: 4 * 3 // 2, orthogonal=True),
    Case("loft", dict(support="random", r=4, transform="householder", reflections=2), lambda i, o: 2 * 4, orthogonal=True),
    Case("loft", dict(support="coordinate", r=6, transform="givens"), lambda i, o: 6 - 1, orthogonal=True),
    Case("loft", dict(support="full", transform="exp", generator_rank=1), lambda i, o: 2 * 1 * i, orthogonal=True),
    Case("loft", dict(support="random", r=8, transform="butterfly", block_size=2), lambda i, o: 2 * 4 * 1, orthogonal=True),
    Case("loft", dict(support="coordinate", r=8, block_size=4, neumann_terms=5), lambda i, o: 2 * 6),
    Case("oft", dict(oft_block_size=4), lambda i, o: (i // 4) * 6, orthogonal=True),
    Case("oft", dict(r=4, oft_block_size=0, use_cayley_neumann=True), lambda i, o: 4 * (i // 4) * (i // 4 - 1) // 2),
    Case("boft", dict(boft_block_size=2, boft_n_butterfly_factor=2), lambda i, o: 2 * (i // 2) * 4 + o, orthogonal=True),
    Case("hra", dict(r=2), lambda i, o: 2 * i, orthogonal=True),
    Case("psoft", dict(r=4), lambda i, o: 4 * 3 // 2 + 2 * 4),
    Case("psoft", dict(r=4, psoft_svd="lowrank"), lambda i, o: 4 * 3 // 2 + 2 * 4),
    Case("goft", dict(), lambda i, o: i - 1, orthogonal=True),
]


def run(method: nn.Module, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One method on its own: ``forward(x, base, core)`` with ``base = fn`` and the method's own core."""
    return method(x, Base(fn), method.core(x.dtype))


def adapter_per_case(base: nn.Module, cases: list[Case], slots: list[str]) -> tuple[Any, list[str]]:
    """``base`` carrying each case as its own adapter ``a{i}_{method}`` on ``slots[i % len(slots)]``, all active
    (perturbed starts): the compiled-model tests' one model for many methods."""
    import orthotune
    from orthotune.methods.registry import METHODS

    model, names = None, []
    for i, case in enumerate(cases):
        config = METHODS[case.method][0](target_modules=[slots[i % len(slots)]], init_identity=False, **case.kwargs)
        name = f"a{i}_{case.method}"
        if model is None:
            model = orthotune.get_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        names.append(name)
    model.set_adapter(names)
    return model, names
