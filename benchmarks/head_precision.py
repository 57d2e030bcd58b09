"""Does keeping a 4-bit model's output head in bf16 change what an adapter trains? (issue 21)

``orthotune.prepare_model_for_kbit_training`` holds the output head in float32, as peft's function does;
``upcast_head=False`` leaves it (and embeddings tied to it) in the dtype it was loaded in (bf16), as the QLoRA
paper's script does, and the logits are then bf16. This script measures what that changes on the causal-LM
recipe's model (SmolLM2-135M-Instruct, NF4 with bf16 compute, its head tied to its embeddings), on the CPU, for
LoRA r8, LoCO k2 r3 and OFT b32 on q/v:

- the adapter's gradient at its first step under each preparation: cosine and relative error against the
  float32 one;
- the same adapter trained ``--steps`` AdamW steps on the same batches under each preparation, then the answer
  NLL of the validation questions under its own preparation, paired question by question; and, as controls
  that say how far any two such runs drift apart, ``--controls`` runs under each preparation whose first
  gradient is multiplied by ``1 + 1e-6 * noise`` (a different noise each), so that the two preparations' runs
  can be compared as two samples (mean NLL of each, the difference and its standard error between runs);
- the float32-trained adapter's NLL under the bf16 preparation: what the forward alone changes.

    python benchmarks/head_precision.py --data-dir DIR --out benchmarks/results/quantized/head_precision_cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from orthotune.recipes.finetune import build
from rotation_precision import nf4_recipe  # this folder is the script's, so on sys.path

METHODS = {  # the quality check's adapters on q/v (benchmarks/quality.py at LoRA r8's budget) and their rates
    "lora": ({"r": 8, "lora_alpha": 16}, 2e-3),
    "loco": ({"rank": 3, "chain_length": 2, "mode": "exact"}, 3e-3),
    "oft": ({"r": 0, "oft_block_size": 32}, 2e-3),
}
REF, OURS, FORWARD = "float32 (peft's, the default)", "bf16 (upcast_head=False)", "float32-trained, bf16 forward"


def arms(controls: int) -> dict[str, tuple[torch.dtype, int | None]]:
    """Each run: the embeddings' and head's dtype, and the seed of the control's gradient noise (None: no noise)."""
    out: dict[str, tuple[torch.dtype, int | None]] = {REF: (torch.float32, None), OURS: (torch.bfloat16, None)}
    out.update({f"control {i}": (torch.float32, i) for i in range(controls)})
    out.update({f"bf16 control {i}": (torch.bfloat16, i) for i in range(controls)})
    return out


def between_runs(nll: dict[str, float], controls: int) -> dict[str, Any]:
    """Each preparation's runs (the plain one and its controls) as a sample: mean NLL, and bf16 minus float32."""
    out: dict[str, Any] = {"float32": sample([nll[REF]] + [nll[f"control {i}"] for i in range(controls)]),
                           "bf16": sample([nll[OURS]] + [nll[f"bf16 control {i}"] for i in range(controls)])}
    if controls:
        out["bf16_minus_float32"] = difference(out["bf16"], out["float32"])
    return out


def sample(values: list[float]) -> dict[str, Any]:
    """Runs' final NLLs as a sample: their number, mean and standard deviation (None for one run)."""
    sd = statistics.stdev(values) if len(values) > 1 else None
    return {"runs": len(values), "mean": statistics.mean(values), "sd": sd}


