"""Run a recipe: build the task's model, wrap it with the method, train, evaluate, save; eval and merge.

A run folder holds ``config.yaml`` (the resolved recipe), ``adapter/`` (the trained adapter, or the
trained tensors of a full fine-tune), ``results.json``, ``curves.png``, any task artifacts (a
sample grid) and ``checkpoints/`` while it trains.

A run launched by torchrun or ``accelerate launch`` trains with DDP or FSDP (``distributed=``, see
:mod:`orthotune.training.distributed`); rank 0 alone writes the run folder, which is the same as a
single-process run's.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import orthotune

from ..model.adapter_model import AdapterModel
from ..model.io import staging_folder
from ..training import distributed as dist_run
from ..training.support_selection import select_supports
from ..version import __version__
from .assets import offline
from .checkpoint import latest_checkpoint, load_weights_inplace, save_weights
from .loop import fit, resolve_device, seed_everything
from .lr_search import AUTO, resolve_lr
from .plots import training_curves
from .runconfig import FULL, RunConfig, apply_overrides, read_mapping, write_config
from .task import Task
from .tasks import TASKS

DATA_RECORD = "data.json"  # the run's resolved data: absolute paths, columns, label list with ids, rows dropped


def build(config: RunConfig, fresh: bool = True, check: bool = False) -> tuple[Task, nn.Module]:
    """The task and its model wrapped for ``config.method`` (``fresh``: with data-dependent init;
    ``check``: every data file loaded and checked first, its record kept as ``task.record``)."""
    offline()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    task = TASKS[config.task](config.model, config.data, config.seed, device)
    task.record = task.check_data() if check else {}
    model = task.build_model(fresh=fresh)
    if config.method == FULL:
        for p in model.parameters():
            p.requires_grad_(True)
        return task, model

    model = orthotune.get_model(model, config.adapter_config())
    if fresh:
        task.init_adapters(model)
    return task, model


def needs_selection(model: nn.Module) -> bool:
    """True if an adapter has a task-aware support still to be chosen from data (LOFT ``support='gradient'``)."""
    return any(
        getattr(support, "task_aware", False) and not getattr(support, "ready", True)
        for support in (getattr(m, "support", None) for m in model.modules())
    )


def select(model: AdapterModel, task: Task, config: RunConfig, progress: bool) -> dict[str, Any]:
    """LOFT's selection step: gradient-informed supports from the first training batches."""
    n = config.train.selection_batches
    bs = config.train.batch_size
    per_epoch = task.batches_per_epoch(bs)
    data = (task.train_batch(*divmod(i, per_epoch), bs) for i in range(n))
    return select_supports(model, data, num_batches=n, loss_fn=lambda m, b: task.loss(m, b, -1), progress=progress,
                           statistic=config.train.selection_statistic)


def trial(config: RunConfig, view_of: Any) -> tuple[Task, nn.Module]:
    """A candidate of ``--lr auto``'s range test: a fresh model for ``config`` and ``view_of(task)`` (the training
    batches it may see), its supports selected from the view (:func:`orthotune.recipes.lr_search.search_lr`)."""
    task, model = build(config)
    view = view_of(task)
    if needs_selection(model):
        select(model, view, config, False)
    return view, model


def parameter_counts(model: nn.Module) -> dict[str, Any]:
    """Exact counts: trainable (with modules_to_save), adapter-only, total, per adapted layer."""
    if isinstance(model, AdapterModel):
        counts = model.trainable_parameters()
        layers = dict(model.adapter_layers())
        adapter = sum(n for name, n in counts["per_layer"].items() if name in layers)
        return {"trainable": counts["trainable"], "adapter": adapter, "total": counts["total"], "per_layer": counts["per_layer"]}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "adapter": trainable, "total": sum(p.numel() for p in model.parameters()), "per_layer": {}}


