"""A training step captured once in a CUDA graph and replayed: the step costs its GPU time, not the host's.

On a fast GPU an adapter's step is host-bound: eager PyTorch spends 15-30 us of CPU per dispatched
op and an adapted 8-layer Llama issues ~1500-1800 kernels per step, so the GPU idles
(``benchmarks/NOTES.md``). A CUDA graph records forward, backward and the optimiser step once and
replays them with one launch.

    optimizer = torch.optim.AdamW(params, lr=1e-4, capturable=True)
    step = GraphedStep(model, optimizer)
    for batch in loader:            # one shape for every batch: pad to a fixed length, drop_last=True
        loss = step(batch)          # a 0-dim tensor on the GPU (reading it syncs)
        scheduler.step()            # float learning rates become 0-dim tensors so schedulers still apply

The first ``warmup_steps`` calls run eagerly (on a side stream, as CUDA graphs need), the next one
captures and replays; every call trains on its batch, none is spent on a dummy. The step is
recaptured (after warm-up again) when the model changes under it: parameters or buffers replaced or
frozen/unfrozen (LoCA's location phases, adapter switches, LOFT support reselection), train/eval mode,
or the optimiser's parameter groups. Without CUDA (or ``enabled=False``) every call is the same step,
eager. After each replay the gradients hold that step's values; cores cached for inference are
dropped (replayed optimiser updates do not bump parameter versions).

Against ``torch.compile`` (the default fast path of the recipes and ``OrthoTrainer`` on CUDA): its
``mode="reduce-overhead"`` records the compiled forward and backward in CUDA graphs, but gradient
clipping and the optimiser step stay outside them (more launches per step), and it needs the model to
compile; ``GraphedStep`` captures the whole step, optimiser included, of the eager model. Which one is
faster per method is measured by ``benchmarks/compiled.py --graphed --modes default,reduce-overhead``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..layer import plan
from ..ops.cayley import cusolver_linalg

LossFn = Callable[[nn.Module, Mapping[str, Any]], Tensor]


def model_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """The default loss: ``model(**batch).loss`` (transformers models given ``labels``)."""
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError("the model's output has no 'loss': pass labels in the batch, or a loss_fn(model, batch) to GraphedStep")
    return loss


class GraphedStep:
    """``step(batch) -> loss``: forward, backward, optional gradient clipping and ``optimizer.step()``.

    ``loss_fn(model, batch)`` returns the loss to minimise (default :func:`model_loss`). Gradients
    are not accumulated across calls (each step starts from zero), as in a loop that calls
    ``zero_grad`` every step.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn = model_loss,
        *,
        warmup_steps: int = 3,
        max_grad_norm: float | None = None,
        enabled: bool | None = None,
    ) -> None:
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps={warmup_steps}: CUDA graphs need at least one eager step before capture (use 3)")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm}: give a positive norm, or None for no clipping")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.warmup_steps, self.max_grad_norm = warmup_steps, max_grad_norm
        self.enabled = torch.cuda.is_available() if enabled is None else enabled
        if self.enabled:
            _check_capturable(optimizer)
            if not torch.cuda.is_available():
                raise ValueError("GraphedStep(enabled=True) needs a CUDA device; enabled=None picks eager steps without one")
            if type(model).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel"):
                raise ValueError(f"GraphedStep captures single-process steps; {type(model).__name__}'s communication "
                                 "is not captured here: train the wrapped model eagerly (enabled=False)")
        self.captures = 0  # how many times the step was captured (recaptures included)
        self._eager_left = warmup_steps
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: dict[str, Any] = {}
        self._loss: Tensor | None = None
        self._stamp: tuple[Any, ...] = ()

    @property
    def graphed(self) -> bool:
        """Whether the next call replays a captured graph (rather than running eagerly)."""
        return self._graph is not None and self._stamp == self._fingerprint()

    def __call__(self, batch: Mapping[str, Any]) -> Tensor:
        if not self.enabled:
            return self._eager(batch)
        stamp = self._fingerprint()
        if self._graph is not None and stamp != self._stamp:
            self._release()  # the model changed under the graph: warm up and capture again
        if self._graph is None and self._eager_left > 0:
            self._eager_left -= 1
            return on_warmup_stream(lambda: self._eager(batch))
        if self._graph is None:
            self._capture(batch, stamp)
        else:
            self._load(batch)
        self._graph.replay()
        plan.clear(self.model)
        return self._loss.detach().clone()

    # ------------------------------------------------------------------------------------ internals
    def _compute(self, batch: Mapping[str, Any]) -> Tensor:
        loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a one-element tensor, got {type(loss).__name__} "
                             f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''}".rstrip())
        loss.backward()
        if self.max_grad_norm is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=True)
        self.optimizer.step()
        return loss.detach()

    def _eager(self, batch: Mapping[str, Any]) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        return self._compute(batch)

    def _capture(self, batch: Mapping[str, Any], stamp: tuple[Any, ...]) -> None:
        _check_device(batch)
        _tensor_learning_rates(self.optimizer)
        self._static = {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in batch.items()}
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates the gradients in the graph's pool
        graph = torch.cuda.CUDAGraph()
        try:
            with cusolver_linalg(), torch.cuda.graph(graph):
                loss = self._compute(self._static)
        except Exception as err:
            self.optimizer.zero_grad(set_to_none=True)
            raise RuntimeError(
                f"capturing the training step in a CUDA graph failed ({type(err).__name__}: {err}). Something in the "
                "step reads a GPU value on the host (.item(), a data-dependent shape, a CPU tensor copied to the GPU) "
                "or synchronises; remove that read, or train eagerly with GraphedStep(..., enabled=False)"
            ) from err
        self._graph, self._loss, self._stamp = graph, loss, stamp
        self.captures += 1

    def _load(self, batch: Mapping[str, Any]) -> None:
        """Copy the batch into the captured input tensors (shapes, dtypes and other entries must match)."""
        if batch.keys() != self._static.keys():
            raise ValueError(f"batch keys {sorted(batch)} differ from the captured step's {sorted(self._static)}: "
                             "every batch of a GraphedStep must carry the same entries")
        for k, v in batch.items():
            ref = self._static[k]
            if isinstance(ref, Tensor):
                if not isinstance(v, Tensor) or v.shape != ref.shape or v.dtype != ref.dtype:
                    got = f"{tuple(v.shape)} {v.dtype}" if isinstance(v, Tensor) else type(v).__name__
                    raise ValueError(
                        f"batch[{k!r}] is {got}, the captured step's is {tuple(ref.shape)} {ref.dtype}: a CUDA graph "
                        "replays fixed shapes; pad every batch to one length and drop the last partial batch "
                        "(or use GraphedStep(..., enabled=False))"
                    )
                ref.copy_(v, non_blocking=True)
            elif v != ref:
                raise ValueError(f"batch[{k!r}] = {v!r} differs from the captured step's {ref!r}; non-tensor "
                                 "entries are baked into the graph: keep them fixed")

    def _fingerprint(self) -> tuple[Any, ...]:
        """What the captured graph depends on beyond tensor contents (checked on every call: a host walk)."""
        params = tuple((p.data_ptr(), p.requires_grad) for p in self.model.parameters())
        buffers = tuple(b.data_ptr() for b in self.model.buffers())
        groups = tuple(tuple(map(id, g["params"])) for g in self.optimizer.param_groups)
        return params, buffers, groups, self.model.training

    def _release(self) -> None:
        self._graph, self._loss, self._static, self._stamp = None, None, {}, ()
        self._eager_left = self.warmup_steps
        self.optimizer.zero_grad(set_to_none=True)


