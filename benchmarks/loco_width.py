"""Does LoCO's best Adam learning rate depend on the layer's width d or the generator's rank r? (issue 22, item 2)

A controlled task where only d and r change: fit ``W* = W0 R*`` from ``y = W* x`` with one LoCO layer on the frozen
``W0`` (d x d, Gaussian, std 1/sqrt(d)), where ``R*`` turns ``m`` random planes by fixed angles (the same angles at
every width: the same rotation task). Inputs are fresh Gaussian batches; the loss is the MSE; Adam as the recipes
use it (no weight decay, no schedule). The score is the part of the needed update left after training,
``||W - W*||_F / ||W0 - W*||_F`` (1 at the identity start, 0 when the rotation is learned), which does not shrink
with d as a plain relative loss would (the rotation moves 2m of d directions). For every (d, r, chain length) the
script sweeps a geometric grid of rates and reports the best and the score at LoCO's default rate.

    python benchmarks/loco_width.py --out benchmarks/results/loco_width
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
from pathlib import Path

import torch
from torch import nn

import orthotune

ANGLES = (0.6, 0.3)  # radians of the teacher's planes (2 planes at every width: within a rank-2 generator)
RATES = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)


def teacher(d: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W0, W*)``: a Gaussian frozen weight and the same weight after turning ``len(ANGLES)`` random planes."""
    W0 = torch.randn(d, d, generator=generator, dtype=torch.float64) / math.sqrt(d)
    Q, _ = torch.linalg.qr(torch.randn(d, 2 * len(ANGLES), generator=generator, dtype=torch.float64))
    R = torch.eye(d, dtype=torch.float64)
    for i, theta in enumerate(ANGLES):  # R = I + Q (exp(J) - I) Q^T, J block-diagonal [[0, -t], [t, 0]]
        a, b = Q[:, 2 * i : 2 * i + 1], Q[:, 2 * i + 1 : 2 * i + 2]
        R += (math.cos(theta) - 1) * (a @ a.T + b @ b.T) + math.sin(theta) * (b @ a.T - a @ b.T)
    return W0, W0 @ R


def run(d: int, rank: int, chain: int, lr: float, steps: int, batch: int, seed: int) -> float:
    """Train one LoCO layer at ``lr``; the remaining fraction of the needed update."""
    g = torch.Generator().manual_seed(seed)
    W0, target = teacher(d, g)
    base = nn.Sequential(nn.Linear(d, d, bias=False))
    with torch.no_grad():
        base[0].weight.copy_(W0.float())
    torch.manual_seed(seed)
    model = orthotune.get_model(base, orthotune.LoCOConfig(target_modules=["0"], rank=rank, chain_length=chain))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    W_star = target.float()
    for _ in range(steps):
        x = torch.randn(batch, d, generator=g)
        loss = (model(x) - x @ W_star.T).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        W = model.get_base_model()[0].merged_matrix(["default"]).double()
    left = float((W - target).norm() / (W0 - target).norm())
    return left if math.isfinite(left) else float("inf")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/loco_width"))
    ap.add_argument("--widths", default="128,512,2048")
    ap.add_argument("--settings", default="2x1,8x1,2x3", help="comma-separated rank x chain_length")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table-only", action="store_true", help="rewrite README.md from the saved JSON, run nothing")
    args = ap.parse_args(argv)
    if args.table_only:
        write_table(args.out)
        return
    default_lr = orthotune.LoCOConfig().default_learning_rate()
    rows = []
    for setting in args.settings.split(","):
        rank, chain = (int(v) for v in setting.split("x"))
        for d in (int(w) for w in args.widths.split(",")):
            scores = {lr: run(d, rank, chain, lr, args.steps, args.batch, args.seed) for lr in RATES}
            best = min(scores, key=scores.get)
            at_default = run(d, rank, chain, default_lr, args.steps, args.batch, args.seed)
            rows.append(dict(d=d, rank=rank, chain_length=chain, best_lr=best, best_left=scores[best],
                             default_lr=default_lr, default_left=at_default, scores={str(k): v for k, v in scores.items()}))
            print(f"d={d:5d} r={rank} k={chain}: best lr {best:.0e} leaves {scores[best]:.3f}; "
                  f"default {default_lr:.0e} leaves {at_default:.3f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, python=platform.python_version(),
                device="cpu", steps=args.steps, batch=args.batch, seed=args.seed, angles=ANGLES, rates=RATES)
    (args.out / "loco_width.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    write_table(args.out)


def write_table(out: Path) -> None:
    """``out/README.md`` from ``out/loco_width.json``: best rate per row and the whole grid of scores."""
    res = json.loads((out / "loco_width.json").read_text())
    meta, rows = res["meta"], res["rows"]
    default_lr = rows[0]["default_lr"]
    lines = [f"LoCO's best Adam rate by width and rank (`benchmarks/loco_width.py`; CPU, {meta['date']}, torch {meta['torch']}, "
             f"{meta['steps']} steps of {meta['batch']}, seed {meta['seed']}). Score: the part of the needed update left "
             "(1 = none learned, 0 = the teacher's rotation exactly).", "",
             "| d | rank | chain | best lr | left at best | left at default " + f"{default_lr:.0e} | "
             + " | ".join(f"{float(lr):.0e}" for lr in meta["rates"]) + " |",
             "|" + "---|" * (6 + len(meta["rates"]))]
    lines += [f"| {r['d']} | {r['rank']} | {r['chain_length']} | {r['best_lr']:.0e} | {r['best_left']:.3f} | {r['default_left']:.3f} | "
              + " | ".join(f"{r['scores'][str(lr)]:.3f}" for lr in meta["rates"]) + " |" for r in rows]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
