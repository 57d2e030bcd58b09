"""CPU pilot of call 24: LoCO k2 r3 (3e-3) on the bf16 and the NF4 base for one seed, the recipe at data.eval_size=2000,
every test question scored, and how much of the bf16/NF4 gap is the test set's own sampling error (on the first 200
questions, the recipe's test split, and on all 2000).

The test-set standard error of one pair's gap is the paired (McNemar) one: sqrt(b + c - (c - b)^2 / n) / n with b, c
the questions only one of the two runs answers. Writes ``pilot_seed<S>.json`` (each run's per-question hits).

    python benchmarks/lm_data.py --out .carry/lmq/b/lm-data-2000 --eval-size 2000
    python benchmarks/results/quantized/call24/cpu_pilot.py --seed 0 --data .carry/lmq/b/lm-data-2000 \
        --val .carry/lmq/b/lm-data/val.jsonl --out benchmarks/results/quantized/call24/cpu_pilot     # ~21 min
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from orthotune.recipes.causal_lm import normalise_answer
from orthotune.recipes.finetune import run
from orthotune.recipes.runconfig import RunConfig, apply_overrides, read_mapping

ROOT = Path(__file__).resolve().parents[4]
BASES = {"bf16": ["model.dtype=bfloat16"], "nf4": ["model.quantization=nf4", "model.compute_dtype=bfloat16"]}


def train_and_score(base: str, seed: int, data: Path, val: Path, scratch: Path) -> dict:
    """One recipe run (final evaluation on the small ``val`` file) and its greedy replies to every test question."""
    t0 = time.perf_counter()
    overrides = ["method=loco", 'adapter={"target_modules": ["q_proj", "v_proj"], "rank": 3, "chain_length": 2, "mode": "exact"}',
                 "train.lr=0.003", f"seed={seed}", f"output_dir={scratch / f'{base}{seed}'}", "train.eval_every=0",
                 "train.save_every=0", "train.eval_before=false", "train.compile=false", "data.eval_split=val",
                 f"data.train_file={data / 'train.jsonl'}", f"data.validation_file={val}", f"data.test_file={data / 'test.jsonl'}",
                 "data.eval_size=2000", *BASES[base]]
    config = RunConfig.from_dict(apply_overrides(read_mapping(ROOT / "recipes" / "lm_arithmetic.yaml"), overrides))
    outcome = run(config, progress=False)
    task, model = outcome.task, outcome.model
    rows = task.rows["test"]
    model.eval()
    with torch.no_grad():
        replies = task.generate(model, [p for p, _ in task.encode_all(rows, "test")])
    hits = [int(normalise_answer(r) == normalise_answer(row["answer"])) for r, row in zip(replies, rows)]
    return {"val": outcome.results["final"], "hits": hits, "seconds": time.perf_counter() - t0}


def paired_gap(a: list[int], b: list[int]) -> dict[str, float]:
    """``b``'s exact match minus ``a``'s (points) and the test set's standard error of that difference."""
    n = len(a)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    return {"a": 100 * sum(a) / n, "b": 100 * sum(b) / n, "gap": 100 * (only_b - only_a) / n,
            "se": 100 * math.sqrt(only_a + only_b - (only_b - only_a) ** 2 / n) / n, "only_a": only_a, "only_b": only_b}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, required=True, help="lm_data.py's folder at --eval-size 2000")
    parser.add_argument("--val", type=Path, required=True, help="a small val file for the run's own final evaluation")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/call24-pilot"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    res = {base: train_and_score(base, args.seed, args.data, args.val, args.scratch) for base in BASES}
    res["environment"] = {"torch": torch.__version__, "device": "cpu", "date": time.strftime("%Y-%m-%d")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"pilot_seed{args.seed}.json").write_text(json.dumps(res) + "\n")
    print("| questions | bf16 | NF4 | NF4 - bf16 | only bf16 / only NF4 right | test-set s.e. of the gap |")
    print("|---|---:|---:|---:|---:|---:|")
    for n in (200, 2000):
        g = paired_gap(res["bf16"]["hits"][:n], res["nf4"]["hits"][:n])
        print(f"| first {n} | {g['a']:.1f} | {g['b']:.1f} | {g['gap']:+.1f} | {g['only_a']} / {g['only_b']} | {g['se']:.2f} |")


if __name__ == "__main__":
    main()
