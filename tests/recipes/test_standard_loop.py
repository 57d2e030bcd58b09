"""benchmarks/standard_loop.py: its rows are valid configs, its job order and its lr choice."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from orthotune.methods.registry import METHODS

_path = Path(__file__).resolve().parents[2] / "benchmarks" / "standard_loop.py"
_spec = importlib.util.spec_from_file_location("standard_loop", _path)
standard_loop = importlib.util.module_from_spec(_spec)
sys.modules["standard_loop"] = standard_loop
_spec.loader.exec_module(standard_loop)


@pytest.mark.parametrize("row", standard_loop.ROWS, ids=[r.name for r in standard_loop.ROWS])
def test_every_row_is_a_valid_config(row) -> None:
    config = METHODS[row.method][0](target_modules=standard_loop.TARGETS, modules_to_save=["classifier"], **row.kwargs)
    assert config.modules_to_save == ["classifier"]
    if row.select and "num_batches" in row.select:  # select_supports options only on task-aware supports
        assert row.kwargs["support"] == "gradient"


def test_jobs_run_seed_by_seed_then_the_lr_grid() -> None:
    rows = [standard_loop.ROW_BY_NAME[n] for n in ("lora-r8", "loft-grad")]
    jobs = standard_loop.jobs_in_order(rows, seeds=2, grid=True, grid_seeds=2)
    assert [j[2] for j in jobs[:4]] == [0, 0, 1, 1]
    grid = jobs[4:]
    assert len(grid) == 2 * len(rows) * len(standard_loop.GRID)  # every row, every grid point, both seeds
    assert sorted((j[0], round(j[1] / standard_loop.ROW_BY_NAME[j[0]].lr, 6)) for j in grid[: len(grid) // 2]) == sorted(
        (r.name, round(f, 6)) for r in rows for f in standard_loop.GRID)
    assert [j[2] for j in grid] == [0] * (len(grid) // 2) + [1] * (len(grid) // 2)


def test_summary_takes_the_best_mean_dev_lr_and_averages_its_seeds() -> None:
    row = standard_loop.ROW_BY_NAME["loft-grad"]
    run = dict(row="loft-grad", adapter_params=10, train_s=1.0, select_s=0.5)
    # mean dev: 1e-3 -> 0.895, 3e-3 -> 0.7 (seed 0 alone would pick 3e-3)
    results = [dict(run, lr=1e-3, seed=0, dev=0.8, test=0.7), dict(run, lr=3e-3, seed=0, dev=0.9, test=0.6),
               dict(run, lr=3e-3, seed=1, dev=0.5, test=0.8), dict(run, lr=1e-3, seed=1, dev=0.99, test=0.99)]
    (t,) = standard_loop.summarise(results, [row])
    assert t["lr"] == 1e-3 and t["seeds"] == 2 and t["test_mean"] == pytest.approx(0.845) and t["lrs_tried"] == [1e-3, 3e-3]
