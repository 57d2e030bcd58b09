"""Which rounding of a bf16 head costs LoCO: its input's or its logits'? (issue 21)

``benchmarks/head_precision.py`` found LoCO trained worse with the head in bf16 (four runs each, 50 steps on the
CPU). A bf16 head rounds its input (the float32 norm's output) to bf16 and returns bf16 logits. This script trains
the same runs (the plain one and ``--controls`` with a perturbed first gradient, the same seeds) with the head in
float32 but its input rounded to bf16: bf16 x bf16 products summed and returned in float32, what a bf16 GEMM with
a float32 output computes. It then sets their validation answer NLL beside the float32 and bf16 runs of a
``head_precision.json`` (``--against``; the runs are deterministic, so they need not be repeated).

    python benchmarks/head_input_rounding.py --data-dir DIR --against .../head_precision.json --out DIR
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

# this folder is the script's, so on sys.path
from head_precision import METHODS, difference, question_nll, recipe_model, sample, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True,
                        help="a folder with train.jsonl, val.jsonl, test.jsonl (TRL prompt/completion)")
    parser.add_argument("--against", required=True, help="head_precision.json holding the method's float32 and bf16 runs")
    parser.add_argument("--method", default="loco", choices=list(METHODS))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    began = time.perf_counter()
    reference = next(r for r in json.loads(Path(args.against).read_text())["rows"] if r["method"] == args.method)
    groups = reference["between_runs"]
    controls = groups["float32"]["runs"] - 1
    task, model, start = recipe_model(args.method, Path(args.data_dir))
    head = model.get_base_model().get_output_embeddings()
    if head.weight.dtype != torch.float32:
        raise ValueError(f"the prepared head is {head.weight.dtype}: this script needs the float32 head of "
                         "prepare_model_for_kbit_training's default")
    head.register_forward_pre_hook(lambda module, inputs: (inputs[0].to(torch.bfloat16).float(), *inputs[1:]))
    nll = {}
    for seed in [None] + list(range(controls)):
        train(task, model, start, reference["lr"], reference["steps"], seed)
        nll["plain" if seed is None else f"control {seed}"] = statistics.mean(question_nll(task, model))
        print(seed, nll, flush=True)
    rounded, f32 = sample(list(nll.values())), groups["float32"]
    minus = difference(rounded, f32)
    result = {"method": args.method, "lr": reference["lr"], "steps": reference["steps"], "against": args.against,
              "bf16_input_float32_logits": {**rounded, "runs": nll}, "minus_float32": minus,
              "float32": f32, "bf16": groups["bf16"]}
    env = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - began, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "head_input_rounding.json").write_text(json.dumps({"environment": env, **result}, indent=1) + "\n")
    b16 = groups["bf16"]
    lines = [f"{args.method} on the NF4 SmolLM2 (q/v, {reference['steps']} AdamW steps, {len(nll)} runs each), CPU "
             f"({env['date']}, torch {env['torch']}): validation answer NLL, mean over runs (sd); minus the float32 "
             "head's runs (standard error between runs).", "",
             "| head | mean NLL (sd) | minus float32 (s.e.) |", "|---|---:|---:|",
             f"| float32 (the default) | {f32['mean']:.4f} ({f32['sd']:.4f}) | |",
             f"| float32, its input rounded to bf16 | {rounded['mean']:.4f} ({rounded['sd']:.4f}) | "
             f"{minus['mean']:+.4f} ({minus['standard_error']:.4f}) |",
             f"| bf16 (upcast_head=False) | {b16['mean']:.4f} ({b16['sd']:.4f}) | "
             f"{groups['bf16_minus_float32']['mean']:+.4f} ({groups['bf16_minus_float32']['standard_error']:.4f}) |"]
    (out / "head_input_rounding.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
