"""End to end on real weights and real data: all-MiniLM-L6-v2 fine-tuned with LoCO on BANKING77.

The full demo, with its accuracy check, is README's first command: ``.ci/run`` runs it as written
(tests/test_readme.py keeps them equal) and fails if it does. Here the same command runs on a few
dozen examples: everything but the accuracy gain (the printed lines, results.json, the adapter
folder, reload and merge) in seconds. (The recipe's training loop is tested in tests/recipes/test_recipes.py.)
"""

from __future__ import annotations

import json

import pytest
import torch

from orthotune.recipes.assets import load_intents, minilm_path
from orthotune.recipes.text import batches

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(minilm_path())


def test_demo_command_end_to_end(tmp_path, capsys) -> None:
    from orthotune.cli import main

    # 64 training examples (two steps) cannot be relied on to gain accuracy on 77 classes: --min-gain -1 leaves that to CI's full run
    main(["demo", "--out", str(tmp_path), "--train-size", "64", "--test-size", "64", "--min-gain", "-1"])
    out = capsys.readouterr().out
    assert "accuracy before fine-tuning" in out and "accuracy after fine-tuning" in out and "FAILED" not in out
    assert "this run trains the exact chain (mode 'exact'), so the gap costs it nothing" in out
    result = json.loads((tmp_path / "results.json").read_text())
    assert (result["train_examples"], result["test_examples"]) == (64, 64)
    assert 0 <= result["accuracy_before"] <= 1 and 0 <= result["accuracy_after"] <= 1
    assert result["reload_max_abs_diff"] == 0.0 and result["merge_max_rel_diff"] < 1e-5
    assert 0 <= result["approx_error_max"] <= result["approx_bound_max"]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_length_sorted_batches_cover_every_example(tokenizer) -> None:
    data = load_intents("banking", "dev").subset(50)
    seen = torch.cat([b["labels"] for b in batches(data, tokenizer, 16)])
    assert sorted(seen.tolist()) == sorted(data.labels)
