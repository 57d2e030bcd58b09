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


def test_adapter_hyperparameters_from_the_command_line_leave_the_matched_budget() -> None:
    given = quality.parse_adapters(['loco={"rank": 3, "chain_length": 4}'], ["lora", "loco"])
    assert given == {"loco": {"rank": 3, "chain_length": 4}}
    row = quality.given_budget("loco", SHAPES, given["loco"])
    assert row["kwargs"] == {"rank": 3, "chain_length": 4, "mode": "exact"}  # laid over the matched row's mode
    assert row["params"] == quality.count("loco", row["kwargs"], SHAPES) == 2 * 4 * 3 * (16 + 24 + 24)
    assert row["budget"] == quality.match_budget("loco", SHAPES)["budget"] and row["given"] == given["loco"]
    for bad, says in (("loco", "METHOD=JSON"), ("oft={}", "one of the methods run"), ("loco={rank: 8}", "not JSON"),
                      ("loco=[8]", "JSON object")):
        with pytest.raises(SystemExit, match=says):
            quality.parse_adapters([bad], ["lora", "loco"])
    with pytest.raises(SystemExit, match="rejects"):  # asked for by name: never a silently missing row
        quality.given_budget("loco", SHAPES, {"rank": 0})


def test_every_row_sweeps_around_its_configs_default_rate() -> None:
    from orthotune.methods.defaults import DEFAULT_LR, LOFT_LR

    assert quality.base_lr("lora", "lm") == DEFAULT_LR["lora"][0]
    assert quality.base_lr("loco-parallel", "vit") == DEFAULT_LR["loco"][0]
    assert quality.base_lr("loft-grad", "dit") == LOFT_LR["gradient"][0]
    assert quality.base_lr("loft-random", "dit") == LOFT_LR["random"][0]
    assert quality.base_lr("full", "lm") == quality.BENCHES["lm"].full_lr
    assert all(quality.base_lr(m, "text") > 0 for m in quality.METHODS)


def _table_job(seed: int, lr: float) -> dict:
    lrs = [1e-3, 3e-3, 9e-3]
    return {"task": "lm", "seed": seed, "lr": lr, "sweep_lrs": lrs, "sweep_keys": [f"sweep:lm:lora:{x:.3g}" for x in lrs]}


def test_seed_zero_of_the_table_is_the_chosen_sweep_run_scored_on_test() -> None:
    sweep = {"value": 0.5, "test_eval": {"exact_match": 0.6, "answer_nll": 0.4}, "parameters": {"adapter": 10},
             "train_seconds": 3.0}
    results = {"sweep:lm:lora:0.003": sweep}
    record = quality.seed_zero_from_sweep(_table_job(0, 3e-3), results)
    assert record["value"] == 0.6 and record["final"] == sweep["test_eval"] and record["from_sweep"] == "sweep:lm:lora:0.003"
    assert quality.seed_zero_from_sweep(_table_job(1, 3e-3), results) is None  # other seeds train their own run
    assert quality.seed_zero_from_sweep(_table_job(0, 9e-3), results) is None  # that sweep run did not finish
    assert quality.seed_zero_from_sweep({**_table_job(0, 5e-3), "sweep_lrs": [], "sweep_keys": []}, results) is None  # no sweep


def test_resume_keeps_finished_runs_and_refuses_another_setup(tmp_path) -> None:
    import json

    budgets = {"lora": {"kwargs": {"r": 8}, "params": 10, "budget": 10}}
    session = {"tasks": {"lm": {"overrides": [], "budgets": budgets, "base_lrs": {"lora": 3e-3}}}}
    keys = [f"sweep:lm:lora:{x:.3g}" for x in (1e-3, 3e-3, 9e-3)]
    jobs = {k: {"kind": "run"} for k in keys}
    jobs.update({f"table:lm:lora:{s}": {"kind": "run", "sweep_keys": keys} for s in (0, 1)})
    old_runs = {"sweeps": {"lora": [{"key": keys[0], "value": 0.1}, {"key": keys[1], "value": 0.2},
                                    {"key": keys[2], "error": "skipped: not enough time left before the deadline"}]},
                "runs": {"lora": [{"key": "table:lm:lora:0", "value": 0.3}]}}
    path = tmp_path / "quality_old.json"
    path.write_text(json.dumps({"tasks": {"lm": {**session["tasks"]["lm"], **old_runs}}}))
    # the table run was chosen from an incomplete sweep: it runs again, the finished sweep runs are kept
    assert set(quality.resumed_runs(path, session, jobs)) == set(keys[:2])
    old_runs["sweeps"]["lora"][2] = {"key": keys[2], "value": 0.05}
    path.write_text(json.dumps({"tasks": {"lm": {**session["tasks"]["lm"], **old_runs}}}))
    assert set(quality.resumed_runs(path, session, jobs)) == set(keys) | {"table:lm:lora:0"}
    other = {"tasks": {"lm": {**session["tasks"]["lm"], "base_lrs": {"lora": 1e-2}}}}
    with pytest.raises(SystemExit, match="other base_lrs of lora"):
        quality.resumed_runs(path, other, jobs)
    vit = {"tasks": {"vit": {"overrides": [], "budgets": budgets, "base_lrs": {"lora": 3e-3}}}}
    path.write_text(json.dumps({"tasks": {"vit": {**vit["tasks"]["vit"], **old_runs}}}))
    assert quality.resumed_runs(path, vit, jobs) == {}  # a pretrained backbone differs per session: nothing kept


