"""Saves survive being killed: a process saving in a loop is SIGKILLed at random moments.

After each kill the folder must hold one whole adapter, no older than the last save that returned,
or an error whose documented hint (an interrupted save's backup) recovers it. Covers the three
ways model/io.py installs a folder: renameat2 exchange, the two-rename fallback, and a folder shared
with other files (file by file, with backups).
"""

from __future__ import annotations

import multiprocessing
import random
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import orthotune
from orthotune import LoRAConfig
from orthotune.model.io import CONFIG_NAME, WEIGHTS_NAME

LAYERS, WIDTH = 64, 48


def base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])


def adapted(value: float) -> orthotune.OrthoModel:
    model = orthotune.get_model(base(), LoRAConfig(target_modules=r"\d+", r=8))
    fill(model, value)
    return model


def fill(model: orthotune.OrthoModel, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(value)


def save_forever(path: str, mode: str, done) -> None:  # runs in the forked child
    torch.set_num_threads(1)
    if mode == "rename":
        orthotune.model.io._exchange = lambda a, b: False  # a system without renameat2
    model = adapted(0.0)
    i = 0
    while True:
        i += 1
        fill(model, float(i))
        model.save_adapter(path)
        done.value = i


def recover(path: Path, err: ValueError) -> None:
    """Follow the error's documented hint, as a user would."""
    msg = str(err)
    if "previous adapter as" in msg:
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            (path / f".{name}.prev").replace(path / name)
    elif (m := re.search(r"previous adapter in (\S+): rename it", msg)) is not None:
        Path(m.group(1)).rename(path)
    else:
        raise err


def saved_value(path: Path) -> float:
    try:
        model = orthotune.load_adapter(base(), path)
    except ValueError as err:
        recover(path, err)
        model = orthotune.load_adapter(base(), path)
    values = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]).unique()
    assert values.numel() == 1, f"the folder mixes two saves: {values.tolist()[:4]}"
    return float(values)


@pytest.mark.parametrize("mode", ["exchange", "rename", "shared"])
def test_killed_saves_leave_a_whole_adapter(tmp_path, mode) -> None:
    path = tmp_path / "adapter"
    adapted(0.0).save_adapter(path)
    if mode == "shared":
        (path / "trainer_state.json").write_text("{}")  # a checkpoint folder: saved file by file
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    for _ in range(8):
        done = ctx.Value("i", 0)
        child = ctx.Process(target=save_forever, args=(str(path), mode, done), daemon=True)
        child.start()
        deadline = time.monotonic() + 60
        while done.value < 2 and time.monotonic() < deadline:
            time.sleep(0.002)
        assert done.value >= 2, "the saving process did not save"
        time.sleep(rng.uniform(0.0, 0.05))
        child.kill()
        child.join()
        last = done.value
        value = saved_value(path)
        assert value >= last, f"save {last} returned, yet the folder holds save {value}"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "adapter"]
    if mode == "shared":
        assert (path / "trainer_state.json").is_file()
    # a kill can leave a temporary folder behind (never the adapter's own path); it is only garbage
    assert all(name.startswith(".adapter.") for name in leftovers), leftovers
    for p in tmp_path.glob(".adapter.*"):
        shutil.rmtree(p)
