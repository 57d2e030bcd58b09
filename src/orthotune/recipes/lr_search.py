"""``train.lr: auto`` (``orthotune finetune --lr auto``): a short, seeded learning-rate range test on the training data.

Candidates are the method's default rate (:meth:`~orthotune.methods.config.AdapterConfig.default_learning_rate`)
times :data:`FACTORS`; while the best one is the highest (lowest) tried, the grid grows by another factor of 3
upwards (downwards), at most :data:`MAX_EXTENSIONS` times: the evaluation table found best rates from 1/3x
(LOFT, PSOFT on the LM) to 9x (LoCO on a ViT transfer) the defaults. Each one trains a fresh copy of the run's
model (same seed, same initialisation, same support selection) for a short run with the recipe's optimiser and
schedule. Where the run's data has a validation split (the bundled sets' ``val`` / ``dev``, or a
``validation_file``), each trial trains on the training set and is scored by the task's metric on that split, as
a validation sweep would; otherwise it trains on the first batches of the first epoch's order and is scored by
the mean training loss on the last few batches of that epoch, which it never trained on (on a 20-shot task that
is one batch: too small a sample, ``benchmarks/results/vit_cpu_grids/``). The test split is never touched. The
best (a diverged trial scores worst) becomes ``train.lr`` of the full run; everything is recorded in
``lr_search.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .loop import fit, resolve_device
from .runconfig import FULL, RunConfig
from .task import Task, from_mapping
from .tasks import TASKS

AUTO = "auto"
FACTORS = (1 / 3, 1.0, 3.0)  # the grid the standard loop and the quality table sweep
STEP = 3.0  # an extension's factor beyond the grid's edge
MAX_EXTENSIONS = 2
VALIDATION_SPLITS = ("val", "dev")  # the tasks' names for their tuning split
MAX_TRIAL_STEPS = 300
RECORD = "lr_search.json"


class TrainingSlice(Task):
    """``task`` seen through epoch 0's first batches (to train on); its last ``holdout`` batches score."""

    name = "lr-range-test"
    metric = "heldout_loss"
    higher_is_better = False

    def __init__(self, task: Task, batch_size: int, holdout: int) -> None:  # noqa: D107 - no Task.__init__: a view
        per_epoch = task.batches_per_epoch(batch_size)
        if per_epoch <= holdout:
            raise ValueError(f"train.lr=auto holds out {holdout} training batches to score the candidates, and the "
                             f"training set has only {per_epoch} batches of {batch_size}: use more training data or set train.lr")
        self.task, self.device, self.seed = task, task.device, task.seed
        self.train_batches = per_epoch - holdout
        self.heldout = [task.train_batch(0, i, batch_size) for i in range(self.train_batches, per_epoch)]
        self.batch_size = batch_size

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.train_batches

    def train_size(self) -> int:
        return self.train_batches * self.batch_size

    def train_batch(self, epoch: int, index: int, batch_size: int) -> Any:
        return self.task.train_batch(0, index, batch_size)  # always epoch 0's order: the held-out batches stay unseen

    def loss(self, model: nn.Module, batch: Any, step: int) -> torch.Tensor:
        return self.task.loss(model, batch, step)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Mean training loss over the held-out batches (fixed per-batch noise seeds, the same for every candidate)."""
        was_training = model.training
        model.eval()
        losses = [float(self.task.loss(model, b, -1 - i)) for i, b in enumerate(self.heldout)]
        model.train(was_training)
        return {self.metric: sum(losses) / len(losses)}


def with_lr(config: RunConfig, lr: float) -> RunConfig:
    """``config`` with ``train.lr = lr``."""
    return dataclasses.replace(config, train=dataclasses.replace(config.train, lr=lr))


def trial_steps(config: RunConfig, per_epoch: int) -> int:
    """Steps of each candidate's run: a quarter of the full run, at most :data:`MAX_TRIAL_STEPS`."""
    return max(1, min(MAX_TRIAL_STEPS, math.ceil(config.train.total_steps(per_epoch) / 4)))


