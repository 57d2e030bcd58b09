"""LOFT's gradient-informed support selection on a whole model: ``select_supports(model, data)``.

Accumulates each targeted layer's weight gradient over a few batches (the adapter bypassed) and fills
every task-aware support from it with the math of :mod:`orthotune.methods.loft.selection`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..layer import quantized
from ..methods.loft.selection import (
    captured_fraction,
    complete_basis,
    gradient_basis,
    gradient_coordinates,
    gradient_dims,
    second_moment_basis,
    whitened_basis,
)
from ..methods.loft.supports import DenseSupport
from ..model.adapter_model import AdapterModel

LossFn = Callable[[nn.Module, Any], Tensor]
STATISTICS = ("mean", "second_moment", "whitened")


def _default_loss(model: nn.Module, batch: Any) -> Tensor:
    if not isinstance(batch, Mapping):
        raise ValueError(
            "batches that are not dicts need a loss_fn(model, batch) -> scalar loss; pass loss_fn= to select_supports"
        )
    out = model(**batch)
    loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError("the model returned no loss for a batch (give it labels) or pass loss_fn= to select_supports")
    return loss


def _grad_matrix(layer: nn.Module) -> Tensor:
    """The base weight's gradient as a (d_out, d_in) matrix, laid out as ``layer.weight_matrix()``;
    zero for a layer the loss never reached (e.g. an unused pooler)."""
    g = layer.base_layer.weight.grad
    if g is None:
        return torch.zeros_like(layer.weight_matrix())
    if layer.kind == "conv1d":
        return g.T
    return g.reshape(g.shape[0], -1)


class InputMoments:
    """Each layer's input second moment ``E[x x^T]`` over the forwards run while recording (inputs read as
    (..., d_in) rows): ``with InputMoments(layers): model(...)``, then :meth:`mean`. Forward hooks, removed on exit."""

    def __init__(self, layers: Iterable[tuple[str, nn.Module]], dtype: torch.dtype = torch.float32) -> None:
        self.layers = list(layers)
        self.dtype = dtype
        self.sums: dict[str, Tensor] = {}
        self.tokens = {name: 0 for name, _ in self.layers}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(self.dtype)
            self.sums[name] = self.sums[name] + x.T @ x if name in self.sums else x.T @ x
            self.tokens[name] += x.shape[0]
        return record

    def start(self) -> None:
        """Register the hooks (once)."""
        if not self._hooks:
            self._hooks = [layer.register_forward_hook(self._hook(name)) for name, layer in self.layers]

    def stop(self) -> None:
        """Remove the hooks; what was recorded stays."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self) -> InputMoments:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def mean(self, name: str) -> Tensor:
        """``E[x x^T]`` of layer ``name``'s inputs (d_in x d_in); an error if it saw none."""
        if not self.tokens.get(name):
            raise ValueError(f"no input of layer {name!r} was recorded: run forwards through it while recording")
        return self.sums[name] / self.tokens[name]