def on_warmup_stream(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on the device's warm-up side stream, as ``torch.cuda.graph`` requires of the eager
    calls before a capture (used for training steps here and for inference graphs in the benchmark)."""
    stream = _warmup_stream(torch.cuda.current_device())
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = fn()
    torch.cuda.current_stream().wait_stream(stream)
    return out


def _check_device(batch: Mapping[str, Any]) -> None:
    bad = [k for k, v in batch.items() if isinstance(v, Tensor) and not v.is_cuda]
    if bad:
        raise ValueError(f"batch tensors {bad} are on the CPU: move the batch to the GPU before the step "
                         "(a captured step replays GPU kernels only)")


@functools.cache
def _warmup_stream(device: int) -> torch.cuda.Stream:
    """One warm-up stream per device for every GraphedStep: cuBLAS keeps a workspace (32 MiB on an H100)
    per stream it has run on for the life of the process, so a stream per warm-up would hold one workspace each."""
    return torch.cuda.Stream(device)


def _check_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Optimisers whose step reads state on the host (Adam's step count with capturable=False) cannot be replayed."""
    for group in optimizer.param_groups:
        if "capturable" not in group:
            raise ValueError(
                f"{type(optimizer).__name__} has no capturable mode, so its step cannot be captured in a CUDA graph: "
                "use torch.optim.AdamW(..., capturable=True) (or Adam), or GraphedStep(..., enabled=False)"
            )
        if not (group["capturable"] or group.get("fused")):
            raise ValueError(
                f"{type(optimizer).__name__} was built with capturable=False: its step keeps the step count on the "
                f"host, which a replayed CUDA graph never updates; build it with "
                f"torch.optim.{type(optimizer).__name__}(..., capturable=True) (or fused=True)"
            )


def _tensor_learning_rates(optimizer: torch.optim.Optimizer) -> None:
    """Float learning rates would be baked into the graph; 0-dim tensors are read on replay, and
    schedulers ``fill_`` them (``torch.optim.lr_scheduler``), so a schedule keeps working."""
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], Tensor):
            device = next((p.device for p in group["params"]), torch.device("cuda"))
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
