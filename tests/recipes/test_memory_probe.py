"""``benchmarks/memory_probe.py`` on a tiny model: the profiler's timeline replays to a peak and its parts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")  # the probe's model has NF4 projections
sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import memory_probe  # noqa: E402


def test_memory_probe_reports_the_peak_and_what_is_live_then(tmp_path) -> None:
    res = memory_probe.main(["--out", str(tmp_path), "--hidden", "256", "--intermediate", "512", "--layers", "1", "--seq", "32",
                             "--only", "oft"])
    assert list(res["rows"]) == ["peft LoRA r16", "OFT b32"]
    for name, row in res["rows"].items():
        parts = row["by_category_mib"]
        assert row["peak_mib"] == pytest.approx(sum(parts.values())), name  # the peak is the sum of what is live then
        frozen = 256 * (2 * 256 + 2 * 128) + 3 * 256 * 512  # the layer's frozen projections (q, o; k, v: 1 KV head of 128; MLP)
        assert row["peak_mib"] > frozen / 2 / 2**20, name  # NF4: half a byte a weight
        assert row["largest"] and all(g["mib"] >= 0 for g in row["largest"])
    assert json.loads((tmp_path / "memory_probe.json").read_text())["rows"].keys() == res["rows"].keys()
    assert "| OFT b32 |" in (tmp_path / "memory_probe.md").read_text()
