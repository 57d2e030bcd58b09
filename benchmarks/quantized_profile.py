"""Where a training step's GPU time goes on the 4-bit 8B-shaped model of ``quantized.py``, per method and mode.

    python benchmarks/quantized_profile.py --layers 2 --only "peft LoRA r16,LoCA" --modes eager --out DIR
    python benchmarks/quantized_profile.py --only "LoRA r16,OFT b32" --modes compiled --autocast --out DIR

Each run builds the model as ``quantized.py`` does, trains ``--warmup`` steps, then profiles ``--steps``
steps with ``torch.profiler``: wall time per step, the GPU's busy time (the sum of kernel times) and the
kernels that take most of it, so a ratio against peft LoRA splits into extra kernels (GPU time) and launch
overhead (wall minus busy). Writes profile.json and profile.md under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import efficiency as eff  # noqa: E402
import quantized as q  # noqa: E402


def profiled(label: str, build: Any, shape: q.Shape, batch: int, seq: int, compiled: bool, warmup: int, steps: int,
             top: int, autocast: bool = False) -> dict[str, Any]:
    """Wall and kernel time per step of one method, with its ``top`` kernels by GPU time (``autocast``: forward and
    loss under ``torch.autocast(bfloat16)``)."""
    torch.cuda.empty_cache()
    model, params, step = q.training(shape, build, batch, seq, "cuda", compiled, autocast)
    for _ in range(warmup):
        step()
    events, wall_ms, busy, launches = eff.profile_steps(step, steps)
    kernels = sorted((e for e in events if e.device_type.name == "CUDA"), key=lambda e: -e.self_device_time_total)
    host = sorted((e for e in events if e.device_type.name == "CPU"), key=lambda e: -e.self_cpu_time_total)
    row = {
        "method": label, "mode": q.mode_label(compiled, autocast), "batch": f"{batch}x{seq}", "layers": shape.layers,
        "wall_ms": wall_ms, "gpu_busy_ms": busy, "kernel_launches": launches,
        "top": [{"kernel": e.key[:120], "ms": e.self_device_time_total / 1e3 / steps, "calls": e.count / steps}
                for e in kernels[:top]],
        "host_top": [{"op": e.key[:120], "ms": e.self_cpu_time_total / 1e3 / steps, "calls": e.count / steps} for e in host[:15]],
    }
    del model, step, params
    return row


def markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = ["# GPU time of one training step on the 4-bit 8B-shaped model", "",
             f"{env.get('gpu')}; torch {env['torch']}, peft {env['peft']}, bitsandbytes {env['bitsandbytes']}; {env['date']}.", ""]
    lines += ["| method | mode | batch | layers | wall ms | GPU busy ms | launches |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['mode']} | {r['batch']} | {r['layers']} | {r['wall_ms']:.1f} | {r['gpu_busy_ms']:.1f} | "
              f"{r['kernel_launches']:.0f} |" for r in rows if "error" not in r]
    for r in rows:
        if "error" in r:
            lines += ["", f"{r['method']} {r['mode']}: {r['error']}"]
            continue
        lines += ["", f"## {r['method']}, {r['mode']}, {r['batch']}", "", "| ms | calls | kernel |", "|---|---|---|"]
        lines += [f"| {k['ms']:.2f} | {k['calls']:.0f} | `{k['kernel']}` |" for k in r["top"]]
        lines += ["", "| host ms | calls | op (self CPU time) |", "|---|---|---|"]
        lines += [f"| {k['ms']:.2f} | {k['calls']:.0f} | `{k['op']}` |" for k in r["host_top"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", default="1x2048")
    ap.add_argument("--only", default="peft LoRA r16,LoRA r16,LoCA", help="comma-separated substrings of method names")
    ap.add_argument("--modes", default="eager")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--autocast", action="store_true", help="forward and loss under torch.autocast(bfloat16)")
    args = ap.parse_args()
    shape = replace(q.SIZES["8B"], layers=args.layers)
    batch, seq = (int(v) for v in args.batch.split("x"))
    env = q.environment("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    wanted = [s for s in args.only.split(",") if s]
    for mode in args.modes.split(","):
        for label, build in q.methods(shape).items():
            if not any(s in label for s in wanted):
                continue
            try:
                row = profiled(label, build, shape, batch, seq, mode == "compiled", args.warmup, args.steps, args.top, args.autocast)
            except Exception as e:  # a failed run is reported, the others still run
                row = {"method": label, "mode": q.mode_label(mode == "compiled", args.autocast), "error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "top"}), flush=True)
            (args.out / "profile.json").write_text(json.dumps({"env": env, "args": vars(args) | {"out": str(args.out)},
                                                               "rows": rows}, indent=1))
    text = markdown(rows, env)
    (args.out / "profile.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
