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


def arm_rows(folder: Path, label: str) -> tuple[tuple, list[str]]:
    """The summary row of one arm, and its training-loss cells per window."""
    bf16 = call24.table_runs(folder / "quality_lm_bf16.json", "loco")
    nf4 = call24.table_runs(folder / "quality_lm_nf4.json", "loco")
    seeds = sorted(bf16.keys() & nf4.keys())
    gap = [nf4[s][0] - bf16[s][0] for s in seeds]
    nll = [nf4[s][1] - bf16[s][1] for s in seeds]
    row = (label, len(seeds), statistics.mean(bf16[s][0] for s in seeds), statistics.mean(nf4[s][0] for s in seeds),
           *call24.mean_se(gap), statistics.stdev(gap), *call24.mean_se(nll))
    print(f"\n{label} (test exact match, %; answer NLL)\n\n| seed | bf16 | NF4 | gap | NLL gap |\n|---|---:|---:|---:|---:|")
    for s in seeds:
        print(f"| {s} | {bf16[s][0]:.2f} | {nf4[s][0]:.2f} | {nf4[s][0] - bf16[s][0]:+.2f} | {nf4[s][1] - bf16[s][1]:+.4f} |")
    if set(bf16) ^ set(nf4):
        print(f"seed(s) {sorted(set(bf16) ^ set(nf4))} finished on one base only: left out")
    loss_b, loss_q = train_losses(folder / "quality_lm_bf16.json"), train_losses(folder / "quality_lm_nf4.json")
    cells = []
    for a, b in WINDOWS:
        diffs = [statistics.mean(loss_q[s][a - 1:b]) - statistics.mean(loss_b[s][a - 1:b]) for s in seeds]
        cells.append("{:+.4f} ({:.4f})".format(*call24.mean_se(diffs)))
    return row, cells


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
    summary, losses = [], []
    for arm, label in ARMS.items():
        if not (HERE / "gpu" / arm).is_dir():
            print(f"\n{label}: not run (no gpu/{arm}/)")
            continue
        row, cells = arm_rows(HERE / "gpu" / arm, label)
        summary.append(row)
        losses.append((label, row[1], cells))
    ref = HERE.parent / "call24" / "gpu" / "loco"
    bf16, nf4 = call24.table_runs(ref / "quality_lm_bf16.json", "loco"), call24.table_runs(ref / "quality_lm_nf4.json", "loco")
    seeds = sorted(bf16.keys() & nf4.keys())
    gap, nll = [nf4[s][0] - bf16[s][0] for s in seeds], [nf4[s][1] - bf16[s][1] for s in seeds]
    summary.insert(0, ("LoCO k2 r3, 3e-3 (call 24)", len(seeds), statistics.mean(bf16[s][0] for s in seeds),
                       statistics.mean(nf4[s][0] for s in seeds), *call24.mean_se(gap), statistics.stdev(gap), *call24.mean_se(nll)))
    print("\n| LoCO | seeds | bf16 | NF4 | NF4 - bf16 | s.e. over seeds | s.d. of one pair's gap | answer NLL gap (s.e.) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, n, b, q, g, se, sd, ng, nse in summary:
        print(f"| {label} | {n} | {b:.2f} | {q:.2f} | **{g:+.2f}** | {se:.2f} | {sd:.2f} | {ng:+.4f} ({nse:.4f}) |")
    runs = {(arm, base): call24.table_runs(HERE / "gpu" / arm / f"quality_lm_{base}.json", "loco")
            for arm in ARMS if (HERE / "gpu" / arm).is_dir() for base in ("bf16", "nf4")}
    runs |= {("r3_3e-3", "bf16"): bf16, ("r3_3e-3", "nf4"): nf4}
    across(runs)
    print("\n| LoCO | seeds | " + " | ".join(f"steps {a}-{b}: training loss NF4 - bf16 (s.e.)" for a, b in WINDOWS) + " |")
    print("|---|---:|" + "---:|" * len(WINDOWS))
    for label, n, cells in losses:
        print(f"| {label} | {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
