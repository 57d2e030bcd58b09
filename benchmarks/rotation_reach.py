"""How far can rotations reach on a task? Three variants of a recipe's run, for LoCO's DiT gap.

An experiment (``benchmarks/results/dit_cpu_grids/``, "Why?"), outside the papers. ``--variant``:

* ``magnitude``: the recipe's own adapter (e.g. LoCO) plus one trainable vector ``m`` per adapted layer (d_out,
  initialised to 1) that rescales its output units, ``y = m * (W0 R x) + b``: DoRA's magnitude on a rotation,
  which ``W0 R`` alone cannot change (it keeps every output unit's weight norm);
* ``input`` / ``output``: no adapter; every target ``nn.Linear`` of the plain model gets one trainable d x d Cayley
  rotation, ``y = W0 (R x) + b`` (the whole family LoCO, OFT and LOFT draw from) or ``y = Q (W0 x) + b`` (a
  rotation of the layer's output, the "pretrained representation"), identity at the start; the base stays frozen
  and only the task's usual extra modules (``default_modules_to_save``, e.g. the DiT's label embedding) train beside;
* ``loco-output``: as ``output``, with ``Q`` LoCO's chain ``exp(S_1) ... exp(S_k)`` of rank-``--rank`` generators
  on the output side (U_i = 0 at the start, V_i ~ N(0, 1/d_out)), built densely from LoCO's factors: LoCO's
  parameter count with d_out for d_in, for comparison with LoCO at LoRA's budget.

Each run trains as ``orthotune finetune`` would and prints the held-out metric:

    python benchmarks/rotation_reach.py --variant output --config recipes/dit_digits.yaml --lr 6e-3 --seeds 0 1 2 \
        --set model.checkpoint=pretrained:dit-fmnist-small
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def rotation(module: nn.Module) -> torch.Tensor:
    """The module's rotation: LoCO's chain of its ``chain_U``/``chain_V`` generators, else the Cayley transform of its
    skew-symmetrised ``rotation_param``."""
    from orthotune.ops.cayley import cayley
    from orthotune.ops.skew import skew_exp_factors

    if hasattr(module, "chain_U"):
        a, b, c = skew_exp_factors(module.chain_U, module.chain_V)  # exp(S_i) = I + A_i C_i B_i^T
        eye = torch.eye(a.shape[-2], dtype=a.dtype, device=a.device)
        out = eye
        for i in range(a.shape[0]):
            out = out @ (eye + a[i] @ c[i] @ b[i].T)
        return out
    a = module.rotation_param
    return cayley(0.5 * (a - a.T))


def _rotate_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0] @ rotation(module).T, *args[1:])


def _rotate_output(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    if module.bias is None:
        return out @ rotation(module).T
    return (out - module.bias) @ rotation(module).T + module.bias


def add_rotations(model: nn.Module, targets: list[str], side: str, chain: tuple[int, int] | None = None) -> int:
    """A rotation on ``side`` of every ``nn.Linear`` whose name ends with a target, full (Cayley) or, with ``chain =
    (k, r)``, LoCO's chain of k rank-r generators; returns the free parameters."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            d = module.in_features if side == "input" else module.out_features
            if chain is None:
                module.rotation_param = nn.Parameter(torch.zeros(d, d, device=module.weight.device))
                count += d * (d - 1) // 2
            else:
                k, r = chain
                module.chain_U = nn.Parameter(torch.zeros(k, d, r, device=module.weight.device))
                module.chain_V = nn.Parameter(torch.randn(k, d, r, device=module.weight.device) / d**0.5)
                count += 2 * k * d * r
            if side == "input":
                module.register_forward_pre_hook(_rotate_input)
            else:
                module.register_forward_hook(_rotate_output)
    if not count:
        raise SystemExit(f"no nn.Linear matches {targets}")
    return count


def _rescale(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    bias = module.base_layer.bias
    return (out - bias) * module.magnitude + bias if bias is not None else out * module.magnitude


def add_magnitudes(model: nn.Module) -> int:
    """A trainable per-output-unit scale on every adapter layer's output (bias excluded); returns its parameter count."""
    from orthotune.layer.adapter_layer import AdapterLayer

    count = 0
    for layer in [m for m in model.modules() if isinstance(m, AdapterLayer)]:
        layer.magnitude = nn.Parameter(torch.ones(layer.d_out, device=layer.base_layer.weight.device))
        layer.register_forward_hook(_rescale)
        count += layer.d_out
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=("magnitude", "input", "output", "loco-output"), required=True)
    parser.add_argument("--rank", type=int, default=4, help="loco-output: the generators' rank r")
    parser.add_argument("--chain", type=int, default=2, help="loco-output: the chain length k")
    parser.add_argument("--config", required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", action="append", default=[], help="recipe override, as orthotune finetune --set")
    parser.add_argument("--out", type=Path, help="JSON of the runs")
    args = parser.parse_args()
    from orthotune.recipes.finetune import build
    from orthotune.recipes.loop import fit
    from orthotune.recipes.runconfig import FULL, load_run_config

    runs = []
    for seed in args.seeds:
        config = load_run_config(args.config, args.set + [f"seed={seed}", f"train.lr={args.lr!r}", "train.save_every=0",
                                                          "train.eval_every=0", "train.compile=false"])
        if args.variant == "magnitude":
            task, model = build(config, fresh=True)
            extra = add_magnitudes(model)
        else:
            targets = list(config.adapter.get("target_modules") or [])
            task, model = build(config.with_overrides([f"method={FULL}", "adapter={}"]), fresh=True)
            model.requires_grad_(False)
            for name in task.default_modules_to_save or []:
                model.get_submodule(name).requires_grad_(True)
            side, chain = ("output", (args.chain, args.rank)) if args.variant == "loco-output" else (args.variant, None)
            extra = add_rotations(model, targets or task.default_targets, side, chain)
        with tempfile.TemporaryDirectory() as run_dir:
            fitted = fit(model, task, config.train, Path(run_dir), progress=False)
        runs.append({"seed": seed, "variant": args.variant, "lr": args.lr, "final": fitted.history["eval"][-1][1],
                     "added_parameters": extra, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)})
        print(json.dumps(runs[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"config": args.config, "overrides": args.set, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
