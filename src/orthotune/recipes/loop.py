"""The shared training loop of every recipe: optimiser, schedule, evaluation, checkpoints, resume.

Method-specific steps come from the model itself: LoCA adapters that learn their locations get a
:class:`~orthotune.methods.loca.schedule.LocationLearner` (its alternating schedule runs inside the loop and
is checkpointed with it). Everything stochastic is either derived from (seed, step) by the task or
drawn from RNGs that checkpoints save, so an interrupted run resumes bit-identically on CPU.

Under DDP / FSDP (``model`` wrapped by :func:`orthotune.training.distributed.wrap`) every rank builds the same
global batch and trains on its slice, with the loss weighted so that the averaged gradient is the
whole batch's; the logged loss is the whole batch's mean. Every rank evaluates (the same numbers);
rank 0 alone shows progress and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..methods.loca.loca import LoCA
from ..methods.loca.schedule import LocationLearner
from ..training import distributed
from ..training.graphs import COMPILE_MODES, compile_settings
from .checkpoint import load_trainer_state, load_weights_inplace, rng_state, save_checkpoint, set_rng_state
from .settings import TrainSettings
from .task import Task


@dataclass
class FitResult:
    history: dict[str, list] = field(default_factory=lambda: {"train": [], "eval": []})
    steps_done: int = 0
    total_steps: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    interrupted: bool = False


def make_optimizer(params: list[nn.Parameter], s: TrainSettings) -> torch.optim.Optimizer:
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


class Schedule:
    """Linear warm-up to the peak, then cosine / linear decay to zero, or constant (a picklable callable)."""

    def __init__(self, kind: str, warmup: int, total: int) -> None:
        self.kind, self.warmup, self.total = kind, warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        if self.kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def compiled_for_training(model: nn.Module, setting: bool | str, device_type: str, world: int) -> nn.Module:
    """What the loop's steps call: ``torch.compile(model, mode=...)`` (sharing its parameters) when ``train.compile``
    says so (``auto``: on CUDA in one process, where the step is host-bound; ``auto`` and ``true`` in the default
    mode, a mode name in that mode), else ``model``. Evaluation stays eager."""
    if setting is False or (setting == "auto" and (device_type != "cuda" or world != 1)):
        return model
    return torch.compile(model, mode=setting if setting in COMPILE_MODES else "default")


def _location_learner(model: nn.Module, total: int, start: int) -> Any:
    if not any(isinstance(m, LoCA) and m.config.learn_locations and m.spectrum.requires_grad for m in model.modules()):
        return None
    return LocationLearner(model, total_steps=total, start_step=start)


def _learner_state(learner: Any) -> dict[str, Any] | None:
    if learner is None:
        return None
    return {
        "positions": [p.detach().clone() for p in learner.positions],
        "optimizer": learner.optimizer.state_dict() if learner.optimizer is not None else None,
        "start": [s.clone() for s in learner._start],
    }


@torch.no_grad()
def _restore_learner(learner: Any, state: dict[str, Any] | None) -> None:
    if learner is None or state is None:
        return
    for p, saved in zip(learner.positions, state["positions"]):
        p.copy_(saved)
    if learner.optimizer is not None and state["optimizer"] is not None:
        learner.optimizer.load_state_dict(state["optimizer"])
    learner._start = [s.to(m.locations.device) for s, m in zip(state["start"], learner.modules)]


def progress_postfix(loss: float, evals: list, metric: str) -> dict[str, str]:
    """The progress bar's live numbers: this step's loss and the latest evaluation, labelled with its step."""
    postfix = {"loss": f"{loss:.4f}"}
    if evals and metric in evals[-1][1]:
        step, metrics = evals[-1]
        postfix[f"{metric}@{step}"] = f"{metrics[metric]:.4f}"
    return postfix


def fit(
    model: nn.Module,
    task: Task,
    settings: TrainSettings,
    run_dir: Path,
    *,
    resume_from: Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> FitResult:
    """Train ``model``'s trainable parameters on ``task``; returns the history and timings.

    ``resume_from`` is a checkpoint folder of this run; ``stop_after`` ends the loop after that many
    steps as an interruption would (after any checkpoint due at that step).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: did the adapter match any module?")
    per_epoch = task.batches_per_epoch(settings.batch_size)
    total = settings.total_steps(per_epoch)
    optimizer = make_optimizer(params, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(settings.schedule, settings.warmup_steps(total), total))
    result = FitResult(total_steps=total)
    start = 0
    state = None
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        if state["total_steps"] != total:
            raise ValueError(f"the checkpoint was written for a {state['total_steps']}-step run, this run has {total}; keep train.steps/epochs as they were")
        load_weights_inplace(model, resume_from / "adapter")
        distributed.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        result.history = state["history"]
        result.train_seconds, result.eval_seconds = state["train_seconds"], state["eval_seconds"]
        start = state["step"]
    learner = _location_learner(model, total, start)
    if state is not None:
        _restore_learner(learner, state["learner"])
        set_rng_state(state["rng"])  # last: nothing after this may draw random numbers before training

    device_type = next(iter(params)).device.type
    autocast = (
        torch.autocast(device_type, dtype=torch.bfloat16 if settings.autocast == "bf16" else torch.float16)
        if settings.autocast and device_type == "cuda"
        else contextlib.nullcontext()
    )

    def evaluate(step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        with autocast:
            metrics = task.evaluate(distributed.unwrap(model))
        result.eval_seconds += time.perf_counter() - t0
        result.history["eval"].append([step, metrics])
        return metrics

    if start == 0 and settings.eval_before and not result.history["eval"]:
        evaluate(0)
    main = distributed.is_main_process()
    world, rank = distributed.world_size(), distributed.rank()
    bar = tqdm(total=total, initial=start, desc=f"fine-tune {task.name}", disable=not (progress and main), dynamic_ncols=True)
    forward = compiled_for_training(model, settings.compile, device_type, world)
    model.train()
    step = start
    t_start = time.perf_counter()
    eval_in_loop = 0.0
    try:
        while step < total:
            epoch, index = divmod(step, per_epoch)
            batch, share = task.train_batch(epoch, index, settings.batch_size), 1.0
            if world > 1:
                batch, share = distributed.shard_batch(batch, rank, world)
            with autocast, compile_settings(forward is not model):  # ranks draw distinct noise (diffusion) from distinct seeds
                loss = task.loss(forward, batch, step if world == 1 else step * world + rank)
            mean = distributed.global_mean(loss, share)
            if not torch.isfinite(mean):
                raise FloatingPointError(f"the loss is {float(mean)} at step {step}: lower train.lr or set train.grad_clip")
            (loss if world == 1 else loss * (share * world)).backward()
            if settings.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if learner is not None:
                learner.step()
            step += 1
            value = mean.detach().item()
            result.history["train"].append([step, value, lr])
            if (settings.eval_every and step % settings.eval_every == 0) or step == total:
                t0 = time.perf_counter()
                evaluate(step)
                eval_in_loop += time.perf_counter() - t0
                model.train()
            bar.set_postfix(progress_postfix(value, result.history["eval"], task.metric))
            bar.update()
            if settings.save_every and step % settings.save_every == 0 and step < total:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - t_start - eval_in_loop
                weights = distributed.full_state(model) if distributed.is_sharded(model) else None  # collectives:
                optimizer_state = distributed.optimizer_state(model, optimizer)  # every rank takes part
                if main:
                    save_checkpoint(run_dir, step, distributed.unwrap(model), {
                        "step": step, "epoch": step // per_epoch, "batch_index": step % per_epoch, "total_steps": total,
                        "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                        "learner": _learner_state(learner), "history": result.history, "rng": rng_state(),
                        "train_seconds": result.train_seconds + elapsed, "eval_seconds": result.eval_seconds,
                    }, settings.keep_checkpoints, weights=weights)
                distributed.barrier()
            if stop_after is not None and step >= stop_after and step < total:
                result.interrupted = True
                break
    finally:
        bar.close()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        result.train_seconds += time.perf_counter() - t_start - eval_in_loop
    if learner is not None and not result.interrupted:
        learner.finish()
    model.eval()
    result.steps_done = step
    return result


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
