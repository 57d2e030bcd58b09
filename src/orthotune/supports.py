"""LOFT supports: where a rotation acts, ``R = I + P (T - I) P^T`` with ``P`` (d x r) orthonormal.

Kinds (how ``P`` is held):

* :class:`FullSupport`: ``P = I`` (r = d): OFT, BOFT, HRA, GOFT, LoCO rotate every coordinate.
* :class:`CoordinateSupport`: ``P`` = r columns of the identity, held as indices (a gather and a
  scatter, never a matrix): coordinate blocks, and task-aware coordinates.
* :class:`DenseSupport`: an orthonormal ``P`` (d x r) buffer: random, principal (top right singular
  vectors of ``W0``, as PSOFT) and gradient-informed subspaces.

Strategies that build ``P`` are plain functions; :func:`select_supports` is the task-aware step
that fills gradient-informed supports from a few batches of data. Buffers are persistent, so the
support is saved with the adapter: random and gradient supports cannot be recomputed from the
config, and storing principal ones avoids SVD sign ambiguity on reload.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import quantized

if TYPE_CHECKING:
    from .model import OrthoModel


class FullSupport(nn.Module):
    """Every coordinate: ``P = I``."""

    ready = True

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim


class _StoredSupport(nn.Module):
    """A support held in one persistent buffer; a task-aware one stays unset until selected."""

    buffer_name = ""

    def __init__(self, value: Tensor, task_aware: bool) -> None:
        super().__init__()
        self.task_aware = task_aware
        self.register_buffer(self.buffer_name, value)
        self.ready = self.is_set()

    def is_set(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def assign(self, value: Tensor) -> None:
        """Set the support (what :func:`select_supports` calls)."""
        with torch.no_grad():
            getattr(self, self.buffer_name).copy_(value)
        self.ready = True

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.ready = self.is_set()


class CoordinateSupport(_StoredSupport):
    """``r`` coordinates (indices into the input); task-aware ones start unset (-1)."""

    buffer_name = "index"

    def __init__(self, index: Tensor, task_aware: bool = False) -> None:
        self.dim = index.numel()
        super().__init__(index, task_aware)

    def is_set(self) -> bool:
        return bool((self.index >= 0).all())


class DenseSupport(_StoredSupport):
    """An orthonormal basis ``P`` (d x r); task-aware ones start as zeros until selected."""

    buffer_name = "P"

    def __init__(self, P: Tensor, task_aware: bool = False) -> None:
        self.dim = P.shape[1]
        super().__init__(P, task_aware)

    def is_set(self) -> bool:
        return bool(self.P.abs().sum() > 0)


# --------------------------------------------------------------------------- strategies
def coordinate_basis(r: int, device: torch.device | None = None) -> Tensor:
    """The first ``r`` coordinates: a coordinate block."""
    return torch.arange(r, device=device)


def random_basis(d: int, r: int, like: Tensor) -> Tensor:
    """A uniformly random orthonormal ``P`` (d x r): QR of a Gaussian matrix, signs fixed."""
    Q, Rq = torch.linalg.qr(torch.randn(d, r, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(Rq))  # Haar-distributed
    return Q.to(dtype=like.dtype, device=like.device)


def principal_basis(W: Tensor, r: int, svd: str = "full", niter: int = 10, seed: int = 0) -> Tensor:
    """Top-``r`` right singular vectors of ``W`` (d_out x d_in): PSOFT's principal subspace.

    ``svd="lowrank"`` runs ``torch.svd_lowrank`` under a forked RNG seeded with ``seed``, exactly as
    peft 0.21 does, so both libraries find the same subspace.
    """
    W = W.detach().float()
    if svd == "full":
        return torch.linalg.svd(W, full_matrices=False).Vh[:r].T.contiguous()
    fork = {"devices": []} if W.device.type == "cpu" else {"devices": [W.device], "device_type": W.device.type}
    with torch.random.fork_rng(**fork):
        torch.manual_seed(seed)
        _, _, V = torch.svd_lowrank(W, q=r, niter=niter)
    return V[:, :r].contiguous()


def skew_statistic(W0: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """``(X, Y)`` with ``X Y^T = Skew(W0^T G) = (W0^T G - G^T W0) / 2`` (d_in x d_in), never formed.

    For ``W = W0 exp(S)`` the loss gradient with respect to a skew generator ``S`` at ``S = 0`` is
    ``Skew(W0^T G)`` (``G = dL/dW``): LOFT's first-order statistic for task-aware supports.
    ``X = [W0^T, G^T]``, ``Y = [G^T, -W0^T] / 2``, both d_in x 2 d_out.
    """
    return torch.cat([W0.T, G.T], 1), 0.5 * torch.cat([G.T, -W0.T], 1)


def gradient_basis(W0: Tensor, G: Tensor, r: int) -> Tensor:
    """The ``r`` dominant directions of ``Skew(W0^T G)``: its top-``r`` singular vectors.

    Among all r-dimensional supports these maximise ``||P^T Skew(W0^T G) P||_F``, the first-order
    decrease a rotation inside the support can buy. A skew matrix's singular values come in equal
    pairs (its invariant planes), so an even ``r`` takes whole planes. From the factors (two thin
    QRs, O(d_in d_out^2)) when ``2 d_out < d_in``; otherwise from the eigenvectors of ``K^T K``,
    which needs the dense d_in x d_in statistic of one layer at a time.
    """
    X, Y = skew_statistic(W0.double(), G.double())
    if X.shape[1] < X.shape[0]:
        Qx, Rx = torch.linalg.qr(X)
        _, Ry = torch.linalg.qr(Y)
        U = Qx @ torch.linalg.svd(Rx @ Ry.T).U
    else:
        K = X @ Y.T
        U = torch.linalg.eigh(K.T @ K).eigenvectors.flip(-1)  # eigh sorts ascending
    if U.shape[1] < r:  # the statistic has rank < r: complete the basis orthogonally
        fill = torch.randn(U.shape[0], r - U.shape[1], dtype=U.dtype, device=U.device)
        U = torch.linalg.qr(torch.cat([U, fill - U @ (U.T @ fill)], 1)).Q
    return U[:, :r].to(W0.dtype)


def gradient_coordinates(W0: Tensor, G: Tensor, r: int) -> Tensor:
    """The ``r`` coordinates whose rows of ``Skew(W0^T G)`` carry the most first-order mass (sorted).

    orthotune's coordinate variant of the gradient-informed support (a greedy stand-in for the
    best coordinate block, which no closed form gives): row norms from the factors, O(d_in d_out^2).
    """
    X, Y = skew_statistic(W0.double(), G.double())
    row_norms = ((X @ (Y.T @ Y)) * X).sum(1)
    return torch.sort(torch.topk(row_norms, r).indices).values


def captured_fraction(W0: Tensor, G: Tensor, P: Tensor) -> float:
    """``||P^T K P||_F / ||K||_F`` for ``K = Skew(W0^T G)``: the share of the first-order signal a
    support sees (about ``r/d`` for a random one, near 1 for a gradient-informed one)."""
    X, Y = skew_statistic(W0.double(), G.double())
    P = P.double()
    total = ((X.T @ X) * (Y.T @ Y)).sum().clamp_min(0).sqrt()  # ||X Y^T||_F without the d x d product
    inside = torch.linalg.matrix_norm((P.T @ X) @ (Y.T @ P))
    return float(inside / total) if total > 0 else 0.0


def second_moment_basis(M: Tensor, r: int) -> Tensor:
    """The top-``r`` eigenvectors of ``M = sum_b K_b^T K_b`` (``K_b`` one batch's ``Skew(W0^T G_b)``).

    The ``statistic="second_moment"`` support: directions where the per-batch first-order signal is
    large, whether or not its sign agrees across batches (the mean gradient's signal can cancel).
    """
    return torch.linalg.eigh(M.double()).eigenvectors.flip(-1)[:, :r].contiguous()


# --------------------------------------------------------------------------- the task-aware step
LossFn = Callable[[nn.Module, Any], Tensor]
STATISTICS = ("mean", "second_moment")


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


def select_supports(
    model: OrthoModel,
    data: Iterable[Any],
    num_batches: int = 8,
    loss_fn: LossFn | None = None,
    adapter_name: str | None = None,
    progress: bool = True,
    head_warmup_steps: int = 0,
    head_lr: float = 1e-3,
    statistic: str = "mean",
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
    the mean gradient's ``K``; it holds one d_in x d_in matrix per targeted layer.

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
                if isinstance(support, DenseSupport):
                    P = gradient_basis(W0, G, support.dim) if statistic == "mean" else second_moment_basis(moments[lname], support.dim)
                    support.assign(P.to(support.P.dtype))
                elif statistic == "second_moment":
                    idx = torch.sort(torch.topk(torch.diagonal(moments[lname]), support.dim).indices).values
                    support.assign(idx.to(support.index.device))
                    P = torch.eye(W0.shape[1], dtype=torch.float64)[:, idx.cpu()]
                else:
                    idx = gradient_coordinates(W0, G, support.dim)
                    support.assign(idx.to(support.index.device))
                    P = torch.eye(W0.shape[1], dtype=torch.float64)[:, idx.cpu()]
                report[lname] = {"captured_fraction": captured_fraction(W0.cpu(), G.cpu(), P.cpu()), "batches": seen}
    finally:
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
