"""Does LoCO's gap to LoRA on the DiT transfer come from the norms a rotation keeps? A causal check.

``W0 R`` keeps every output unit's weight norm. This experiment (outside the LoCO paper) gives each adapted layer
one more trainable vector ``m`` (d_out, initialised to 1) that rescales its output units, ``y = m * (W0 R x) + b``
(DoRA's magnitude, on a rotation), trains the recipe exactly as ``orthotune finetune`` would, and prints the
held-out metric. If the rescaling closes most of the gap, the kept norms are the cause.

    python benchmarks/loco_magnitude.py --config recipes/dit_digits.yaml --lr 2.7e-2 --seeds 0 1 2 \
        --set model.checkpoint=pretrained:dit-fmnist-small --set method=loco \
        --set "adapter={target_modules: [attn.qkv, attn.proj, mlp.fc1, mlp.fc2], rank: 5, chain_length: 2}"
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


def add_magnitudes(model: nn.Module) -> int:
    """A trainable per-output-unit scale on every adapter layer's output (bias excluded); returns its parameter count."""
    from orthotune.layer.adapter_layer import AdapterLayer

    count = 0
    for layer in [m for m in model.modules() if isinstance(m, AdapterLayer)]:
        layer.magnitude = nn.Parameter(torch.ones(layer.d_out, device=layer.base_layer.weight.device))
        bias = layer.base_layer.bias

        def rescale(module: nn.Module, args: tuple, out: torch.Tensor, bias: torch.Tensor | None = bias) -> torch.Tensor:
            return (out - bias) * module.magnitude + bias if bias is not None else out * module.magnitude

        layer.register_forward_hook(rescale)
        count += layer.d_out
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", action="append", default=[], help="recipe override, as orthotune finetune --set")
    parser.add_argument("--out", type=Path, help="JSON of the runs")
    args = parser.parse_args()
    from orthotune.recipes.finetune import build
    from orthotune.recipes.loop import fit
    from orthotune.recipes.runconfig import load_run_config

    runs = []
    for seed in args.seeds:
        config = load_run_config(args.config, args.set + [f"seed={seed}", f"train.lr={args.lr!r}", "train.save_every=0",
                                                          "train.eval_every=0", "train.compile=false"])
        task, model = build(config, fresh=True)
        extra = add_magnitudes(model)
        with tempfile.TemporaryDirectory() as run_dir:
            fitted = fit(model, task, config.train, Path(run_dir), progress=False)
        final = fitted.history["eval"][-1][1]
        runs.append({"seed": seed, "final": final, "magnitude_parameters": extra,
                     "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)})
        print(json.dumps(runs[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"config": args.config, "lr": args.lr, "overrides": args.set, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
