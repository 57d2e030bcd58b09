"""Spawning test processes without letting a hang outlive the test."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import pytest
import torch.multiprocessing as mp


def _run_and_leave(rank: int, fn: Any, args: tuple) -> None:
    """``fn(rank, *args)``, then leave without the interpreter's finalization: gloo's worker threads can still be
    torn down there after ``destroy_process_group`` and abort a process whose work is done and saved
    ("terminate called without an active exception", seen once in CI). An error in ``fn`` still reaches ``mp.spawn``."""
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_two(fn: Any, args: tuple, seconds: float = 600) -> None:
    """``mp.spawn`` of two processes with a deadline: a hung collective kills both and fails the test by name
    instead of holding the test run (and its cores) until CI's limit."""
    ctx = mp.spawn(_run_and_leave, args=(fn, args), nprocs=2, join=False)
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
                p.join()
            pytest.fail(f"{fn.__name__}: the two processes did not finish within {seconds:.0f} s (killed)")