def test_the_report_compares_the_default_rate_with_the_swept_best() -> None:
    table = {"base_lrs": {"lora": 2e-3}, "sweeps": {"lora": [{"lr": 2e-3 / 3, "value": 0.80}, {"lr": 2e-3, "value": 0.85},
                                                            {"lr": 6e-3, "value": 0.87}]}}
    assert quality.default_vs_best(table, "lora", pct=True) == "85.0 / 87.0 (x3)"
    loss = {"base_lrs": {"lora": 2e-3}, "sweeps": {"lora": [{"lr": 2e-3, "value": 0.03}, {"lr": 6e-3, "error": "x"}]}}
    assert quality.default_vs_best(loss, "lora", pct=False) == "0.0300 / 0.0300 (x1)"
    assert quality.default_vs_best({}, "lora", pct=True) == "-"  # a session without sweeps
    # a grown grid's tie goes to the lower rate, the one chosen_lr trains the table at (the grown run comes last)
    tie = {"base_lrs": {"loft": 2e-3}, "sweeps": {"loft": [{"lr": 2e-3 / 3, "value": 0.6}, {"lr": 2e-3, "value": 0.4},
                                                          {"lr": 2e-3 / 9, "value": 0.6}]}}
    assert quality.default_vs_best(tie, "loft", pct=True) == "40.0 / 60.0 (x0.11)"


def test_merged_tables_keep_the_sweep_that_chose_each_rows_rate() -> None:
    old = _session("2026-01-01", "lm", {"lora": [_run(0, 0.1)], "oft": [_run(0, 0.3)]})
    old["tasks"]["lm"].update(base_lrs={"lora": 0.1, "oft": 0.1}, sweeps={"lora": [{"lr": 0.1, "value": 0.2}], "oft": [{"lr": 0.1, "value": 0.4}]})
    new = _session("2026-01-02", "lm", {"lora": [_run(1, 0.5)]})
    new["tasks"]["lm"].update(base_lrs={"lora": 0.1}, sweeps={"lora": [{"lr": 0.1, "value": 0.6}]})
    table = quality.merge_tasks([old, new])["lm"]
    assert table["sweeps"] == {"lora": [{"lr": 0.1, "value": 0.6}], "oft": [{"lr": 0.1, "value": 0.4}]}
    assert table["base_lrs"] == {"lora": 0.1, "oft": 0.1}


def test_lr_multipliers_scale_against_the_earlier_sessions_own_centres(tmp_path) -> None:
    import json

    with_centres = _session("2026-01-01", "lm", {"lora": [_run(0, 0.5), _run(1, 0.6)], "oft": [_run(0, 0.3)]})
    with_centres["tasks"]["lm"]["base_lrs"] = {"lora": 0.05, "oft": 0.3}
    path = tmp_path / "quality_a.json"
    path.write_text(json.dumps(with_centres))
    assert quality.lr_multipliers(path) == {"lora": 2.0, "oft": pytest.approx(1 / 3)}  # runs at lr 0.1
    path.write_text(json.dumps(_session("2026-01-01", "lm", {"lora": [_run(0, 0.5)]})))
    assert quality.lr_multipliers(path) == {}  # no recorded centres: nothing to scale by


