"""``benchmarks/compiled.py`` on the CPU: the harness the GPU run depends on (tiny model, dynamo's eager backend)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import compiled  # noqa: E402


@pytest.mark.slow  # six rows, three traced (~1 min of CPU)
def test_compiled_table_on_cpu(tmp_path) -> None:
    res = compiled.main(["--device", "cpu", "--smoke", "--backend", "eager", "--sections", "train", "--only", "loco k3 r6 exact",
                         "--out", str(tmp_path)])
    rows = {r["name"]: r for r in res["train"]}
    assert set(rows) == {f"{m}, {how}" for m in (compiled.FLOOR, compiled.LORA, "orthotune LoCO k3 r6 exact")
                         for how in ("compiled", "eager")}
    for name, r in rows.items():
        assert r["median_ms"] > 0 and r["graph_breaks"] == 0 and r["recompiles"] == 0, (name, r)
        assert r["graphs"] == (1 if name.endswith("compiled") else 0), (name, r["graphs"])
    assert rows[f"{compiled.LORA}, compiled"]["x_lora_compiled"] == 1.0
    assert rows[f"{compiled.LORA}, eager"]["x_lora_eager"] == 1.0
    assert json.loads((tmp_path / "compiled.json").read_text())["train"][0]["name"] == f"{compiled.FLOOR}, compiled"
    assert "| orthotune LoCO k3 r6 exact, compiled |" in (tmp_path / "compiled.md").read_text()


def test_modes_without_default_run_only_the_yardstick_in_default_mode() -> None:
    chosen = [s for s in compiled.specs() if s.name in (compiled.FLOOR, compiled.LORA, "orthotune LoCO k3 r6 exact")]
    rows = compiled.rows_in_order(chosen, ["default", "reduce-overhead"], every_default=False)
    default = {r.spec.name for r in rows if r.how == "default"}
    assert default == {compiled.FLOOR, compiled.LORA}
    assert {r.spec.name for r in rows if r.how == "reduce-overhead"} == {s.name for s in chosen}
    every = compiled.rows_in_order(chosen, ["default", "reduce-overhead"])
    assert {r.spec.name for r in every if r.how == "default"} == {s.name for s in chosen}


def test_a_captured_squarings_row_sets_the_bound_for_its_row_only(monkeypatch) -> None:
    import argparse

    from orthotune.ops import skew

    library = skew.CAPTURED_SQUARINGS
    seen = []

    def build(*args, **kwargs):
        seen.append(skew.CAPTURED_SQUARINGS)
        raise RuntimeError("built")

    monkeypatch.setattr(compiled.eff, "build", build)
    spec = next(s for s in compiled.specs() if s.name == "orthotune LoCO k3 r6 exact")
    row = compiled.Row(spec, "reduce-overhead", 7)
    shape = compiled.eff.Shape(hidden=64, intermediate=128, layers=1, heads=4, vocab=128, batch=2, seq=16)
    with pytest.raises(RuntimeError, match="built"):
        compiled.train_row(row, shape, argparse.Namespace(device="cpu"))
    assert seen == [7] and skew.CAPTURED_SQUARINGS == library
    assert row.name == "orthotune LoCO k3 r6 exact, compiled [reduce-overhead] [squarings 7]"
