"""Resumable training checkpoints: the adapter plus everything the loop needs to continue exactly.

A checkpoint folder ``<run>/checkpoints/step-000300/`` holds ``adapter/`` (written by
``model.save_adapter``; the trainable parameters themselves for full fine-tuning) and
``trainer_state.pt``: optimiser, scheduler, every RNG state, the data position (epoch, batch index),
LoCA's location learner and the history so far. Folders are written under a temporary name and
renamed, then ``<run>/checkpoints/latest`` is replaced atomically, so an interrupted save never
leaves a half checkpoint behind ``latest``. Resuming on the same machine continues bit-identically.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..model.adapter_model import AdapterModel
from ..model.io import save_adapter, staging_folder
from ..training import distributed

LATEST = "latest"
STATE = "trainer_state.pt"
FULL_WEIGHTS = "trainable.safetensors"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_weights(model: nn.Module, directory: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """The adapter (AdapterModel) or, for full fine-tuning, every trainable tensor.

    ``state``: the tensors to write instead of the model's own (gathered from FSDP shards by
    :func:`orthotune.training.distributed.full_state`, same keys).
    """
    if isinstance(model, AdapterModel):
        save_adapter(model, directory, model.active_adapter, state=state)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        state = distributed.live_state(model) if state is None else state
        save_file({n: t.cpu().contiguous() for n, t in state.items()}, str(directory / FULL_WEIGHTS))


@torch.no_grad()
def load_weights_inplace(model: nn.Module, directory: Path) -> None:
    """Load saved weights into the live modules (keeping parameter identity, so optimiser state maps);
    ``model`` may be wrapped by :func:`orthotune.training.distributed.wrap` (FSDP: each rank keeps its shard)."""
    if isinstance(distributed.unwrap(model), AdapterModel):
        distributed.load_adapter_weights(model, directory)
        return
    distributed.load_full_state(model, load_file(str(directory / FULL_WEIGHTS)))


def save_checkpoint(
    run_dir: Path, step: int, model: nn.Module, trainer_state: dict[str, Any], keep: int, weights: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically, point ``latest`` at it, keep the ``keep`` newest
    (``weights``: see :func:`save_weights`)."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = staging_folder(final)
    try:
        save_weights(model, tmp / "adapter", weights)
        torch.save(trainer_state, tmp / STATE)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / LATEST)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` points at, or None if the run has none."""
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    if not (path / STATE).is_file():
        raise ValueError(f"{pointer} points at {path}, which is not a complete checkpoint; delete {pointer} to start over")
    return path


def load_trainer_state(path: Path) -> dict[str, Any]:
    # our own file (optimiser tensors, RNG tuples): not loadable with weights_only
    return torch.load(path / STATE, map_location="cpu", weights_only=False)
