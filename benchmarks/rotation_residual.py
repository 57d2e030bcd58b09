"""How much of a trained update an input-side rotation could make: the orthogonal-Procrustes residual.

LoCO, OFT, BOFT, HRA and LOFT train ``W = W0 R`` with ``R`` orthogonal, which keeps every output unit's weight
norm (the rows of a torch ``Linear`` weight). For a run whose update is unconstrained (LoRA, full fine-tuning),
this script measures, per adapted layer, how far the trained ``W`` is from the best full-rank rotation of ``W0``:

* ``residual`` = ||W - W0 R*||_F / ||W - W0||_F with R* = argmin over orthogonal R (Procrustes: R* = U V^T from
  the SVD of W0^T W); 0 means a rotation could make the whole update, 1 that it makes none of it;
* ``norm_change`` = mean over output units of | ||w_i|| - ||w0_i|| | / ||w0_i|| (what no rotation can change).

Low-rank rotations (LoCO's) are a subset of all rotations, so their residual is at least this one. Usage, with run
folders written by ``orthotune finetune`` (their ``config.yaml`` and ``adapter/``):

    python benchmarks/rotation_residual.py runs/dit-lora runs/vit-lora --out benchmarks/results/dit_cpu_grids/residual.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def procrustes_residual(w0: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """(residual, norm_change) of ``w`` against ``w0`` (both ``out x in``), in float64."""
    w0, w = w0.double(), w.double()
    u, _, vh = torch.linalg.svd(w0.T @ w)
    best = w0 @ (u @ vh)
    residual = (torch.linalg.matrix_norm(w - best) / torch.linalg.matrix_norm(w - w0)).item()
    n0, n = w0.norm(dim=1), w.norm(dim=1)
    return residual, ((n - n0).abs() / n0).mean().item()


def layer_weights(run: Path, targets: list[str]) -> tuple[str, str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The run's task and method, and (base weight, trained weight) of every ``targets`` layer the run changed
    (embeddings and heads that a recipe trains alongside are left out)."""
    import dataclasses

    from orthotune.model.adapter_model import AdapterModel
    from orthotune.recipes.finetune import build, load_trained
    from orthotune.recipes.runconfig import FULL, load_run_config

    config = load_run_config(run / "config.yaml")
    _, base = build(dataclasses.replace(config, method=FULL, adapter={}), fresh=False)  # the plain pretrained model
    before = {k: v.detach().clone() for k, v in base.state_dict().items() if v.ndim == 2}
    _, model = load_trained(config, run / "adapter")
    plain = model.merge_and_unload() if isinstance(model, AdapterModel) else model
    after = plain.state_dict()
    changed = {k: (w0, after[k].detach()) for k, w0 in before.items()
               if any(k.endswith(f"{t}.weight") for t in targets) and not torch.equal(after[k], w0)}
    return config.task, config.method, changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (config.yaml + adapter/)")
    parser.add_argument("--targets", nargs="+", default=["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"],
                        help="layer name suffixes to measure (default: the ViT and DiT recipes' target_modules)")
    parser.add_argument("--out", type=Path, help="JSON with every layer's numbers")
    args = parser.parse_args()
    report = {}
    for run in args.runs:
        task, method, layers = layer_weights(run, args.targets)
        rows = {name: dict(zip(("residual", "norm_change"), procrustes_residual(w0, w))) for name, (w0, w) in layers.items()}
        if not rows:
            raise SystemExit(f"{run}: no weight changed (is the adapter empty?)")
        summary = {k: statistics.mean(r[k] for r in rows.values()) for k in ("residual", "norm_change")}
        report[str(run)] = {"task": task, "method": method, "layers": rows, "mean": summary}
        print(f"{run}: {task} {method}, {len(rows)} layers: residual {summary['residual']:.3f}, "
              f"norm change {100 * summary['norm_change']:.2f}%", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