def difference(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Sample ``a``'s mean minus ``b``'s and its standard error between runs (unequal variances)."""
    return {"mean": a["mean"] - b["mean"], "standard_error": (a["sd"] ** 2 / a["runs"] + b["sd"] ** 2 / b["runs"]) ** 0.5}


def use(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Hold the (tied) embeddings and head in ``dtype``: the loaded bf16 values are exact in float32 either way (the
    preparation's hooks cast the head's input to its dtype and the embeddings' output to float32)."""
    head = model.get_base_model().get_output_embeddings().weight
    head.data = head.data.to(dtype)


def question_nll(task: Any, model: torch.nn.Module) -> list[float]:
    """Each evaluation question's mean answer-token NLL, teacher-forced, in train mode (no dropout here)."""
    return [nll / tokens for nll, tokens in task.answer_nll_by_question(model)]


def recipe_model(method: str, data: Path) -> tuple[Any, torch.nn.Module, list[Tensor]]:
    """The recipe's task and NF4 model with ``method`` on q/v, in train mode, and its adapters' starting values."""
    adapter, _ = METHODS[method]
    task, model = build(nf4_recipe(method, adapter, data, f"/tmp/head_precision_{method}", eval_split="val"))
    model.train()  # bitsandbytes' CPU inference layout (eval mode) has other numerics; this model has no dropout
    return task, model, [p.detach().clone() for p in model.parameters() if p.requires_grad]


def train(task: Any, model: torch.nn.Module, start: list[Tensor], lr: float, steps: int,
          seed: int | None) -> tuple[Tensor, list[float]]:
    """``steps`` AdamW steps from ``start`` on the recipe's first batches; a ``seed`` multiplies the first gradient
    by ``1 + 1e-6 * noise``. Returns that first gradient (before the noise) and the training losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses, first = [], torch.empty(0)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, task.train_batch(0, step, 16), 0)
        loss.backward()
        if step == 0:
            first = torch.cat([p.grad.flatten() for p in params])
            if seed is not None:
                noise = torch.Generator().manual_seed(seed)
                for p in params:
                    p.grad.mul_(1 + 1e-6 * torch.randn(p.grad.shape, generator=noise))
        losses.append(loss.item())
        opt.step()
    return first, losses


def run(method: str, data: Path, steps: int, controls: int) -> dict[str, Any]:
    adapter, lr = METHODS[method]
    task, model, start = recipe_model(method, data)
    grads: dict[str, Tensor] = {}
    nll: dict[str, list[float]] = {}
    losses: dict[str, list[float]] = {}
    for arm, (dtype, seed) in arms(controls).items():
        use(model, dtype)
        grads[arm], losses[arm] = train(task, model, start, lr, steps, seed)
        nll[arm] = question_nll(task, model)
        if arm == REF:  # the float32-trained adapter under the bf16 preparation: the forward alone
            use(model, torch.bfloat16)
            nll[FORWARD] = question_nll(task, model)
    g, g_ref = grads[OURS], grads[REF]
    return {
        "method": method, "adapter": adapter, "lr": lr, "steps": steps, "questions": len(nll[REF]),
        "gradient_cosine": F.cosine_similarity(g, g_ref, dim=0).item(),
        "gradient_relative_error": ((g - g_ref).norm() / g_ref.norm()).item(),
        "train_loss_last10": {arm: statistics.mean(v[-10:]) for arm, v in losses.items()},
        "answer_nll": {arm: statistics.mean(v) for arm, v in nll.items()},
        "minus_float32": {arm: paired(v, nll[REF]) for arm, v in nll.items() if arm != REF},
        "between_runs": between_runs({arm: statistics.mean(v) for arm, v in nll.items()}, controls),
    }


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean of ``a - b`` over questions and its standard error."""
    diff = [x - y for x, y in zip(a, b)]
    return {"mean": statistics.mean(diff), "standard_error": statistics.stdev(diff) / len(diff) ** 0.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="a folder with train.jsonl, val.jsonl, test.jsonl (TRL prompt/completion)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--controls", type=int, default=2,
                        help="runs with a perturbed first gradient, under each preparation")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    began = time.perf_counter()
    rows = []
    for method in args.methods:
        rows.append(run(method, Path(args.data_dir), args.steps, args.controls))
        print(json.dumps(rows[-1]), flush=True)
    env = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - began, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "head_precision.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    lines = [f"SmolLM2-135M-Instruct NF4 (bf16 compute, head tied to the embeddings), adapters on q/v, CPU ({env['date']}, "
             f"torch {env['torch']}): the embeddings and head in float32 (peft's preparation, orthotune's default) or bf16 "
             f"(upcast_head=False); "
             f"{args.steps} AdamW steps on the same batches; validation answer NLL, minus the float32 run's, paired by "
             "question (s.e.).", "",
             "| method | first-step gradient, bf16 vs float32: cosine / relative error | float32 run's NLL | bf16 run | "
             "controls: float32 runs, first gradient x (1 + 1e-6 noise) | bf16 controls | float32-trained adapter, "
             "bf16 forward | runs' mean NLL: float32 / bf16 (sd) | bf16 - float32 between runs (s.e.) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = r["minus_float32"]
        cell = lambda k: f"{d[k]['mean']:+.4f} ({d[k]['standard_error']:.4f})"  # noqa: E731
        controls = ", ".join(cell(k) for k in d if k.startswith("control"))
        bf16_controls = ", ".join(cell(k) for k in d if k.startswith("bf16 control"))
        b = r["between_runs"]
        sd = lambda g: f"{b[g]['mean']:.4f}" + (f" ({b[g]['sd']:.4f})" if b[g]["sd"] is not None else "")  # noqa: E731
        diff = b.get("bf16_minus_float32")
        diff_cell = f"{diff['mean']:+.4f} ({diff['standard_error']:.4f})" if diff else "n/a"
        lines.append(f"| {r['method']} | {r['gradient_cosine']:.4f} / {r['gradient_relative_error']:.4f} | "
                     f"{r['answer_nll'][REF]:.4f} | {cell(OURS)} | {controls} | {bf16_controls} | {cell(FORWARD)} | "
                     f"{sd('float32')} / {sd('bf16')} | {diff_cell} |")
    (out / "head_precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
