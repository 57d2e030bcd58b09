"""Does LoCO's bf16 rotation on a 4-bit base change what it trains, against a float32 rotation? (issue 21)

On a quantised base LoCO rotates in the frozen matmul's compute dtype (bf16), which bitsandbytes rounds the rotated
input to anyway. This script measures, on the causal-LM recipe's model (SmolLM2-135M-Instruct, NF4 with bf16 compute,
LoCO k2 r3 on q/v) on the CPU, what that changes against rotating in float32 (``LoCO.core_dtype`` switched to the
activations' dtype, the code before call13):

- after ``--steps`` AdamW steps at 3e-3 with the float32 rotation, the training loss of ``--batches`` unseen
  batches under each rotation (paired by batch), with the bf16 rotation's forward in float32 addition as a third
  arm (its correction made in bf16, added to the float32 input: does the rounding of the sum matter?);
- every 10 steps, the adapter's gradient under the bf16 rotation, and under a bf16 forward whose backward forms and
  sums its products in float32 (emulated), against the float32 rotation's: cosine and relative error.

    python benchmarks/rotation_precision.py --data-dir DIR --out benchmarks/results/quantized/rotation_precision_cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from orthotune.methods.loco import LoCO
from orthotune.recipes.finetune import build
from orthotune.recipes.runconfig import RunConfig

MAIN_FORWARD, MAIN_CORE_DTYPE = LoCO.forward, LoCO.core_dtype  # main's: the rotation in the core's dtype


class _Accumulated32(torch.autograd.Function):
    """``x + ((x A) K^T) A^T`` in ``x``'s dtype (bf16) whose backward forms every product from the bf16 operands in
    float32 and sums the two terms of ``A``'s gradient there (one rounding, as a float32-output GEMM would)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, A: Tensor, K: Tensor) -> Tensor:
        ctx.save_for_backward(x, A, K)
        return x + ((x @ A) @ K.mT) @ A.mT

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, A, K = ctx.saved_tensors
        gx = grad + ((grad @ A) @ K) @ A.mT
        xf, gf, Af, Kf = (t.float().reshape(-1, t.shape[-1]) for t in (x, grad, A, K))
        t, u = xf @ Af, gf @ Af
        gA = xf.mT @ (u @ Kf) + gf.mT @ (t @ Kf.mT)
        return gx, gA.to(A.dtype), (u.mT @ t).to(K.dtype)


def _add_in_float32(self: LoCO, x: Tensor, base: Any, core: Any) -> Tensor:
    A, K = self.rotation_factors(core)
    z = x.to(K.dtype)
    return base(x + (((z @ A) @ K.mT) @ A.mT).to(x.dtype))


def _accumulated(self: LoCO, x: Tensor, base: Any, core: Any) -> Tensor:
    A, K = self.rotation_factors(core)
    return base(_Accumulated32.apply(x.to(K.dtype), A, K)).to(x.dtype)


def _float32_dtype(self: LoCO, dtype: torch.dtype, base: Any) -> torch.dtype:
    return dtype


ARMS: dict[str, tuple[Callable, Callable]] = {
    "float32 rotation": (MAIN_FORWARD, _float32_dtype),
    "bf16 rotation (main)": (MAIN_FORWARD, MAIN_CORE_DTYPE),
    "bf16 correction, float32 sum": (_add_in_float32, MAIN_CORE_DTYPE),
    "bf16 forward, float32 backward sums": (_accumulated, MAIN_CORE_DTYPE),
}


def nf4_recipe(method: str, adapter: dict[str, Any], data: Path, output_dir: str, **data_settings: Any) -> RunConfig:
    """The causal-LM recipe's run of ``method`` on q/v on the CPU, its SmolLM2 base in NF4 with bf16 compute, on the
    TRL prompt/completion files in ``data`` (shared with ``head_precision.py``)."""
    return RunConfig.from_dict({
        "task": "causal_lm", "method": method, "adapter": {"target_modules": ["q_proj", "v_proj"], **adapter},
        "model": {"dtype": "float32", "max_length": 128, "prompt_suffix": " Give only the final answer.",
                  "quantization": "nf4", "compute_dtype": "bfloat16"},
        "data": {"train_file": str(data / "train.jsonl"), "validation_file": str(data / "val.jsonl"),
                 "test_file": str(data / "test.jsonl"), **data_settings},
        "train": {"steps": 1}, "device": "cpu", "output_dir": output_dir})


