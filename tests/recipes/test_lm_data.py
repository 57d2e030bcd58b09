"""``benchmarks/lm_data.py``: the LM recipe's generated splits as JSON lines, at its own or a larger eval size."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("reasoning_gym")
sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import lm_data  # noqa: E402


def _read(folder: Path) -> dict[str, list[dict[str, str]]]:
    return {s: [json.loads(line) for line in (folder / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "val", "test")}


def test_larger_eval_size_keeps_the_recipe_test_questions_first_and_splits_disjoint(tmp_path) -> None:
    assert lm_data.lm_jsonl(tmp_path / "own") == {"test": 200, "val": 200, "train": 2000}
    lm_data.main(["--out", str(tmp_path / "big"), "--eval-size", "600"])
    own, big = _read(tmp_path / "own"), _read(tmp_path / "big")
    assert [len(big[s]) for s in ("train", "val", "test")] == [2000, 600, 600]
    assert big["test"][:200] == own["test"]  # the earlier tables' 200 test questions lead, unchanged
    prompts = {s: [r["prompt"] for r in rows] for s, rows in big.items()}
    for s, p in prompts.items():
        assert len(set(p)) == len(p), s
    assert not set(prompts["test"]) & (set(prompts["train"]) | set(prompts["val"]))
    assert not set(prompts["val"]) & set(prompts["train"])
    for r in big["test"]:  # "Calculate a op b. Give only the final answer." and its exact value
        assert r["prompt"].endswith(" Give only the final answer.")
        assert eval(r["prompt"].removeprefix("Calculate ").split(". Give")[0]) == int(r["completion"]), r  # noqa: S307
