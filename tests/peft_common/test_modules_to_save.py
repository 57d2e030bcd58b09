"""peft's ``modules_to_save`` tests (``TestRequiresGrad.test_requires_grad_modules_to_save_*``,
``test_multiple_adapters_mixed_modules_to_save``) on the cases that train a module in full: peft's
"Vanilla MLP 5" cases and BERT's classifier."""

from __future__ import annotations

import pytest
import torch

from .cases import CASES, params
from .harness import base_output, batch, config, make, train
from .models import output

pytestmark = pytest.mark.parametrize("case", params([c for c in CASES if c.saved]))


def test_modules_to_save_trained_and_used(case) -> None:
    """A saved module trains as a copy; the frozen original stays and serves the disabled model."""
    model = make(case)
    assert {n for n, _ in model.saved_modules()} == set(case.saved)
    original = {n: p.clone() for n, p in model.named_parameters() if ".original." in n}
    train(case, model, lr=0.5, loss="sum")
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters() if n in original)
    assert any(not torch.equal(p, original[n.replace(".copies.default.", ".original.")])
               for n, p in model.named_parameters() if ".copies.default." in n)  # fmt: skip
    with torch.no_grad(), model.disable_adapter():
        assert torch.allclose(output(model, batch(case)), base_output(case))


def test_requires_grad_modules_to_save_multiple_adapters(case) -> None:
    """Only the active adapter's copy of a saved module trains; the original never does."""
    model = make(case, adapter_name="adapter0")
    model.add_adapter("adapter1", config(case))

    def trainable_copies() -> set[str]:
        copies = [n for n, p in model.named_parameters() if ".copies." in n and p.requires_grad]
        return {n.split(".copies.")[1].split(".")[0] for n in copies}

    assert trainable_copies() == {"adapter0"}
    model.set_adapter("adapter1")
    assert trainable_copies() == {"adapter1"}
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".original." in n)


def test_multiple_adapters_mixed_modules_to_save(case) -> None:
    """An adapter without modules_to_save next to one with them: each computes with its own head."""
    model = make(case, adapter_name="adapter0")
    model.add_adapter("adapter1", config(case, modules_to_save=None))
    train(case, model, lr=0.5, loss="sum")  # adapter0's head copy moves away from the original
    x = batch(case)
    with torch.no_grad():
        out0 = output(model, x)
        model.set_adapter("adapter1")
        out1 = output(model, x)
        with model.disable_adapter():
            base = output(model, x)
    assert torch.allclose(out1, base)  # adapter1 starts as the identity and uses the original head
    assert not torch.allclose(out0, out1)