def _group(task: str = "vit") -> tuple[dict, dict]:
    group = {"task": task, "method": "lora", "lrs": [], "keys": [], "table": [f"table:{task}:lora:0"], "grown": 0, "settled": False,
             "deps": [], "extra": [], "prio": (0, 0)}
    jobs: dict = {}
    for lr in (1e-3, 3e-3, 9e-3):
        quality.add_sweep_run(group, lr, jobs, prio=(2,))
    jobs[f"table:{task}:lora:0"] = {"deps": list(group["keys"]), "sweep_keys": group["keys"], "sweep_lrs": group["lrs"], "task": task,
                                "base_lr": 3e-3}
    return group, jobs


def test_a_sweep_grows_past_a_winning_edge_at_most_limit_times() -> None:
    group, jobs = _group()
    results = {k: {"value": v} for k, v in zip(group["keys"], (0.5, 0.6, 0.7))}
    pending: dict = {}
    assert quality.grow_sweeps({("vit", "lora"): group}, jobs, pending, results, limit=2) == ["sweep:vit:lora:0.027"]
    assert group["lrs"][-1] == pytest.approx(2.7e-2) and "sweep:vit:lora:0.027" in jobs["table:vit:lora:0"]["deps"]
    assert quality.grow_sweeps({("vit", "lora"): group}, jobs, pending, results, limit=2) == []  # waits for the new run
    results["sweep:vit:lora:0.027"] = {"value": 0.8}  # the edge wins again: one more step, then the limit
    assert quality.grow_sweeps({("vit", "lora"): group}, jobs, pending, results, limit=2) == ["sweep:vit:lora:0.081"]
    results["sweep:vit:lora:0.081"] = {"value": 0.9}
    assert quality.grow_sweeps({("vit", "lora"): group}, jobs, pending, results, limit=2) == [] and group["settled"]
    assert quality.chosen_lr(jobs["table:vit:lora:0"], results) == pytest.approx(8.1e-2)
    assert set(pending) == {"sweep:vit:lora:0.027", "sweep:vit:lora:0.081"}


def test_a_sweep_grows_downwards_ignores_diverged_runs_and_stops_inside() -> None:
    group, jobs = _group("dit")  # lower loss is better
    results = {k: {"value": v} for k, v in zip(group["keys"], (0.03, 0.04, float("nan")))}
    assert quality.grow_sweeps({("dit", "lora"): group}, jobs, {}, results, limit=2) == ["sweep:dit:lora:0.000333"]
    results["sweep:dit:lora:0.000333"] = {"value": 0.035}  # worse than 1e-3: the best is now inside the grid
    assert quality.grow_sweeps({("dit", "lora"): group}, jobs, {}, results, limit=2) == [] and group["settled"]
    assert quality.chosen_lr(jobs["table:dit:lora:0"], results) == pytest.approx(1e-3)
    interior, jobs = _group()
    results = {k: {"value": v} for k, v in zip(interior["keys"], (0.5, 0.7, 0.6))}
    assert quality.grow_sweeps({("vit", "lora"): interior}, jobs, {}, results, limit=2) == [] and interior["settled"]


def test_growing_reruns_a_resumed_table_run_unless_the_resumed_session_grew_the_same_way() -> None:
    group, jobs = _group()
    results = {k: {"value": v} for k, v in zip(group["keys"], (0.5, 0.6, 0.7))}
    results["table:vit:lora:0"] = {"value": 0.7}  # chosen from the three-point grid
    pending: dict = {}
    quality.grow_sweeps({("vit", "lora"): group}, jobs, pending, results, limit=1)
    assert "table:vit:lora:0" not in results and "table:vit:lora:0" in pending
    group, jobs = _group()
    results = {k: {"value": v} for k, v in zip(group["keys"], (0.5, 0.6, 0.7))}
    results.update({"sweep:vit:lora:0.027": {"value": 0.65}, "table:vit:lora:0": {"value": 0.7}})  # it grew the same way
    pending = {}
    assert quality.grow_sweeps({("vit", "lora"): group}, jobs, pending, results, limit=1) == []
    assert "table:vit:lora:0" in results and not pending and group["settled"]


def test_a_sweep_cut_by_the_deadline_neither_grows_nor_chooses_a_rate() -> None:
    group, jobs = _group()
    results = {k: {"value": v} for k, v in zip(group["keys"], (0.5, 0.6))}
    results[group["keys"][2]] = {"error": "skipped: not enough time left before the deadline"}
    assert quality.sweep_cut(group["keys"], results)
    assert quality.grow_sweeps({("vit", "lora"): group}, jobs, {}, results, limit=2) == [] and group["settled"]
    results[group["keys"][2]] = {"error": "RuntimeError: diverged"}  # a failed run is a result: the grid is complete
    assert not quality.sweep_cut(group["keys"], results)