def select_supports(
    model: AdapterModel,
    data: Iterable[Any],
    num_batches: int = 8,
    loss_fn: LossFn | None = None,
    adapter_name: str | None = None,
    progress: bool = True,
    head_warmup_steps: int = 0,
    head_lr: float = 1e-3,
    statistic: str = "mean",
    gradient_fraction: float = 1.0,
    whitening_ridge: float = 0.1,
) -> dict[str, dict[str, float]]:
    """LOFT's gradient-informed support selection: fill every task-aware support of an adapter.

    Accumulates ``G = dL/dW`` for the frozen weight of each targeted layer over ``num_batches``
    batches of ``data`` (the adapter itself at the identity, i.e. bypassed; the model in eval mode),
    then sets each support to the dominant directions of ``Skew(W0^T G)`` (``support="gradient"``)
    or its heaviest coordinates (``support="gradient_coordinate"``). The support size ``r`` (the
    parameter budget) comes from the config. Memory: one weight-sized gradient per targeted layer,
    and, for one layer at a time, the d_in x d_in statistic when ``2 d_out >= d_in``.

    Options for a freshly initialised head, whose gradient makes ``G`` point at random targets:
    ``head_warmup_steps`` first trains the ``modules_to_save`` copies alone (AdamW at ``head_lr``,
    adapter bypassed) on that many batches of ``data``, then takes the statistic on the following
    batches; the warmed-up head is kept (it is what training starts from). ``statistic="second_moment"``
    ranks directions by ``sum_b K_b^T K_b`` over batches (:func:`second_moment_basis`) instead of
    the mean gradient's ``K``; it holds one d_in x d_in matrix per targeted layer. ``statistic="whitened"``
    ranks them by first-order gain per unit of the layer's input energy (:func:`whitened_basis`), from
    the input second moment of the same batches (one d_in x d_in matrix per layer; dense supports only);
    ``whitening_ridge`` adds that multiple of the mean input energy to every direction before whitening
    (small: near-silent directions weigh more; large: the ranking tends to ``statistic="mean"``).

    ``gradient_fraction < 1`` mixes: that share of each support (rounded to whole planes) is the
    statistic's top directions, the rest random directions orthogonal to them (or random other
    coordinates, for ``gradient_coordinate``): the rotation reaches where the first steps pay and also
    spreads over directions later steps may need.

    The model is otherwise left as it was: requires_grad flags, gradients, train/eval modes and
    active adapters are restored. Returns, per layer, the share of the mean first-order signal the
    chosen support captures (:func:`captured_fraction`).
    """
    from tqdm.auto import tqdm

    if not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
    if not isinstance(head_warmup_steps, int) or head_warmup_steps < 0:
        raise ValueError(f"head_warmup_steps must be a non-negative integer, got {head_warmup_steps!r}")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    gradient_dims(1, gradient_fraction)  # checks the fraction before any work
    if isinstance(whitening_ridge, bool) or not isinstance(whitening_ridge, (int, float)) or not 0 < whitening_ridge < math.inf:
        raise ValueError(f"whitening_ridge must be a positive finite number, got {whitening_ridge!r}")
    name = adapter_name or model.active_adapter
    if name not in model.configs:
        raise ValueError(f"no adapter named {name!r}; adapters here: {sorted(model.configs)}")
    targets = [
        (lname, layer, layer.adapters[name].support)
        for lname, layer in model.adapter_layers()
        if name in layer.adapters and getattr(getattr(layer.adapters[name], "support", None), "task_aware", False)
    ]
    if not targets:
        raise ValueError(
            f"adapter {name!r} has no task-aware support to select; build it with "
            "LOFTConfig(support='gradient') or support='gradient_coordinate'"
        )
    if statistic == "whitened":
        if any(not isinstance(support, DenseSupport) for _, _, support in targets):
            raise ValueError("statistic='whitened' ranks dense directions; use it with support='gradient', "
                             "not 'gradient_coordinate'")
        other = [(lname, layer.kind) for lname, layer, _ in targets if layer.kind not in ("linear", "conv1d")]
        if other:
            raise ValueError(f"statistic='whitened' reads inputs as (..., d_in) rows; {other[0][0]!r} is a "
                             f"{other[0][1]} layer: use statistic='mean' there")
    merged = [lname for lname, layer, _ in targets if layer.merged_adapters]
    if merged:
        raise ValueError(f"{merged[0]!r} has merged adapters; unmerge() before selecting supports")
    quantised = [lname for lname, layer, _ in targets if quantized.is_quantized(layer.base_layer)]
    if quantised:
        raise ValueError(
            f"{quantised[0]!r} is a quantised (bitsandbytes) layer: gradient supports need dL/dW of a float base "
            "weight. Select them on the float model, save_adapter() and load the adapter onto the quantised "
            "one, or use LOFTConfig(support='principal')"
        )

    head = [p for _, wrapper in model.saved_modules() for p in wrapper.parameters() if p.requires_grad]
    if head_warmup_steps and not head:
        raise ValueError("head_warmup_steps needs a trainable head: build the adapter with modules_to_save=[...]")
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    weights = [layer.base_layer.weight for _, layer, _ in targets]
    old_grads = [w.grad for w in weights]
    active = {lname: list(layer.active_adapters) for lname, layer, _ in targets}
    inputs = InputMoments([(lname, layer) for lname, layer, _ in targets])
    try:
        for p in flags:
            p.requires_grad_(False)
        for _, layer, _ in targets:  # the adapter at the identity: take it out of the forward
            layer.active_adapters = [n for n in layer.active_adapters if n != name]
        model.eval()
        batches = iter(data)
        if head_warmup_steps:
            warm_up_head(model, batches, head, head_warmup_steps, head_lr, loss_fn or _default_loss, progress)
        for w in weights:
            w.grad = None
            w.requires_grad_(True)
        sums = {lname: torch.zeros_like(layer.weight_matrix(), dtype=torch.float32) for lname, layer, _ in targets}
        moments: dict[str, Tensor] = {}
        if statistic == "whitened":  # each layer's input second moment E[x x^T] over the statistic's batches
            inputs.start()
        seen = 0
        with tqdm(total=num_batches, desc="LOFT support selection", disable=not progress) as bar:
            for batch in batches:
                loss = (loss_fn or _default_loss)(model, batch)
                loss.backward()
                with torch.no_grad():
                    for lname, layer, _ in targets:
                        G = _grad_matrix(layer).float()
                        sums[lname] += G
                        if statistic == "second_moment":
                            K = layer.weight_matrix().float().T @ G
                            K = (K - K.T) / 2
                            moments[lname] = moments.get(lname, 0) + K.T @ K
                        layer.base_layer.weight.grad = None
                seen += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if seen == num_batches:
                    break
        if seen == 0:
            raise ValueError("the data gave no batch; pass a non-empty iterable of batches")
        report: dict[str, dict[str, float]] = {}
        with torch.no_grad():
            for lname, layer, support in targets:
                W0 = layer.weight_matrix().float()
                G = sums[lname] / seen
                k = gradient_dims(support.dim, gradient_fraction)
                if isinstance(support, DenseSupport):
                    if statistic == "mean":
                        P = gradient_basis(W0, G, k)
                    elif statistic == "whitened":
                        P = whitened_basis(W0, G, inputs.mean(lname), k, whitening_ridge)
                    else:
                        P = second_moment_basis(moments[lname], k)
                    P = complete_basis(P.to(W0.device, torch.float64), support.dim)
                    support.assign(P.to(support.P.dtype))
                else:
                    if statistic == "second_moment":
                        idx = torch.topk(torch.diagonal(moments[lname]), k).indices
                    else:
                        idx = gradient_coordinates(W0, G, k)
                    idx = torch.sort(_complete_coordinates(idx.cpu(), W0.shape[1], support.dim)).values
                    support.assign(idx.to(support.index.device))
                    P = torch.eye(W0.shape[1], dtype=torch.float64)[:, idx]
                report[lname] = {"captured_fraction": captured_fraction(W0.cpu(), G.cpu(), P.cpu()), "batches": seen}
    finally:
        inputs.stop()
        for w, g in zip(weights, old_grads):
            w.grad = g
        for p in head if head_warmup_steps else []:
            p.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode
        for lname, layer, _ in targets:
            layer.active_adapters = active[lname]
    return report


def _complete_coordinates(idx: Tensor, d: int, r: int) -> Tensor:
    """``idx`` followed by ``r - len(idx)`` other coordinates of ``range(d)`` drawn at random (global torch RNG)."""
    if idx.numel() >= r:
        return idx
    free = torch.ones(d, dtype=torch.bool)
    free[idx] = False
    rest = torch.nonzero(free).flatten()
    return torch.cat([idx, rest[torch.randperm(rest.numel())[: r - idx.numel()]]])


def warm_up_head(model: nn.Module, batches: Any, head: list[Tensor], steps: int, lr: float, loss_fn: LossFn,
                  progress: bool) -> None:
    """Train only the head (``modules_to_save``) for ``steps`` batches, so the statistic's gradient
    flows through a classifier that already separates the classes rather than a random one."""
    from tqdm.auto import tqdm

    for p in head:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(head, lr=lr)
    for _ in tqdm(range(steps), desc="LOFT head warm-up", disable=not progress):
        batch = next(batches, None)
        if batch is None:
            raise ValueError(f"the data ran out during the {steps}-step head warm-up; pass more batches")
        loss_fn(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for p in head:
        p.requires_grad_(False)
