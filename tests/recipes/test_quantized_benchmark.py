"""``benchmarks/quantized.py`` on the CPU: the 4-bit harness the GPU table depends on (tiny Llama, eager), with and
without ``--autocast``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import quantized  # noqa: E402


@pytest.mark.parametrize("autocast", [False, True])
def test_quantized_table_on_cpu(autocast: bool, tmp_path) -> None:
    args = ["--small", "--sections", "main", "--modes", "eager", "--batches", "1x256", "--only", "LoRA r16",
            "--warmup", "1", "--steps", "1", "--out", str(tmp_path)] + (["--autocast"] if autocast else [])
    quantized.main(args)
    res = json.loads((tmp_path / "quantized.json").read_text())
    mode = "eager, autocast bf16" if autocast else "eager"
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"peft LoRA r16", "peft LoRA r16, orthotune prep", "LoRA r16", "LoCO r4 (=LoRA r16 params)"}
    assert all("error" not in r and r["mode"] == mode and r["step_ms"] > 0 for r in rows.values()), rows
    # each library's own preparation: peft's upcasts embeddings and head, orthotune's keeps the (untied) embeddings
    # in bf16 and upcasts the head; the loss is the same (the embeddings' float32 output is peft's lookup)
    dtypes = {m: (r["embedding_dtype"], r["head_dtype"]) for m, r in rows.items()}
    ours = ("bfloat16", "float32")
    assert dtypes == {"peft LoRA r16": ("float32", "float32"), "peft LoRA r16, orthotune prep": ours, "LoRA r16": ours,
                      "LoCO r4 (=LoRA r16 params)": ours}
    # the adapters are identity at init: both LoRAs start from one loss on either preparation
    assert rows["LoRA r16"]["loss_first"] == pytest.approx(rows["peft LoRA r16, orthotune prep"]["loss_first"], rel=1e-6)
    assert rows["LoRA r16"]["loss_first"] == pytest.approx(rows["peft LoRA r16"]["loss_first"], rel=1e-6)
    table = (tmp_path / "quantized.md").read_text()
    assert f"batch 1x16, {mode}\n" in table and "| LoRA r16 | bfloat16 / float32 |" in table
