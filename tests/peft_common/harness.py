"""Shared steps of the ported tests: building adapted models, training a few steps, and a marker.

``requires_api`` skips a test whose peft-named API orthotune does not offer (peft-only features).
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

import pytest
import torch
from torch import nn

import orthotune
from orthotune import OrthoModel
from orthotune.layer.adapter_layer import AdapterLayer, ModulesToSave

from .cases import Case
from .models import KINDS, base_model, inputs, output


def requires_api(name: str, keyword: str | None = None) -> pytest.MarkDecorator:
    """Skip unless orthotune offers peft's ``name``: an ``OrthoModel`` method (taking ``keyword``, if given),
    or, for a dotted name, an orthotune module or function (``"orthotune.layer.mixed"``,
    ``"orthotune.inject_adapter_in_model"``)."""
    if "." in name:
        module, _, attr = name.rpartition(".")
        if importlib.util.find_spec(name) is not None:
            present = True
        else:
            present = importlib.util.find_spec(module) is not None and hasattr(importlib.import_module(module), attr)
    else:
        present = hasattr(OrthoModel, name)
        if present and keyword is not None:
            present = keyword in inspect.signature(getattr(OrthoModel, name)).parameters
    what = f"{name}({keyword}=...)" if keyword else name
    return pytest.mark.skipif(not present, reason=f"requires_api: orthotune has no {what} yet")


def config(case: Case, **overrides: Any) -> orthotune.AdapterConfig:
    """The case's config; ``init_identity=False`` is peft's ``set_init_weights_false``."""
    return case.config_cls(**{**case.kwargs, **overrides})


def make(case: Case, dtype: torch.dtype = torch.float32, adapter_name: str = "default", **overrides: Any) -> OrthoModel:
    """peft's ``get_peft_model(transformers_class.from_pretrained(model_id), config)``."""
    return orthotune.get_model(base_model(case.kind, dtype), config(case, **overrides), adapter_name)


def batch(case: Case) -> dict[str, torch.Tensor]:
    """The case's inputs (peft's ``prepare_inputs_for_testing``)."""
    return inputs(case.kind)


def base_output(case: Case, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The output of the kind's model without adapters."""
    with torch.no_grad():
        return output(base_model(case.kind, dtype), batch(case))


def loss_of(case: Case, out: torch.Tensor) -> torch.Tensor:
    """peft's training loss: ``nll_loss`` against alternating labels for classifiers, the sum for LMs."""
    if KINDS[case.kind].generates:
        return out.float().pow(2).mean()
    return nn.functional.nll_loss(out.float().log_softmax(-1), torch.arange(len(out)) % 2)


def train(
    case: Case, model: nn.Module, steps: int = 3, lr: float = 0.01, optimizer: str = "sgd", loss: str = "nll"
) -> None:
    """peft's few training steps over ``model.parameters()`` (frozen ones get no gradient and stay put)."""
    model.train()
    opt_cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=lr)
    x = batch(case)
    for _ in range(steps):
        opt.zero_grad()
        out = output(model, x)
        (out.sum() if loss == "sum" else loss_of(case, out)).backward()
        opt.step()
    model.eval()


def wrappers(model: nn.Module) -> list[nn.Module]:
    """orthotune's layers (peft's ``BaseTunerLayer``s and ``ModulesToSaveWrapper``s) in ``model``."""
    return [m for m in model.modules() if isinstance(m, (AdapterLayer, ModulesToSave))]


def adapter_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters of the adapters and of the trained copies of modules_to_save (peft's ``prefix`` names)."""
    return {n: p for n, p in model.named_parameters() if ".adapters." in n or ".copies." in n}


def allclose(a: torch.Tensor, b: torch.Tensor, tol: tuple[float, float]) -> bool:
    """``torch.allclose`` at peft's (atol, rtol)."""
    atol, rtol = tol
    return torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol)
