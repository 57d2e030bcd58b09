"""The evaluation table's budget matching (benchmarks/quality.py) counts parameters exactly."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import orthotune
from orthotune.methods.registry import METHODS as REGISTRY
from tests.conftest import MLP

_path = Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py"
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
    assert quality.count("pissa", {"r": 300}, [(16, 24)]) is None  # a layer rejects it: never a candidate


def test_the_report_separates_skipped_from_failed(tmp_path) -> None:
    import json

    session = {"environment": {"device": "cpu", "torch": "t", "transformers": "t", "timm": None, "date": "d", "workers": 1, "sweep": False},
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


def _session(date: str, task: str, runs: dict, budgets: dict | None = None) -> dict:
    budgets = budgets or {m: {"kwargs": {"r": 8}, "params": 10, "budget": 10} for m in runs}
    return {"environment": {"device": "cpu", "torch": "t", "transformers": "t", "timm": None, "date": date, "workers": 1},
            "wall_seconds": 1.0, "tasks": {task: {"recipe": quality.BENCHES[task].recipe, "layers": 1, "budgets": budgets,
                                                  "runs": runs}}}


def _run(seed: int, value: float) -> dict:
    return {"seed": seed, "value": value, "lr": 0.1, "before": None, "train_seconds": 1.0, "parameters": {"adapter": 10}}


def test_the_report_fills_missing_seeds_from_older_sessions_of_the_same_setup() -> None:
    skipped = {"seed": 2, "error": "skipped: not enough time left before the deadline"}
    old = _session("2026-01-01", "lm", {"lora": [_run(0, 0.1), _run(1, 0.2)], "oft": [_run(0, 0.3)]})
    new = _session("2026-01-02", "lm", {"lora": [_run(0, 0.5), skipped], "hra": [_run(0, 0.4)]})
    other = _session("2026-01-03", "lm", {"oft": [_run(1, 0.9)]}, {"oft": {"kwargs": {"r": 4}, "params": 10, "budget": 10}})
    table = quality.merge_tasks([old, new])["lm"]
    assert [(r["seed"], r.get("value")) for r in table["runs"]["lora"]] == [(0, 0.5), (1, 0.2), (2, None)]  # newest seed 0 wins
    assert all(r["swept"] for r in table["runs"]["lora"])  # sessions that do not say otherwise tuned their rates
    assert [r["value"] for r in table["runs"]["oft"]] == [0.3] and list(table["budgets"]) == ["lora", "oft", "hra"]
    assert table["dates"] == ["2026-01-02", "2026-01-01"]
    assert quality.merge_tasks([old, other])["lm"]["runs"]["oft"] == [{**_run(1, 0.9), "swept": True}]  # another configuration: not merged
    retuned = _session("2026-01-04", "lm", {"lora": [{**_run(0, 0.7), "lr": 0.3}]})
    assert [r["value"] for r in quality.merge_tasks([old, retuned])["lm"]["runs"]["lora"]] == [0.7]  # another rate: not merged
    dit_old = _session("2026-01-01", "dit", {"lora": [_run(1, 0.2)]})
    dit_new = _session("2026-01-02", "dit", {"lora": [_run(0, 0.5)]})
    assert quality.merge_tasks([dit_old, dit_new])["dit"]["runs"]["lora"] == [{**_run(0, 0.5), "swept": True}]  # backbones differ per session


def test_base_learning_rates_from_the_command_line() -> None:
    assert quality.parse_base_lrs(["loco=3e-3", "lora=1e-2"], ["lora", "loco"]) == {"loco": 3e-3, "lora": 1e-2}
    for bad, says in (("loco3e-3", "METHOD=LR"), ("oft=1e-3", "one of the methods run"), ("loco=fast", "not a number"),
                      ("loco=0", "positive")):
        with pytest.raises(SystemExit, match=says):
            quality.parse_base_lrs([bad], ["lora", "loco"])
