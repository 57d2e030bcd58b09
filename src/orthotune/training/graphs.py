"""A training step whose forward and backward run in CUDA graphs: ``torch.compile(model, mode="reduce-overhead")``.

On a fast GPU an adapter's step is host-bound: eager PyTorch spends 15-30 us of CPU per dispatched
op and an adapted 8-layer Llama issues ~1500-1800 kernels per step (``benchmarks/NOTES.md``).
Inductor fuses the kernels and ``mode="reduce-overhead"`` replays the compiled forward and backward
from CUDA graphs (cudagraph trees), so the step costs about its GPU time::

    step = GraphedStep(model, torch.optim.AdamW(params, lr=1e-4), max_grad_norm=1.0)
    for batch in loader:            # fixed shapes: pad to one length (each new length records new graphs)
        loss = step(batch)          # a 0-dim tensor on the GPU (reading it syncs)
        scheduler.step()

Gradient clipping and the optimiser step run eagerly after the graphed backward. This class once
captured the whole eager step (optimiser included) in one hand-made CUDA graph; on an H200
(``docs/speed.md``) ``reduce-overhead`` was faster on every measured row, since it replays
inductor's fused kernels rather than eager ones. Without CUDA (or ``enabled=False``) every call is
the same step, eager.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..layer import plan

LossFn = Callable[[nn.Module, Mapping[str, Any]], Tensor]
#: ``torch.compile``'s modes (``torch._inductor.list_mode_options()``), accepted by name by the recipes and ``OrthoTrainer``
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


def compile_settings(compiled: bool) -> contextlib.AbstractContextManager:
    """Around a compiled step: dynamo compiles activation-checkpointed layers whose forward sets a context variable
    and restores it (transformers >= 5.25's attention) instead of running each of them eagerly, since the recompute
    in the backward need not replay a side effect the forward undid (docs/speed.md). The recipes' loop,
    :class:`GraphedStep` and ``OrthoTrainer`` trace under it."""
    if compiled and hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):  # not in every torch
        return torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)
    return contextlib.nullcontext()


def model_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """The default loss: ``model(**batch).loss`` (transformers models given ``labels``)."""
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError("the model's output has no 'loss': pass labels in the batch, or a loss_fn(model, batch) to GraphedStep")
    return loss


class GraphedStep:
    """``step(batch) -> loss``: forward and backward through ``torch.compile(model, mode="reduce-overhead")``,
    optional gradient clipping, ``optimizer.step()``.

    ``loss_fn(model, batch)`` returns the loss to minimise (default :func:`model_loss`); it is given the
    compiled model. Gradients are not accumulated across calls (each step starts from zero), as in a
    loop that calls ``zero_grad`` every step; after a call they hold that step's gradients.
    ``backend`` and ``compile_kwargs`` go to ``torch.compile`` (``compile_kwargs`` may set another
    ``mode``, ``fullgraph`` or ``dynamic``); ``enabled=None`` compiles on CUDA and steps eagerly without it.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn = model_loss,
        *,
        max_grad_norm: float | None = None,
        enabled: bool | None = None,
        backend: str | Callable[..., Any] = "inductor",
        compile_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm}: give a positive norm, or None for no clipping")
        self.model, self.optimizer, self.loss_fn, self.max_grad_norm = model, optimizer, loss_fn, max_grad_norm
        self.enabled = torch.cuda.is_available() if enabled is None else enabled
        self.compiled = model
        if self.enabled:
            if type(model).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel"):
                raise ValueError(f"GraphedStep graphs single-process steps; {type(model).__name__}'s communication "
                                 "is not recorded in its CUDA graphs: train the wrapped model eagerly (enabled=False)")
            kwargs = {"mode": "reduce-overhead", **(compile_kwargs or {})}
            self.compiled = torch.compile(model, backend=backend, **kwargs)

    def __call__(self, batch: Mapping[str, Any]) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        if self.enabled:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be overwritten
        with compile_settings(self.enabled):
            loss = self.loss_fn(self.compiled, batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a one-element tensor, got {type(loss).__name__} "
                             f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''}".rstrip())
        loss.backward()
        if self.max_grad_norm is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        if any(g.get("fused") for g in self.optimizer.param_groups):
            plan.clear(self.model)  # a fused step bumps no version counter: drop the cores kept for inference
        return loss.detach().clone()  # the graph's output buffer is overwritten by the next replay


def on_warmup_stream(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on the device's warm-up side stream, as ``torch.cuda.graph`` requires of the eager
    calls before a capture (the inference graphs of ``benchmarks/efficiency.py``)."""
    stream = _warmup_stream(torch.cuda.current_device())
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = fn()
    torch.cuda.current_stream().wait_stream(stream)
    return out


@functools.cache
def _warmup_stream(device: int) -> torch.cuda.Stream:
    """One warm-up stream per device: cuBLAS keeps a workspace (32 MiB on an H100) per stream it has run
    on for the life of the process, so a stream per warm-up would hold one workspace each."""
    return torch.cuda.Stream(device)