def use(arm: str) -> None:
    LoCO.forward, LoCO.core_dtype = ARMS[arm]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="a folder with train.jsonl, val.jsonl, test.jsonl (TRL prompt/completion)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    d = Path(args.data_dir)
    cfg = nf4_recipe("loco", {"rank": 3, "chain_length": 2, "mode": "exact"}, d, "/tmp/rotation_precision")
    start = time.perf_counter()
    task, model = build(cfg)
    model.train()  # bitsandbytes' CPU inference layout (eval mode) has other numerics; this model has no dropout
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grad(arm: str, batch: Any) -> tuple[float, Tensor]:
        use(arm)
        for p in params:
            p.grad = None
        loss = task.loss(model, batch, 0)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in params])

    gradients = []
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    for step in range(args.steps + 1):
        batch = task.train_batch(0, step, 16)
        _, reference = loss_and_grad("float32 rotation", batch)
        if step % 10 == 0:
            row: dict[str, Any] = {"step": step}
            for arm in ("bf16 rotation (main)", "bf16 forward, float32 backward sums"):
                _, g = loss_and_grad(arm, batch)
                row[arm] = {"cosine": torch.nn.functional.cosine_similarity(g, reference, dim=0).item(),
                            "relative_error": ((g - reference).norm() / reference.norm()).item()}
            gradients.append(row)
            print(row, flush=True)
            loss_and_grad("float32 rotation", batch)  # the step takes the float32 rotation's gradient
        if step < args.steps:
            opt.step()
    losses: dict[str, list[float]] = {arm: [] for arm in ("float32 rotation", "bf16 rotation (main)", "bf16 correction, float32 sum")}
    with torch.no_grad():
        for j in range(args.batches):
            batch = task.train_batch(1, j, 16)
            for arm, values in losses.items():
                use(arm)
                values.append(task.loss(model, batch, 0).item())
    use("bf16 rotation (main)")
    ref = losses["float32 rotation"]
    forward = {}
    for arm, values in losses.items():
        diff = [a - b for a, b in zip(values, ref)]
        forward[arm] = {"mean_loss": statistics.mean(values), "minus_float32": statistics.mean(diff),
                        "standard_error": statistics.stdev(diff) / len(diff) ** 0.5}
    env = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - start, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"environment": env, "steps": args.steps, "batches": args.batches, "gradients": gradients, "forward": forward}
    (out / "rotation_precision.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"LoCO k2 r3 on q/v, SmolLM2-135M-Instruct NF4 (bf16 compute), CPU ({env['date']}, torch {env['torch']}); "
             f"trained {args.steps} steps with the float32 rotation.", "",
             f"Training loss on {args.batches} unseen batches of 16, paired by batch:", "",
             "| rotation | loss | minus float32 rotation (s.e.) |", "|---|---:|---:|"]
    lines += [f"| {arm} | {v['mean_loss']:.4f} | {v['minus_float32']:+.5f} ({v['standard_error']:.5f}) |" for arm, v in forward.items()]
    lines += ["", "Adapter gradient against the float32 rotation's (cosine / relative error):", "",
              "| step | bf16 rotation (main) | bf16 forward, float32 backward sums |", "|---:|---:|---:|"]
    for row in gradients:
        a, b = row["bf16 rotation (main)"], row["bf16 forward, float32 backward sums"]
        lines.append(f"| {row['step']} | {a['cosine']:.4f} / {a['relative_error']:.4f} | {b['cosine']:.4f} / {b['relative_error']:.4f} |")
    (out / "rotation_precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
