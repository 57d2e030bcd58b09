"""Call 25's tables: LoCO's NF4 gap at 2.4x the matched budget (gpu/<arm>/, seeds paired across the bf16 and NF4 bases)
beside call 24's LoCO k2 r3 on the same 2000 test questions, then each arm's training loss, NF4 minus bf16, over the
windows of call24/train_loss.py (quality.py keeps every step's loss since this call), and the arms' exact match paired by
seed across the two calls.

    python benchmarks/results/quantized/call25/paired.py
"""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# call 24's paired table (and the quality.py reader it takes from quality_lm_loco_bf16rot/), and its loss windows
call24 = _load("call24_paired", HERE.parent / "call24" / "paired.py")
WINDOWS = _load("call24_train_loss", HERE.parent / "call24" / "train_loss.py").WINDOWS
ARMS = {"r3": "LoCO k2 r3, 2e-3", "r8": "LoCO k2 r8, 2e-3", "k4": "LoCO k4 r4, 2e-3"}


def train_losses(path: Path) -> dict[int, list[float]]:
    """seed -> per-step training loss of a quality.py file's finished table runs."""
    runs = json.loads(path.read_text())["tasks"]["lm"]["runs"]["loco"]
    return {r["seed"]: r["train_loss"] for r in runs if r["key"].startswith("table:") and "value" in r}


def loss_cells(folder: Path, seeds: list[int]) -> list[str]:
    """One arm's training loss, NF4 minus bf16, per window: mean over ``seeds`` (s.e.)."""
    loss_b, loss_q = train_losses(folder / "quality_lm_bf16.json"), train_losses(folder / "quality_lm_nf4.json")
    cells = []
    for a, b in WINDOWS:
        diffs = [statistics.mean(loss_q[s][a - 1:b]) - statistics.mean(loss_b[s][a - 1:b]) for s in seeds]
        cells.append("{:+.4f} ({:.4f})".format(*call24.mean_se(diffs)))
    return cells


def across(runs: dict[tuple[str, str], dict[int, tuple[float, float]]]) -> None:
    """Exact match of one (arm, base) minus another's, paired by seed across the two calls."""
    rows = [(("r3_3e-3", "bf16"), ("r3", "bf16"), "bf16: k2 r3 at 3e-3 minus at 2e-3"),
            (("r3_3e-3", "nf4"), ("r3", "nf4"), "NF4: k2 r3 at 3e-3 minus at 2e-3"),
            (("r8", "nf4"), ("r3", "nf4"), "NF4: k2 r8 minus k2 r3, both at 2e-3"),
            (("r8", "bf16"), ("r3", "bf16"), "bf16: k2 r8 minus k2 r3, both at 2e-3"),
            (("r8", "nf4"), ("r3_3e-3", "bf16"), "k2 r8 on NF4 at 2e-3 minus k2 r3 on bf16 at 3e-3 (each base's best run here)")]
    print("\n| comparison | difference |\n|---|---:|")
    for a, b, label in rows:
        if a not in runs or b not in runs:
            continue
        seeds = sorted(runs[a].keys() & runs[b].keys())
        print("| {} | {:+.2f} ({:.2f}) |".format(label, *call24.mean_se([runs[a][s][0] - runs[b][s][0] for s in seeds])))


def main() -> None:
    ref = HERE.parent / "call24" / "gpu" / "loco"
    runs = {("r3_3e-3", base): call24.table_runs(ref / f"quality_lm_{base}.json", "loco") for base in ("bf16", "nf4")}
    summary = [call24.pair_row("LoCO k2 r3, 3e-3 (call 24)", runs["r3_3e-3", "bf16"], runs["r3_3e-3", "nf4"])]
    losses = []
    for arm, label in ARMS.items():
        folder = HERE / "gpu" / arm
        if not folder.is_dir():
            print(f"\n{label}: not run (no gpu/{arm}/)")
            continue
        bf16, nf4 = (call24.table_runs(folder / f"quality_lm_{base}.json", "loco") for base in ("bf16", "nf4"))
        runs[arm, "bf16"], runs[arm, "nf4"] = bf16, nf4
        call24.seed_table(label, bf16, nf4)
        if set(bf16) ^ set(nf4):
            print(f"seed(s) {sorted(set(bf16) ^ set(nf4))} finished on one base only: left out")
        summary.append(call24.pair_row(label, bf16, nf4))
        losses.append((label, summary[-1][1], loss_cells(folder, sorted(bf16.keys() & nf4.keys()))))
    call24.summary_table("LoCO", summary)
    across(runs)
    print("\n| LoCO | seeds | " + " | ".join(f"steps {a}-{b}: training loss NF4 - bf16 (s.e.)" for a, b in WINDOWS) + " |")
    print("|---|---:|" + "---:|" * len(WINDOWS))
    for label, n, cells in losses:
        print(f"| {label} | {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
