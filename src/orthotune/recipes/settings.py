"""The training settings of a run (a recipe's ``train:``): optimiser, schedule, evaluation, checkpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..methods.config import check_choice
from ..training.graphs import COMPILE_MODES
from ..training.support_selection import STATISTICS

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
AUTOCAST = (None, "bf16", "fp16")
COMPILE = ("auto", True, False, *COMPILE_MODES)


@dataclass
class TrainSettings:
    """Optimisation, evaluation and checkpointing of a run."""

    steps: int | None = field(default=None, metadata={"help": "Optimiser steps; set this or epochs."})
    epochs: float | None = field(default=None, metadata={"help": "Passes over the training set (rounded up to whole steps)."})
    batch_size: int = field(default=32, metadata={"help": "Examples per optimiser step."})
    lr: float | str = field(
        default=1e-3, metadata={"help": "Peak learning rate, or 'auto': a short range test around the method's default "
                                "rate, scored on the validation split (held-out training batches without one), picks it "
                                "(orthotune.recipes.lr_search)."}
    )
    optimizer: str = field(default="adamw", metadata={"help": f"One of {list(OPTIMIZERS)}."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay (adamw) or L2 (adam, sgd)."})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    schedule: str = field(default="cosine", metadata={"help": f"Decay after warm-up: one of {list(SCHEDULES)}."})
    warmup: float = field(default=0.1, metadata={"help": "Linear warm-up: a fraction of the steps (< 1) or a step count."})
    grad_clip: float | None = field(default=1.0, metadata={"help": "Clip the gradient norm to this; null = no clipping."})
    eval_every: int = field(default=0, metadata={"help": "Evaluate every this many steps (0: only at the end)."})
    eval_before: bool = field(default=True, metadata={"help": "Evaluate the starting model (step 0) as a baseline."})
    save_every: int = field(default=0, metadata={"help": "Write a resumable checkpoint every this many steps (0: never)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "How many recent checkpoints to keep."})
    selection_batches: int = field(
        default=8, metadata={"help": "Batches for data-driven adapter set-up (LOFT's gradient-informed supports)."}
    )
    selection_statistic: str = field(
        default="mean", metadata={"help": "How LOFT's gradient supports rank directions: 'mean' (the mean gradient's "
                                  "first-order signal), 'second_moment' or 'whitened' (gain per unit of input energy; "
                                  "see orthotune.training.select_supports)."}
    )
    autocast: str | None = field(default=None, metadata={"help": "Mixed precision on a GPU: null, 'bf16' or 'fp16'."})
    compile: bool | str = field(
        default="auto", metadata={"help": "torch.compile the training forward: 'auto' (on CUDA, one process), true or "
                                  "false (both in torch.compile's default mode), or a mode: " + ", ".join(COMPILE_MODES[1:])
                                  + " ('reduce-overhead': CUDA graphs, the faster choice for fixed-shape batches; it records graphs per batch shape,"
                                  " so with text set model.pad_to_multiple_of, e.g. 64)."}
    )

    def validate(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of train.steps and train.epochs")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"train.steps must be a positive integer, got {self.steps!r}")
        if self.epochs is not None and not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise ValueError(f"train.epochs must be a positive number, got {self.epochs!r}")
        for name in ("batch_size", "keep_checkpoints", "selection_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"train.{name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"train.{name} must be an integer >= 0, got {value!r}")
        if self.lr != "auto" and not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"train.lr must be a positive finite number or 'auto', got {self.lr!r}")
        check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        check_choice("train.schedule", self.schedule, SCHEDULES)
        check_choice("train.selection_statistic", self.selection_statistic, STATISTICS)
        check_choice("train.autocast", self.autocast, AUTOCAST)
        if not isinstance(self.compile, (bool, str)) or self.compile not in COMPILE:
            raise ValueError(f"train.compile must be one of {list(COMPILE)} (auto, true or false, or a torch.compile "
                             f"mode), got {self.compile!r}")
        if not (isinstance(self.warmup, (int, float)) and self.warmup >= 0):
            raise ValueError(f"train.warmup must be >= 0 (a fraction < 1 or a step count), got {self.warmup!r}")
        if self.grad_clip is not None and not (self.grad_clip > 0):
            raise ValueError(f"train.grad_clip must be positive or null, got {self.grad_clip!r}")
        self.betas = tuple(self.betas)  # YAML gives a list

    def total_steps(self, batches_per_epoch: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * batches_per_epoch))

    def warmup_steps(self, total: int) -> int:
        return int(round(self.warmup * total)) if self.warmup < 1 else int(self.warmup)
