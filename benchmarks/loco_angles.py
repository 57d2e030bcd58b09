"""How far a trained LoCO adapter rotates: the spectral norm (largest rotation angle, radians) of every generator.

``S_i = U_i V_i^T - V_i U_i^T`` is skew-symmetric, so ``exp(S_i)`` turns planes by the angles ``|lambda(S_i)|``;
``||S_i||_2`` is the largest. Read from a run folder's ``adapter/`` (or an adapter folder), in float64.

    python benchmarks/loco_angles.py runs/lm_loco_lr3e-3 runs/lm_loco_lr9e-3 --out benchmarks/results/loco_lr
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file


def generator_norms(folder: Path) -> dict[str, list[float]]:
    """Module name -> ``||S_i||_2`` of each generator of its chain."""
    path = folder / "adapter" / "adapter_model.safetensors"
    state = load_file(path if path.exists() else folder / "adapter_model.safetensors")
    out: dict[str, list[float]] = {}
    for key, U in state.items():
        if key.endswith(".U"):
            V = state[key[:-1] + "V"].double()
            U = U.double()
            out[key[:-2]] = [float(torch.linalg.matrix_norm(U[i] @ V[i].T - V[i] @ U[i].T, 2)) for i in range(U.shape[0])]
    if not out:
        raise ValueError(f"{folder}: no LoCO generators (keys ending in '.U') in the adapter's safetensors")
    return out


def summary(folder: Path) -> dict[str, object]:
    norms = generator_norms(folder)
    flat = sorted(v for vs in norms.values() for v in vs)
    worst = max(norms, key=lambda k: max(norms[k]))
    row: dict[str, object] = dict(run=str(folder), generators=len(flat), median=statistics.median(flat), mean=statistics.fmean(flat),
                                  max=flat[-1], max_module=worst, per_module=norms)
    results = folder / "results.json"
    if results.exists():
        r = json.loads(results.read_text())
        train = r["history"]["train"]
        cuts = [round(i * len(train) / 6) for i in range(7)]  # six near-equal spans whatever the step count
        row.update(lr=r["config"]["train"]["lr"], steps=r["steps"], final=r["final"], before=r["before"],
                   train_loss_by_sixth=[statistics.fmean(x[1] for x in train[a:b]) for a, b in zip(cuts, cuts[1:]) if b > a])
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders of orthotune finetune (or adapter folders)")
    ap.add_argument("--out", type=Path, help="write loco_angles.json and loco_angles.md here")
    args = ap.parse_args(argv)
    rows = [summary(f) for f in args.runs]
    lines = ["| run | lr | generators | median spectral norm of S_i (rad) | max (module) | final | train loss by sixth of the run |", "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {Path(str(r['run'])).name} | {r.get('lr', '-')} | {r['generators']} | {r['median']:.3f} | {r['max']:.3f} "
                     f"({r['max_module']}) | {r.get('final', '-')} | {', '.join(f'{v:.2f}' for v in r.get('train_loss_by_sixth', []))} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__,
                   python=platform.python_version(), machine=platform.machine())
        (args.out / "loco_angles.json").write_text(json.dumps(dict(environment=env, runs=rows), indent=1))
        (args.out / "loco_angles.md").write_text(f"# LoCO rotation angles after training\n\n{env}\n\n{table}\n")


if __name__ == "__main__":
    main()
