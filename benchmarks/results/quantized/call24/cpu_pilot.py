"""CPU pilot of call 24: LoCO k2 r3 (3e-3) or OFT b32 (2e-3) on the bf16 and the NF4 base for one seed, the recipe at
data.eval_size=2000, every test question scored, and how much of the bf16/NF4 gap is the test set's own sampling error
(on the first 200 questions, the recipe's test split, and on all 2000); ``--summary`` tabulates every seed run so far.

The test-set standard error of one pair's gap is the paired (McNemar) one: sqrt(b + c - (c - b)^2 / n) / n with b, c
the questions only one of the two runs answers. Writes ``pilot_<method>_seed<S>.json`` (each run's per-question hits).

    python benchmarks/lm_data.py --out .carry/lmq/b/lm-data-2000 --eval-size 2000
    python benchmarks/results/quantized/call24/cpu_pilot.py --method loco --seed 0 --data .carry/lmq/b/lm-data-2000 \
        --val .carry/lmq/b/lm-data/val.jsonl --out benchmarks/results/quantized/call24/cpu_pilot     # ~21 min
    python benchmarks/results/quantized/call24/cpu_pilot.py --summary --method loco --out benchmarks/results/quantized/call24/cpu_pilot
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from orthotune.recipes.causal_lm import normalise_answer
from orthotune.recipes.finetune import run
from orthotune.recipes.runconfig import RunConfig, apply_overrides, read_mapping

ROOT = Path(__file__).resolve().parents[4]
METHODS = {"loco": ['adapter={"target_modules": ["q_proj", "v_proj"], "rank": 3, "chain_length": 2, "mode": "exact"}',
                     "train.lr=0.003"],
           "oft": ['adapter={"target_modules": ["q_proj", "v_proj"], "r": 0, "oft_block_size": 32}', "train.lr=0.002"]}
BASES = {"bf16": ["model.dtype=bfloat16"], "nf4": ["model.quantization=nf4", "model.compute_dtype=bfloat16"]}


def train_and_score(method: str, base: str, seed: int, data: Path, val: Path, scratch: Path) -> dict:
    """One recipe run (final evaluation on the small ``val`` file) and its greedy replies to every test question."""
    t0 = time.perf_counter()
    overrides = [f"method={method}", *METHODS[method], f"seed={seed}", f"output_dir={scratch / f'{method}-{base}{seed}'}", "train.eval_every=0",
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


def summary(out: Path, method: str) -> None:
    """Every seed's gap on the first 200 and all 2000 questions, then their mean with its two errors: over seeds, and the
    test set's (the per-question gap averaged over seeds, whose spread over the questions every seed shares)."""
    runs = {int(f.stem.rsplit("seed", 1)[1]): json.loads(f.read_text()) for f in sorted(out.glob(f"pilot_{method}_seed*.json"))}
    if not runs:
        raise SystemExit(f"no pilot_{method}_seed*.json in {out}: run this script with --method {method} first")
    print(f"{method}: {len(runs)} seeds")
    print("| seed | bf16 (200) | NF4 (200) | gap (200) | bf16 (2000) | NF4 (2000) | gap (2000) | test-set s.e. (2000) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    gaps = {200: [], 2000: []}
    for seed, res in sorted(runs.items()):
        row = [str(seed)]
        for n in (200, 2000):
            g = paired_gap(res["bf16"]["hits"][:n], res["nf4"]["hits"][:n])
            gaps[n].append(g["gap"])
            row += [f"{g['a']:.1f}", f"{g['b']:.1f}", f"{g['gap']:+.1f}"]
        print("| " + " | ".join(row) + f" | {g['se']:.2f} |")
    for n in (200, 2000):
        k = len(gaps[n])
        over_seeds = statistics.stdev(gaps[n]) / math.sqrt(k) if k > 1 else float("nan")
        per_q = [statistics.mean(r["nf4"]["hits"][q] - r["bf16"]["hits"][q] for r in runs.values()) for q in range(n)]
        test_set = 100 * statistics.stdev(per_q) / math.sqrt(n)
        print(f"first {n}: mean gap {statistics.mean(gaps[n]):+.2f}, s.e. over seeds {over_seeds:.2f}, test-set s.e. {test_set:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=sorted(METHODS), default="loco")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, help="lm_data.py's folder at --eval-size 2000")
    parser.add_argument("--val", type=Path, help="a small val file for the run's own final evaluation")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/call24-pilot"))
    parser.add_argument("--summary", action="store_true", help="tabulate --method's runs in --out; train nothing")
    args = parser.parse_args()
    if args.summary:
        summary(args.out, args.method)
        return
    if args.data is None or args.val is None:
        parser.error("--data and --val are needed to train (or pass --summary)")
    torch.set_num_threads(2)
    res = {base: train_and_score(args.method, base, args.seed, args.data, args.val, args.scratch) for base in BASES}
    res["environment"] = {"torch": torch.__version__, "device": "cpu", "date": time.strftime("%Y-%m-%d")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"pilot_{args.method}_seed{args.seed}.json").write_text(json.dumps(res) + "\n")
    print("| questions | bf16 | NF4 | NF4 - bf16 | only bf16 / only NF4 right | test-set s.e. of the gap |")
    print("|---|---:|---:|---:|---:|---:|")
    for n in (200, 2000):
        g = paired_gap(res["bf16"]["hits"][:n], res["nf4"]["hits"][:n])
        print(f"| first {n} | {g['a']:.1f} | {g['b']:.1f} | {g['gap']:+.1f} | {g['only_a']} / {g['only_b']} | {g['se']:.2f} |")


if __name__ == "__main__":
    main()
