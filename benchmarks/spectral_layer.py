"""Forward + backward time of one adapted linear layer: LoCA and FourierFT (orthotune) against peft.

    python benchmarks/spectral_layer.py --device cuda --dtype bfloat16 --d-in 2048 --d-out 2048 --tokens 4096

Prints the median milliseconds per step (forward, backward to the input and the adapter parameters)
and the ratio to peft LoRA r16 on the same layer, interleaving the methods to share drift.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import orthotune


def _peft(base: nn.Module, config) -> nn.Module:
    import peft

    return peft.get_peft_model(base, config)


def build(name: str, base: nn.Module, n: int) -> nn.Module:
    import peft

    kind, _, variant = name.partition(":")
    if kind == "peft-lora":
        return _peft(base, peft.LoraConfig(target_modules=["lin"], r=16, lora_alpha=16))
    if kind == "peft-fourierft":
        return _peft(base, peft.FourierFTConfig(target_modules=["lin"], n_frequency=n, init_weights=False))
    if kind == "loca":
        return orthotune.get_model(base, orthotune.LoCAConfig(target_modules=["lin"], n_frequency=n, compute=variant, init_identity=False))
    if kind == "fourierft":
        return orthotune.get_model(base, orthotune.FourierFTConfig(target_modules=["lin"], n_frequency=n, compute=variant, init_identity=False))
    raise ValueError(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    ap.add_argument("--d-in", type=int, default=2048)
    ap.add_argument("--d-out", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument(
        "--methods",
        default="peft-lora,loca:auto,loca:lowrank,loca:dense,fourierft:auto,fourierft:lowrank,fourierft:dense,peft-fourierft",
    )
    args = ap.parse_args()
    dtype, dev = getattr(torch, args.dtype), torch.device(args.device)

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(args.d_in, args.d_out, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    base = One().to(dev, dtype)
    names = args.methods.split(",")
    models = {m: build(m, copy.deepcopy(base), args.n).to(dev) for m in names}
    x = torch.randn(args.tokens, args.d_in, device=dev, dtype=dtype, requires_grad=True)
    gy = torch.randn(args.tokens, args.d_out, device=dev, dtype=dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {m: [] for m in names}
    for step in range(args.steps + 3):
        for m in names:
            sync()
            t = time.perf_counter()
            models[m](x).backward(gy)
            sync()
            if step >= 3:
                times[m].append(1e3 * (time.perf_counter() - t))
            x.grad = None
            models[m].zero_grad(set_to_none=True)
    ref = statistics.median(times[names[0]])
    print(f"# {args.d_out}x{args.d_in}, {args.tokens} tokens, n={args.n}, {args.dtype} on {dev}")
    for m in names:
        med = statistics.median(times[m])
        print(f"{m:22s} {med:9.3f} ms  x{med / ref:5.2f} vs {names[0]}")


if __name__ == "__main__":
    main()
