"""LoCA's location learning: the alternating schedule, for a plain loop and for the HF Trainer.

The paper (Du et al., ICLR 2025, arXiv:2502.06820) learns the n cells of each LoCA spectrum with
finite-difference gradients in three stages, counted in optimiser steps t:

* ``t < B_s``, ``t mod (B_a + B_l) < B_a``: coefficient phase, the locations stay put;
* ``t < B_s`` otherwise: location phase, the coefficients are frozen and Adam moves the locations
  (continuous positions in [0, 1] of the spectrum's extent, rounded to cells in the forward);
* ``t >= B_s``: the locations are frozen for good and only the coefficients train.

Paper defaults: B_a = 10, B_l = 20, B_s = 10% of the training steps, location lr 1e-4.

    learner = LocationLearner(model, total_steps=1000)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        learner.step()          # once per optimiser step, after optimizer.step()
    learner.finish()

With the HF Trainer: ``Trainer(..., callbacks=[LoCACallback()])`` (``transformers`` is imported
only when ``LoCACallback`` is first used).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .loca import LoCA, LoCAConfig

COEFFICIENTS, LOCATIONS, FROZEN = "coefficients", "locations", "frozen"
_SCHEDULE_FIELDS = ("location_lr", "coefficient_steps", "location_steps", "location_learning_steps", "location_learning_fraction")


class LocationLearner:
    """Runs LoCA's alternating coefficient / location schedule on every trainable LoCA adapter of a model.

    ``total_steps`` (optimiser steps) sets ``B_s = round(location_learning_fraction * total_steps)``
    unless the config fixes ``location_learning_steps``. ``start_step`` resumes a schedule. Under
    ``torch.distributed`` the location gradients are averaged over ranks so every rank moves the
    same cells (coefficients are frozen in location phases: use DDP's ``find_unused_parameters``).
    """

    def __init__(self, model: nn.Module, total_steps: int | None = None, start_step: int = 0) -> None:
        modules = [m for m in model.modules() if isinstance(m, LoCA) and m.config.learn_locations and m.spectrum.requires_grad]
        if not modules:
            raise ValueError(
                "no trainable LoCA adapter with learn_locations=True in this model: wrap it with LoCAConfig(...) "
                "and make that adapter active before creating the LocationLearner"
            )
        config = modules[0].config
        differ = [f for f in _SCHEDULE_FIELDS if any(getattr(m.config, f) != getattr(config, f) for m in modules)]
        if differ:
            raise ValueError(f"the LoCA adapters of this model disagree on {differ}: use one LocationLearner per adapter")
        self.config: LoCAConfig = config
        self.learning_steps = _learning_steps(config, total_steps)
        self.modules = modules
        self.step_count = start_step
        self.positions = [(m.locations.float() / m.extent().clamp(min=1)).requires_grad_() for m in modules]
        self.optimizer: torch.optim.Optimizer | None = torch.optim.Adam(self.positions, lr=config.location_lr)
        self._start = [m.locations.clone() for m in modules]
        self.phase = ""
        self._enter(self.phase_at(start_step))

    def phase_at(self, step: int) -> str:
        """'coefficients', 'locations' or 'frozen' for optimiser step ``step`` (0-based)."""
        if step >= self.learning_steps:
            return FROZEN
        cycle = self.config.coefficient_steps + self.config.location_steps
        return COEFFICIENTS if step % cycle < self.config.coefficient_steps else LOCATIONS

    def step(self) -> None:
        """Finish the optimiser step just taken (move the locations after a location phase step), then set up the next."""
        if self.phase == LOCATIONS:
            self._update_locations()
        self.step_count += 1
        if self.phase != FROZEN:  # frozen is final, also after an early finish()
            self._enter(self.phase_at(self.step_count))

    def finish(self) -> None:
        """End location learning now: locations frozen, coefficients trainable (also right after an interrupted run)."""
        self._enter(FROZEN)

    def moved_fraction(self) -> float:
        """Fraction of all cells that differ from where they were when this learner started."""
        moved = sum(int((m.locations != s).any(0).sum()) for m, s in zip(self.modules, self._start))
        return moved / sum(m.locations.shape[1] for m in self.modules)

    @torch.no_grad()
    def _update_locations(self) -> None:
        for p in self.positions:
            if p.grad is None:  # a layer this step did not use
                p.grad = torch.zeros_like(p)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in self.positions])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            offset = 0
            for p in self.positions:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for m, p in zip(self.modules, self.positions):
            p.clamp_(0.0, 1.0)  # projected step: positions stay inside the spectrum
            m.locations.copy_((p * m.extent()).round().long())

    def _enter(self, phase: str) -> None:
        if phase == self.phase:
            return
        for m, p in zip(self.modules, self.positions):
            learning = phase == LOCATIONS
            m.spectrum.requires_grad_(not learning)
            if learning:
                m.spectrum.grad = None  # no optimiser (or momentum) update of frozen coefficients
            m.relaxed_locations = p if learning else None
        if phase == FROZEN:
            self.positions, self.optimizer = [], None
        self.phase = phase


def _learning_steps(config: LoCAConfig, total_steps: int | None) -> int:
    if config.location_learning_steps is not None:
        return config.location_learning_steps
    if total_steps is None or isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 0:
        raise ValueError(
            f"LocationLearner needs total_steps (the number of optimiser steps, got {total_steps!r}) to set "
            "B_s = location_learning_fraction * total_steps, or a config with location_learning_steps set"
        )
    return round(config.location_learning_fraction * total_steps)


@functools.cache
def _callback_class() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError as err:  # pragma: no cover - transformers is installed with orthotune[hf]
        raise ImportError("LoCACallback needs transformers: pip install 'orthotune[hf]'") from err

    class LoCACallback(TrainerCallback):
        """Runs a :class:`LocationLearner` inside ``transformers.Trainer`` (B_s from ``state.max_steps``)."""

        def __init__(self) -> None:
            self.learner: LocationLearner | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
            self.learner = LocationLearner(model, total_steps=state.max_steps, start_step=state.global_step)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.learner.step()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.learner.finish()

    LoCACallback.__module__, LoCACallback.__qualname__ = __name__, "LoCACallback"  # picklable by name
    return LoCACallback


def __getattr__(name: str) -> Any:
    if name == "LoCACallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