def holdout_batches(per_epoch: int) -> int:
    """Training batches kept back to score: a tenth of an epoch, between 1 and 8."""
    return max(1, min(8, per_epoch // 10))


#: ``prepare(config, view_of) -> (view, model)``: the run's model for ``config`` and ``view_of(task)``, its data-driven
#: set-up (LOFT's support selection) done on the view's training batches (``finetune.trial``)
Prepare = Callable[[RunConfig, Callable[[Task], Task]], tuple[Task, nn.Module]]


def validation_data(config: RunConfig) -> dict[str, Any] | None:
    """``config.data`` scoring the run's validation split (``eval_split`` ``val`` or ``dev``), or None if it has none."""
    settings = TASKS[config.task].DataSettings
    for split in VALIDATION_SPLITS:
        data = {**config.data, "eval_split": split}
        try:
            from_mapping(settings, data, "data")
        except (ValueError, TypeError):  # not a split of this task, or its file is not given
            continue
        return data
    return None


def next_factor(trials: list[dict[str, Any]]) -> float | None:
    """The factor to try next: one :data:`STEP` beyond the grid's edge when the best finite trial lies on it, else None."""
    finite = [t for t in trials if t["score"] is not None]
    if not finite:
        return None
    best = min(finite, key=lambda t: t["score"])["factor"]
    factors = [t["factor"] for t in trials]
    if best == max(factors):
        return best * STEP
    if best == min(factors):
        return best / STEP
    return None


def search_lr(config: RunConfig, prepare: Prepare, progress: bool = False, factors: tuple[float, ...] = FACTORS,
              max_extensions: int = MAX_EXTENSIONS) -> dict[str, Any]:
    """Run the range test for ``config`` (whose ``train.lr`` is ``"auto"``); returns the record, ``chosen`` included."""
    if config.method == FULL:
        raise ValueError("train.lr=auto centres its candidates on a method's default rate; full fine-tuning has none: set train.lr")
    centre = config.adapter_config().default_learning_rate()
    per_epoch = TASKS[config.task](config.model, config.data, config.seed, resolve_device(config.device)).batches_per_epoch(
        config.train.batch_size)
    val_data = validation_data(config)
    steps = trial_steps(config, per_epoch)
    if val_data is not None:  # train on the whole training set, score on the validation split
        trial_config, holdout = dataclasses.replace(config, data=val_data), None
        view_of: Callable[[Task], Task] = lambda task: task
    else:
        trial_config, holdout = config, holdout_batches(per_epoch)
        view_of = lambda task: TrainingSlice(task, settings.batch_size, holdout)
    full_total = config.train.total_steps(per_epoch)
    settings = dataclasses.replace(
        config.train, lr=centre, steps=steps, epochs=None, eval_every=0, eval_before=False, save_every=0, compile=False,
        warmup=config.train.warmup_steps(full_total) / full_total,
    )
    trials: list[dict[str, Any]] = []
    queue = list(factors)
    with tempfile.TemporaryDirectory() as scratch:
        while queue:
            factor = queue.pop(0)
            lr = centre * factor
            view, model = prepare(with_lr(trial_config, lr), view_of)
            try:
                fitted = fit(model, view, dataclasses.replace(settings, lr=lr), Path(scratch), progress=progress)
                value = fitted.history["eval"][-1][1][view.metric]
            except FloatingPointError:  # a diverged candidate is a result, not a failure
                value = math.nan
            score = -value if view.higher_is_better else value  # lower is better
            finite = math.isfinite(score)
            trials.append({"lr": lr, "factor": factor, view.metric: value if finite else None, "score": score if finite else None})
            del model
            extensions = len(trials) - len(factors)
            if not queue and extensions < max_extensions and (beyond := next_factor(trials)) is not None:
                queue.append(beyond)
    finite = [t for t in trials if t["score"] is not None]
    if not finite:
        raise ValueError(f"every learning rate of the range test diverged ({[t['lr'] for t in trials]}): set train.lr lower")
    best = min(finite, key=lambda t: t["score"])
    scored_by = (f"{view.metric} on the validation split ({val_data['eval_split']})" if val_data is not None
                 else "mean training loss on held-out training batches")
    record = {"chosen": best["lr"], "centre": centre, "trials": trials, "extensions": len(trials) - len(factors),
              "steps_per_trial": steps, "batch_size": settings.batch_size, "score": scored_by, "seed": config.seed}
    if holdout is not None:
        record.update(train_batches=view.train_batches, heldout_batches=holdout)
    return record


def resolve_lr(config: RunConfig, run_dir: Path, resume: bool, progress: bool,
               prepare: Prepare) -> tuple[RunConfig, dict[str, Any] | None]:
    """``config`` with ``train.lr`` a number: unchanged if it is one, else chosen by :func:`search_lr` (or, when
    resuming, read from the run folder's record) and the record written to ``run_dir/lr_search.json``."""
    if config.train.lr != AUTO:
        return config, None
    record_file = run_dir / RECORD
    if resume and record_file.is_file():
        record = json.loads(record_file.read_text())
    else:
        record = search_lr(config, prepare, progress)
        run_dir.mkdir(parents=True, exist_ok=True)
        record_file.write_text(json.dumps(record, indent=1) + "\n")
    return with_lr(config, record["chosen"]), record