def environment() -> dict[str, Any]:
    import transformers

    env = {
        "orthotune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    return env


@dataclass
class Outcome:
    """A finished (or interrupted) run: its results and the trained model in memory."""

    results: dict[str, Any]
    task: Task
    model: nn.Module


def finetune(
    config: RunConfig, resume: bool = False, progress: bool = True, stop_after: int | None = None, distributed: str = "none"
) -> dict[str, Any]:
    """Run ``config`` end to end; returns (and writes) ``results.json``'s content.

    ``resume=True`` continues from the run folder's latest checkpoint (an error if the recipe
    changed), or starts fresh when there is none. ``stop_after`` interrupts the run after that
    many steps (leaving its checkpoints), as a crash would. ``distributed``: ``auto``, ``ddp``,
    ``fsdp`` or ``none`` (see :func:`orthotune.training.distributed.resolve`).
    """
    return run(config, resume, progress, stop_after, distributed).results


def run(
    config: RunConfig, resume: bool = False, progress: bool = True, stop_after: int | None = None, distributed: str = "none"
) -> Outcome:
    """:func:`finetune`, also returning the task and the trained model."""
    t0 = time.perf_counter()
    strategy = dist_run.resolve(distributed)
    if strategy != "none":
        dist_run.init(resolve_device(config.device).type)
    main = dist_run.is_main_process()
    run_dir = Path(config.output_dir)
    if strategy != "none" and config.train.lr == AUTO:
        raise ValueError("train.lr=auto runs its range test in one process: run it without torchrun (or set train.lr)")
    config, lr_search = resolve_lr(config, run_dir, resume, progress, trial)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        saved = read_mapping(run_dir / "config.yaml")
        if saved != config.to_dict():
            raise ValueError(f"{run_dir}/config.yaml differs from this recipe: resume with the recipe the run started with")
    elif main and run_dir.joinpath("checkpoints").exists():
        shutil.rmtree(run_dir / "checkpoints")  # a fresh start never mixes with an older run's checkpoints
    task, model = build(config, fresh=checkpoint is None, check=True)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(config, run_dir / "config.yaml")
        (run_dir / DATA_RECORD).write_text(json.dumps(task.record, indent=2) + "\n")
        if checkpoint is None:
            task.save_base(model, run_dir)
    dist_run.barrier()
    if checkpoint is not None:
        task.restore_base(model, run_dir)
    selection = None
    if checkpoint is None and needs_selection(model):  # every rank selects the same supports from the same batches
        selection = select(model, task, config, progress and main)
        if main:
            (run_dir / "selection.json").write_text(json.dumps(selection, indent=1) + "\n")
    elif checkpoint is not None and (run_dir / "selection.json").is_file():
        selection = json.loads((run_dir / "selection.json").read_text())
    counts = parameter_counts(model)
    world = dist_run.world_size()
    if progress and main:
        where = f" x {world} processes ({strategy})" if strategy != "none" else ""
        print(f"{config.task} / {config.method}: {counts['trainable']:,} trainable ({counts['adapter']:,} in adapters) "
              f"of {counts['total']:,} parameters on {task.device}{where}")
    if strategy != "none":
        check_batches(task, config.train.batch_size, world)
        model = dist_run.wrap(model, strategy)
    fitted = fit(model, task, config.train, run_dir, resume_from=checkpoint, progress=progress, stop_after=stop_after)
    model = dist_run.unwrap(model)
    results: dict[str, Any] = {
        "task": config.task, "method": config.method, "seed": config.seed, "metric": task.metric,
        "higher_is_better": task.higher_is_better, "parameters": counts, "steps": fitted.steps_done,
        "total_steps": fitted.total_steps, "interrupted": fitted.interrupted,
        "train_seconds": fitted.train_seconds, "eval_seconds": fitted.eval_seconds,
        "history": fitted.history, "selection": selection, "lr_search": lr_search, "environment": environment(),
        "config": config.to_dict(),
        "distributed": {"strategy": strategy, "world_size": world}, "data": task.record,
    }
    evals = fitted.history["eval"]
    if evals:
        results["before"] = evals[0][1] if evals[0][0] == 0 else None
        results["final"] = evals[-1][1]
    if fitted.interrupted:
        return Outcome(results, task, model)
    sharded = dist_run.is_sharded(model)
    weights = dist_run.full_state(model) if sharded else None  # a collective: every rank takes part
    if not main:
        if sharded:  # the artifacts' forwards need every rank's shards: run them, keep rank 0's files only
            with tempfile.TemporaryDirectory() as scratch:
                task.artifacts(model, Path(scratch))
        dist_run.barrier()
        return Outcome(results, task, model)
    save_weights(model, run_dir / "adapter", weights)

    files = [training_curves(fitted.history, task.metric, run_dir / "curves.png", title=f"{config.task} / {config.method}")]
    files += task.artifacts(model, run_dir)
    results["files"] = [str(Path(f).relative_to(run_dir)) for f in files]
    results["wall_seconds"] = time.perf_counter() - t0
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    dist_run.barrier()
    return Outcome(results, task, model)


def check_batches(task: Task, batch_size: int, world: int) -> None:
    """Refuse, before training, a run where some batch has fewer examples than there are processes."""
    rest = task.train_size() % batch_size
    if batch_size < world or 0 < rest < world:
        small = batch_size if batch_size < world else rest
        raise ValueError(
            f"a batch of {small} examples cannot be split over {world} processes: choose train.batch_size (and "
            f"data.train_size, whose last batch per epoch holds {rest or batch_size}) of at least {world} examples"
        )


def adapter_folder(path: str | Path) -> Path:
    """The adapter folder that ``path`` names: an adapter folder itself, or a run folder's ``adapter/``."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file() and (path / "adapter" / "adapter_config.json").is_file():
        return path / "adapter"
    return path


def load_run(run: str | Path | None = None, config: RunConfig | None = None, adapter: str | Path | None = None,
             overrides: list[str] | None = None) -> tuple[RunConfig, Path]:
    """(recipe, adapter folder) from a run folder, or from an explicit recipe and adapter folder.

    A run folder's ``data.json`` settings (absolute file paths, the label list) replace the recipe's,
    so the run folder alone is enough wherever it is reloaded from; ``overrides`` apply last
    (e.g. ``data.test_file=NEW`` for a file that moved).
    """
    if config is None:
        if run is None:
            raise ValueError("give a run folder or a recipe (--config) with an adapter folder (--adapter)")
        if not (Path(run) / "config.yaml").is_file():
            raise ValueError(f"{run} is not a run folder: it holds no config.yaml")
        saved = read_mapping(Path(run) / "config.yaml")
        record = Path(run) / DATA_RECORD
        if record.is_file():
            saved["data"] = {**(saved.get("data") or {}), **json.loads(record.read_text()).get("settings", {})}
        config = RunConfig.from_dict(apply_overrides(saved, overrides or []))
    elif overrides:
        config = config.with_overrides(overrides)
    adapter = Path(adapter) if adapter is not None else Path(run if run is not None else config.output_dir) / "adapter"
    if not adapter.is_dir():
        raise ValueError(f"adapter folder {adapter} does not exist")
    return config, adapter


def load_trained(config: RunConfig, adapter: Path) -> tuple[Task, nn.Module]:
    """The task and its model with the trained adapter (or full fine-tune weights) loaded."""
    if config.method == FULL:
        task, model = build(config, fresh=False)
        load_weights_inplace(model, adapter)
        return task, model.eval()

    offline()
    seed_everything(config.seed)
    task = TASKS[config.task](config.model, config.data, config.seed, resolve_device(config.device))
    base = task.build_model(fresh=False)
    task.restore_base(base, adapter.parent)
    return task, orthotune.load_adapter(base, adapter).eval()


def evaluate_adapter(config: RunConfig, adapter: Path) -> dict[str, float]:
    """The task's held-out metrics for a trained adapter."""
    task, model = load_trained(config, adapter)
    return task.evaluate(model)


def merge_adapter(config: RunConfig, adapter: Path, out: str | Path) -> Path:
    """Merge the adapter into the base weights and write a plain model folder, atomically."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists; choose a new folder for the merged model")
    task, model = load_trained(config, adapter)
    plain = model.merge_and_unload(safe_merge=True, **task.merge_options()) if isinstance(model, AdapterModel) else model
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_folder(out)
    try:
        task.save_merged(plain, tmp)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
