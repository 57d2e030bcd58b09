"""The evaluation table's budget matching (benchmarks/quality.py) counts parameters exactly."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import orthotune
from orthotune.registry import METHODS as REGISTRY
from tests.conftest import MLP

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
_spec = importlib.util.spec_from_file_location("quality", _path)
quality = importlib.util.module_from_spec(_spec)
sys.modules["quality"] = quality
_spec.loader.exec_module(quality)

SHAPES = [(16, 24), (24, 24), (24, 12)]  # (d_in, d_out) of the test MLP's lin0, lin1, lin2
CASES = [("lora", {"r": 3}), ("pissa", {"r": 2}), ("loco", {"rank": 2, "chain_length": 2}), ("loca", {"n_frequency": 40}),
         ("fourierft", {"n_frequency": 30}), ("oft", {"r": 0, "oft_block_size": 4}), ("boft", {"boft_block_size": 4,
         "boft_n_butterfly_factor": 2}), ("hra", {"r": 4}), ("psoft", {"r": 6}), ("loft", {"support": "gradient", "r": 6})]


@pytest.mark.parametrize("method, kwargs", CASES, ids=[c[0] for c in CASES])
def test_count_equals_the_wrapped_models_count(method, kwargs) -> None:
    config = REGISTRY[method][0](target_modules=["lin0", "lin1", "lin2"], **kwargs)
    counts = orthotune.get_model(MLP(), config).trainable_parameters()
    assert quality.count(method, kwargs, SHAPES) == counts["trainable"]


def test_budget_matches_lora_r8_on_minilm() -> None:
    shapes = quality.target_shapes(quality.BENCHES["text"], [])
    assert len(shapes) == 12 and set(shapes) == {(384, 384)}
    budget = 12 * 8 * (384 + 384)
    loco = quality.match_budget("loco", shapes)
    assert loco["budget"] == budget and loco["params"] == budget  # 2 k r d = 2 * 2 * 4 * 384 per layer
    assert loco["kwargs"] == {"rank": 4, "chain_length": 2, "mode": "exact"}
    assert quality.match_budget("loca", shapes)["params"] == budget
    for name in quality.METHODS:  # every row of the table has a matched configuration on MiniLM
        match = quality.match_budget(name, shapes)
        assert "error" not in match and (name == "full" or abs(match["params"] / budget - 1) < 0.1), (name, match)
    assert quality.count("lora", {"r": 300}, [(16, 24)]) is None  # a layer rejects it: never a candidate


def test_the_report_separates_skipped_from_failed(tmp_path) -> None:
    import json

    session = {"environment": {"device": "cpu", "torch": "t", "transformers": "t", "timm": None, "date": "d", "workers": 1},
               "wall_seconds": 1.0,
               "tasks": {"text": {"recipe": "recipes/text_banking77.yaml", "layers": 12,
                                  "budgets": {"lora": {"kwargs": {"r": 8}, "params": 10, "budget": 10}},
                                  "runs": {"lora": [{"value": 0.5, "lr": 0.1, "before": {"accuracy": 0.4}, "train_seconds": 2.0,
                                                     "parameters": {"adapter": 10}},
                                                    {"error": "skipped: not enough time left before the deadline"},
                                                    {"error": "RuntimeError: boom"}]}}}}
    (tmp_path / "quality_x.json").write_text(json.dumps(session))
    text = quality.write_report(tmp_path).read_text()
    assert "| lora | r=8 | 10 (100%) | 0.1 | 40.0 ± 0.0 (n=1) | 50.0 ± 0.0 (n=1) (1 not run: out of time) (1 failed: RuntimeError: boom) | 2.0 |" in text
