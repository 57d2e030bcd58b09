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


def test_preset_rows_exist_and_only_the_named_rows_are_gridded() -> None:
    for name, (rows, gridded) in standard_loop.PRESETS.items():
        assert set(gridded) <= set(rows) <= set(standard_loop.ROW_BY_NAME), name
    rows_, gridded = standard_loop.PRESETS["issue22"]
    rows = [standard_loop.ROW_BY_NAME[n] for n in rows_]
    jobs = standard_loop.jobs_in_order(rows, seeds=3, grid=True, grid_seeds=3, grid_rows=gridded)
    assert len(jobs) == 3 * len(rows) + 3 * len(gridded) * len(standard_loop.GRID)
    assert {j[0] for j in jobs[3 * len(rows):]} == set(gridded)


def test_width_rows_split_r_at_the_fixed_budget() -> None:
    """The width rows' configs on a weightless MiniLM-shaped model: no more adapter parameters than r = 112."""
    transformers = pytest.importorskip("transformers")
    import orthotune

    bert = transformers.BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12,
                                   vocab_size=64, num_labels=77)
    for row in standard_loop.ROWS:
        if row.width_exponent is None:
            continue
        model = transformers.BertForSequenceClassification(bert)
        config = METHODS[row.method][0](target_modules=standard_loop.TARGETS, modules_to_save=["classifier"], **row.kwargs)
        split = orthotune.split_rank_by_width(model, config, row.width_exponent)
        assert sorted(set(split.rank_pattern.values())) == [60, 242], row.name
        fixed = orthotune.get_model(transformers.BertForSequenceClassification(bert), config).trainable_parameters()
        wide = orthotune.get_model(model, split).trainable_parameters()
        assert wide["trainable"] <= fixed["trainable"], row.name
