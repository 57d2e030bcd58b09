"""What a 4-bit base's rounding costs the LM recipe before training, and how much of it LoftQ's start gives back.

The causal-LM recipe's model (SmolLM2-135M-Instruct by default) scored by the answer tokens' NLL on the eval split,
at step 0: the float base, the same base quantised by bitsandbytes with LoRA's usual start (QLoRA: the adapter
adds nothing), and with LoftQ's start (``model.loftq``: ``s B A`` = the rank-r SVD of each adapted layer's rounding
error; with ``--iterations`` also LoftQ's alternation, which re-quantises those layers) for each target set,
rank and number of alternations asked. Runs on the CPU (bitsandbytes' NF4 and int8 kernels) in a few minutes.

    python benchmarks/loftq_start.py --data-dir DIR --out benchmarks/results/loftq_start
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from orthotune.recipes.finetune import build
from orthotune.recipes.runconfig import RunConfig


def variant(args: argparse.Namespace, quant: str | None, targets: str, r: int, loftq: bool, iterations: int = 1) -> dict[str, Any]:
    model = {"quantization": quant, "compute_dtype": "float32", "loftq": loftq, "loftq_iterations": iterations}
    folder = Path(args.data_dir)
    data = {"eval_split": args.split, "train_file": str(folder / "train.jsonl"), "validation_file": str(folder / "val.jsonl"),
            "test_file": str(folder / "test.jsonl")}
    target_modules = "all-linear" if targets == "all-linear" else targets.split(",")
    cfg = RunConfig.from_dict({"task": "causal_lm", "method": "lora",
                               "adapter": {"target_modules": target_modules, "r": r, "lora_alpha": 2 * r},
                               "model": model, "data": data, "train": {"steps": 1}, "device": "cpu",
                               "output_dir": args.scratch})
    start = time.perf_counter()
    task, adapted = build(cfg)
    adapted.train()  # bitsandbytes' CPU inference layout (eval mode) has other numerics; this model has no dropout
    return {"quantization": quant, "targets": targets, "r": r, "loftq": loftq, "iterations": iterations, "answer_nll": task.answer_nll(adapted),
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="a folder with train.jsonl, val.jsonl, test.jsonl (TRL prompt/completion)")
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.add_argument("--quant", default="nf4", choices=("nf4", "fp4", "int8"))
    parser.add_argument("--targets", nargs="+", default=["q_proj,v_proj", "all-linear"], help="comma-separated names, or all-linear")
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 64])
    parser.add_argument("--iterations", nargs="+", type=int, default=[1], help="LoftQ alternations (1: the base as loaded)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--scratch", default="/tmp/loftq_start")
    args = parser.parse_args()
    rows = [variant(args, None, args.targets[0], args.ranks[0], False), variant(args, args.quant, args.targets[0], args.ranks[0], False)]
    for targets in args.targets:
        for r in args.ranks:
            for iterations in args.iterations:
                rows.append(variant(args, args.quant, targets, r, True, iterations))
                print(rows[-1], flush=True)
    float_nll, qlora_nll = rows[0]["answer_nll"], rows[1]["answer_nll"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads()}
    (out / "loftq_start.json").write_text(json.dumps({"environment": env, "split": args.split, "rows": rows}, indent=1) + "\n")
    lines = [f"Answer NLL at step 0 on the {args.split} split ({env['date']}, torch {env['torch']}, CPU); recovered = "
             f"(QLoRA start - this) / (QLoRA start - float base).", "",
             "| base | adapter start | answer NLL | recovered |", "|---|---|---:|---:|",
             f"| float32 | LoRA (adds nothing) | {float_nll:.4f} | |",
             f"| {args.quant} | QLoRA (adds nothing) | {qlora_nll:.4f} | 0% |"]
    for row in rows[2:]:
        gain = (qlora_nll - row["answer_nll"]) / (qlora_nll - float_nll)
        alternations = "" if row["iterations"] == 1 else f", {row['iterations']} alternations"
        lines.append(f"| {args.quant} | LoftQ, {row['targets']}, r={row['r']}{alternations} | {row['answer_nll']:.4f} | {100 * gain:.0f}% |")
    (out / "loftq_start.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
