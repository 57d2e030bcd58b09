"""peft's tests that need a transformers model: ``_test_training_gradient_checkpointing`` (``use_reentrant``
both ways) and the ``adapter_names`` keyword, which transformers' ``**kwargs`` must not swallow."""

from __future__ import annotations

import pytest
import torch

from .cases import CASES, params
from .harness import allclose, batch, make
from .models import KINDS, output
from .test_peft_api import mixed_rows

pytestmark = pytest.mark.parametrize("case", params([c for c in CASES if KINDS[c.kind].transformers]))


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_training_gradient_checkpointing(case, use_reentrant: bool) -> None:
    """The same adapter parameters get gradients with activation checkpointing as without."""
    model = make(case, init_identity=False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    model.train()
    (output(model, batch(case)) ** 2).sum().backward()
    normal = {n for n, p in trainable if p.grad.abs().sum() > 0}
    for _, p in trainable:
        p.grad = None
    model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
    (output(model, batch(case)) ** 2).sum().backward()
    assert normal == {n for n, p in trainable if p.grad is not None and p.grad.abs().sum() > 0}


def test_adapter_names_is_honoured_or_refused(case) -> None:
    """``model(..., adapter_names=[...])`` either computes each sample with its adapter or raises."""
    model, x, base, out0, _ = mixed_rows(case)
    names = ["__base__", "adapter0", "__base__"] * (len(base) // 3)
    try:
        with torch.no_grad():
            mixed = output(model, {**x, "adapter_names": names})
    except (TypeError, ValueError):
        return
    assert allclose(base[::3], mixed[::3], (1e-4, 1e-4)) and allclose(out0[1::3], mixed[1::3], (1e-4, 1e-4))
