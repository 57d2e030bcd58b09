"""Mixed-adapter batches: one adapter per sample, peft's ``adapter_names`` argument.

``model(x, adapter_names=["a", "b", "__base__", ...])`` (and ``model.generate(..., adapter_names=...)``)
runs sample ``i`` through adapter ``adapter_names[i]`` alone, ``"__base__"`` through the frozen model.
Every adapter layer (and every ``modules_to_save`` wrapper) groups the rows of its input by adapter
and runs each group through that adapter's ordinary forward: for an additive method ``W0 x + dW x``
on the group's rows, for a rotation ``W0 (R x)`` with the group's own ``R``, never a per-sample
``d x d`` matrix. A layer that an adapter does not adapt computes the base output for its rows.

As in peft: inference only (``model.eval()``), not while adapters are merged, every name must be an
adapter of the model or ``"__base__"``. Under ``generate``, which repeats every sample for beam search
or several returned sequences, a layer whose batch is a multiple ``k`` of the names repeats each name
``k`` times (``repeat_interleave``, transformers' layout); encoder layers of encoder-decoder models see
the original batch and the original names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

BASE = "__base__"


@dataclass
class MixedBatch:
    """The per-sample adapter names of one forward, and whether ``generate`` may have repeated samples."""

    names: list[str]
    generating: bool = False
    _groups: dict[tuple[int, torch.device], list[tuple[str, Tensor]]] = field(default_factory=dict, repr=False)

    def groups(self, rows: int, device: torch.device) -> list[tuple[str, Tensor]]:
        """(adapter name, row indices) for a batch of ``rows`` samples, in order of first appearance."""
        key = (rows, device)
        if key not in self._groups:
            names = self.names
            if rows != len(names):
                if not (self.generating and rows % len(names) == 0):
                    raise ValueError(
                        f"adapter_names has {len(names)} entries but the batch has {rows} samples: pass one adapter "
                        "name per sample"
                    )
                names = [n for n in names for _ in range(rows // len(names))]
            order: dict[str, list[int]] = {}
            for i, n in enumerate(names):
                order.setdefault(n, []).append(i)
            self._groups[key] = [(n, torch.tensor(idx, device=device)) for n, idx in order.items()]
        return self._groups[key]


def grouped(x: Tensor, batch: MixedBatch, run: Callable[[str, Tensor], Tensor]) -> Tensor:
    """``out[rows] = run(name, x[rows])`` for every adapter's rows: one call per adapter in the batch."""
    groups = batch.groups(x.shape[0], x.device)
    if len(groups) == 1:
        return run(groups[0][0], x)
    outs = [run(name, x.index_select(0, rows)) for name, rows in groups]
    if not all(isinstance(o, Tensor) for o in outs):
        raise TypeError("a mixed-adapter batch needs modules that return one tensor per sample (batch first)")
    out = outs[0].new_empty((x.shape[0], *outs[0].shape[1:]))
    for (_, rows), o in zip(groups, outs):
        out.index_copy_(0, rows, o.to(out.dtype))
    return out
