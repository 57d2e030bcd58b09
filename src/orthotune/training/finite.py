"""NaN and Inf caught early and by name: which layer, which adapter, which parameter.

A diverging run usually shows up as a NaN loss many steps after the first bad value, and by then
every adapter weight is NaN. :func:`check_finite` names the first non-finite adapter weight (then
gradient, then the loss), and :func:`guard_finite` runs the weight and gradient checks before each
optimizer step, so the step that would write NaN into the adapter raises instead: the weights stay
as they were after the last good step.

The fast path is one fused reduction over all tensors (``x * 0`` is 0 for every finite ``x`` and
NaN otherwise, so the reduction cannot overflow even in float16); only on failure are the tensors
searched one by one for the message.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..model.adapter_model import AdapterModel
from ..ops.finite import all_finite

_HINT = (
    "lower the learning rate, clip gradients (torch.nn.utils.clip_grad_norm_), or keep adapter weights in "
    "float32 (autocast_adapter_dtype=True); resume from the last saved checkpoint"
)


def adapter_tensors(model: nn.Module, grads: bool = False) -> Iterator[tuple[str, Tensor]]:
    """(description, tensor) for every trainable adapter tensor (or its gradient, when set).

    For an AdapterModel: each adapter of each adapted layer and each modules_to_save copy, named by
    layer, adapter and parameter. For any other module: its parameters that require grad.
    """
    def pick(p: Tensor) -> Tensor | None:
        return p.grad if grads else p

    if isinstance(model, AdapterModel):
        owners = [(f"layer {n!r}", layer.adapters) for n, layer in model.adapter_layers()]
        owners += [(f"saved module {n!r}", saved.copies) for n, saved in model.saved_modules()]
        for owner, modules in owners:
            for aname, module in modules.items():
                for pname, p in module.named_parameters():
                    t = pick(p)
                    if t is not None:
                        yield f"{owner}, adapter {aname!r}, parameter {pname!r}", t
        return
    for pname, p in model.named_parameters():
        t = pick(p) if p.requires_grad else None
        if t is not None:
            yield f"parameter {pname!r}", t


def _first_bad(named: list[tuple[str, Tensor]]) -> tuple[str, Tensor] | None:
    for desc, t in named:
        if not bool(torch.isfinite(t.detach()).all()):
            return desc, t
    return None


def _describe(t: Tensor) -> str:
    t = t.detach()
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    kinds = " and ".join(k for k, n in (("NaN", nan), ("Inf", inf)) if n)
    return f"{kinds} in {nan + inf} of {t.numel()} entries"


def _loss_value(loss: Tensor | float | None) -> float | None:
    if loss is None:
        return None
    return float(loss.detach().float().item()) if isinstance(loss, Tensor) else float(loss)


def check_finite(
    model: nn.Module, loss: Tensor | float | None = None, *, step: int | None = None, grads: bool = True, batch: Any = None
) -> None:
    """Raise ``FloatingPointError`` naming the first non-finite adapter weight, gradient, or the loss.

    Weights are checked first (a bad weight is the cause of everything after it), then gradients
    (``grads=True``, where set), then ``loss``; for a non-finite loss with finite weights, ``batch``
    (the forward's inputs) is run again to name the module where the non-finite values start.
    Costs one fused reduction when all is finite.
    """
    where = f" at step {step}" if step is not None else ""
    for use_grads in (False, True) if grads else (False,):
        named = list(adapter_tensors(model, grads=use_grads))
        if all_finite([t for _, t in named]):
            continue
        found = _first_bad(named)
        if found is not None:
            desc, t = found
            what = "the gradient of " if use_grads else ""
            raise FloatingPointError(f"non-finite values{where} in {what}{desc} ({_describe(t)}): {_HINT}")
    value = _loss_value(loss)
    if value is not None and not math.isfinite(value):
        origin = first_nonfinite_module(model, batch) if batch is not None else None
        start = f"; the non-finite values start in module {origin!r}" if origin else ""
        raise FloatingPointError(
            f"the loss is {value}{where} while every adapter weight and gradient is finite{start}: the frozen model's "
            "forward overflowed (float16 activations?) or the batch holds invalid inputs or labels; check the batch, "
            "or train in bfloat16/float32"
        )


def _finite_tensors(obj: Any) -> bool:
    """Whether every floating tensor in a (nested) output or argument structure is finite."""
    found: list[Tensor] = []

    def collect(o: Any) -> None:
        if isinstance(o, Tensor):
            if o.is_floating_point() or o.is_complex():
                found.append(o)
        elif isinstance(o, dict):
            for v in o.values():
                collect(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                collect(v)

    collect(obj)
    return all_finite(found)


@torch.no_grad()
def first_nonfinite_module(model: nn.Module, batch: Any) -> str | None:
    """Run ``model`` on ``batch`` (keyword arguments as a dict, positional ones as a tuple, or one
    tensor) and name the first module, in execution order, whose output holds NaN or Inf although
    its inputs do not: where the non-finite values start. None if the forward stays finite."""
    root = model.base_model if isinstance(model, AdapterModel) else model
    found: list[str] = []

    def watch(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not found and not _finite_tensors(output) and _finite_tensors(args):
                found.append(name)

        return hook

    handles = [m.register_forward_hook(watch(n)) for n, m in root.named_modules() if n]
    try:
        if isinstance(batch, dict):
            model(**batch)
        elif isinstance(batch, tuple):
            model(*batch)
        else:
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def guard_finite(optimizer: torch.optim.Optimizer, model: nn.Module, every: int = 1) -> RemovableHandle:
    """Check ``model``'s adapter weights and gradients before every ``every``-th ``optimizer.step()``.

    A non-finite value raises ``FloatingPointError`` naming the layer before the step runs, so the
    adapter keeps its last good weights. Returns the hook's handle (``handle.remove()`` stops it).
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    state = {"steps": 0}

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        state["steps"] += 1
        if (state["steps"] - 1) % every == 0:
            check_finite(model, step=state["steps"] - 1)

    return optimizer.register_step_pre_hook(hook)
