"""What a recipe's task provides to the shared training loop (:mod:`orthotune.recipes.loop`).

A task owns its model, data and metric; the loop owns optimisation, checkpoints and logging. Batches
are addressed by ``(epoch, index)`` and built deterministically from the run's seed, so a resumed
run sees exactly the batches the uninterrupted one would have seen, whatever the RNG did meanwhile.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


def from_mapping(cls: type, values: dict[str, Any], where: str) -> Any:
    """Build settings dataclass ``cls`` from a mapping, naming unknown keys and the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {where} settings {unknown} for this task; known are {sorted(known)}")
    settings = cls(**values)
    check = getattr(settings, "validate", None)
    if check is not None:
        check()
    return settings


def check_pad_to_multiple_of(value: Any) -> None:
    """``model.pad_to_multiple_of``: null or a positive integer (transformers' collator argument of that name)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"model.pad_to_multiple_of must be a positive integer or null, got {value!r} "
                         "(e.g. 64: every batch's length rounded up to a multiple of 64)")


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a function of (seed, epoch) alone."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def batch_indices(n: int, batch_size: int, seed: int, epoch: int, index: int) -> list[int]:
    """Example indices of batch ``index`` of ``epoch`` (the last batch of an epoch may be smaller)."""
    order = epoch_order(n, seed, epoch)
    return order[index * batch_size : (index + 1) * batch_size]


class Task:
    """Base class of the recipe tasks; subclasses set the class attributes and the methods below."""

    name: ClassVar[str]
    metric: ClassVar[str]  # the headline metric in evaluate()'s dict
    higher_is_better: ClassVar[bool] = True
    default_targets: ClassVar[list[str] | str | None] = None
    default_modules_to_save: ClassVar[list[str] | None] = None
    ModelSettings: ClassVar[type]
    DataSettings: ClassVar[type]

    def __init__(self, model: dict[str, Any], data: dict[str, Any], seed: int, device: torch.device) -> None:
        self.model_settings, self.data_settings = self.settings(model, data)
        self.seed = seed
        self.device = device
        self.record: dict[str, Any] = {}  # check_data()'s, once a run has checked its data

    @classmethod
    def settings(cls, model: dict[str, Any], data: dict[str, Any]) -> tuple[Any, Any]:
        return from_mapping(cls.ModelSettings, model, "model"), from_mapping(cls.DataSettings, data, "data")

    # ------------------------------------------------------------------ to implement
    def build_model(self, fresh: bool = True) -> nn.Module:
        """The base model on ``self.device``; ``fresh`` runs data-dependent initialisation (head init)."""
        raise NotImplementedError

    def train_size(self) -> int:
        raise NotImplementedError

    def train_batch(self, epoch: int, index: int, batch_size: int) -> Any:
        """Batch ``index`` of ``epoch``, on the device; a function of (seed, epoch, index) alone."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any, step: int) -> Tensor:
        """The training loss of one batch (``step`` seeds any per-step noise)."""
        return model(**batch)["loss"]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics, ``self.metric`` among them; must not touch the global RNG."""
        raise NotImplementedError

    def artifacts(self, model: nn.Module, out_dir: Path) -> list[str]:
        """Extra outputs of a finished run (e.g. a sample grid); returns the files written."""
        return []

    def check_data(self) -> dict[str, Any]:
        """Load and check every data file before training; returns what the run folder records
        (``data.json``; its ``settings`` replace the recipe's data settings when the run is reloaded)."""
        return {}

    def save_merged(self, model: nn.Module, directory: Path) -> None:
        """Write a merged plain model (no orthotune layers) into the empty folder ``directory``."""
        raise NotImplementedError

    def merge_options(self) -> dict[str, Any]:
        """Keyword arguments of ``merge_and_unload`` for this task's base model (none by default)."""
        return {}

    def init_adapters(self, model: nn.Module) -> None:
        """A start for the adapters of a fresh model that needs the task's files (none by default)."""

    def save_base(self, model: nn.Module, run_dir: Path) -> None:
        """Write into the run folder what of the base ``init_adapters`` changed (nothing by default)."""

    def restore_base(self, model: nn.Module, run_dir: Path) -> None:
        """Put back into a freshly built base what :meth:`save_base` wrote, before its adapter is loaded."""

    # ------------------------------------------------------------------ shared
    def batches_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self.train_size() / batch_size)


def classifier_head(model: nn.Module, names: tuple[str, ...]) -> nn.Linear:
    """The model's linear classification head, the first of ``names`` it has (transformers: classifier / score)."""
    for name in names:
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return head
    raise ValueError(f"model.head_init=class_means needs a linear head named one of {list(names)} on "
                     f"{type(model).__name__}; set model.head_init=random")


@torch.no_grad()
def init_head_from_class_means(model: nn.Module, head: nn.Linear, batches: Any, scale: float) -> None:
    """Make ``head`` the nearest-class-mean classifier of the frozen features that enter it.

    ``logits_c = t (f . mu_c - |mu_c|^2 / 2)`` ranks classes by ``-|f - mu_c|^2``, with ``t = scale /
    mean_c |mu_c|^2`` (logits of a few units). Classes with no training example get the lowest
    bias, so they are never predicted at step 0. ``batches`` carry ``labels``.
    """
    num_labels, dim = head.weight.shape
    sums = torch.zeros(num_labels, dim, dtype=torch.float64, device=head.weight.device)
    counts = torch.zeros(num_labels, dtype=torch.float64, device=head.weight.device)
    seen: list[Tensor] = []
    hook = head.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = dict(batch)
            labels = batch.pop("labels")
            model(**batch)
            sums.index_add_(0, labels, seen.pop().double())
            counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
    finally:
        hook.remove()
        model.train(was_training)
    present = counts > 0
    means = sums / counts.clamp_min(1).unsqueeze(1)
    sq = (means * means).sum(1)
    t = scale / float(sq[present].mean().clamp_min(1e-12))
    bias = -0.5 * t * sq
    bias[~present] = float(bias[present].min()) - scale
    head.weight.copy_(t * means)
    head.bias.copy_(bias)


@torch.no_grad()
def accuracy(model: nn.Module, batches: Any) -> float:
    """Top-1 accuracy of a classifier returning ``{"logits": ...}`` over labelled batches."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in batches:
        batch = dict(batch)
        labels = batch.pop("labels")
        correct += int((model(**batch)["logits"].argmax(-1) == labels).sum())
        total += len(labels)
    model.train(was_training)
    return correct / max(total, 1)
