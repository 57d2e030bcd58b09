"""The CPU pilot's training losses, NF4 against bf16: each run's per-step training loss (the recipe's results.json in
cpu_pilot.py's scratch folder, ``<method>-<base><seed>/``), averaged over windows of steps and paired by seed (both
bases train on the same batches in the same order), so the table says whether an NF4 run fits its training batches
as well as its bf16 twin, early and late.

    python benchmarks/results/quantized/call24/train_loss.py --scratch /tmp/call24-pilot   # collect, then tabulate
    python benchmarks/results/quantized/call24/train_loss.py                               # tabulate cpu_pilot/train_loss.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

HERE = Path(__file__).parent
WINDOWS = ((1, 50), (101, 200), (251, 300))


def collect(scratch: Path) -> dict[str, dict[str, dict[str, list[float]]]]:
    """method -> seed -> base -> training loss of steps 1..N, from every finished run in ``scratch``; the folders left
    out (other names, or no results.json: a run that did not finish) are named."""
    runs: dict = {}
    left_out = []
    for folder in sorted(p for p in scratch.iterdir() if p.is_dir()):
        match = re.fullmatch(r"(\w+)-(bf16|nf4)(\d+)", folder.name)
        if match is None or not (folder / "results.json").exists():
            left_out.append(folder.name)
            continue
        method, base, seed = match.groups()
        history = json.loads((folder / "results.json").read_text())["history"]["train"]
        runs.setdefault(method, {}).setdefault(seed, {})[base] = [loss for _, loss, _ in sorted(history)]
    if left_out:
        print(f"left out {len(left_out)} folder(s) of {scratch} (not <method>-<base><seed>, or unfinished): {', '.join(left_out)}")
    return runs


def table(runs: dict) -> None:
    """Each method's NF4 - bf16 training loss per window, mean over the seeds run on both bases (s.e.)."""
    print("| method | seeds | " + " | ".join(f"steps {a}-{b}: NF4 - bf16 (s.e.)" for a, b in WINDOWS) + " |")
    print("|---|---:|" + "---:|" * len(WINDOWS))
    for method, seeds in sorted(runs.items()):
        pairs = [s for s in seeds.values() if {"bf16", "nf4"} <= s.keys()]
        unpaired = sorted(seed for seed, s in seeds.items() if len(s) == 1)
        if unpaired:
            print(f"{method}: seed(s) {', '.join(unpaired)} left out, run on one base only")
        cells = []
        for a, b in WINDOWS:
            gaps = [statistics.mean(s["nf4"][a - 1:b]) - statistics.mean(s["bf16"][a - 1:b]) for s in pairs]
            cells.append(f"{statistics.mean(gaps):+.4f} ({statistics.stdev(gaps) / len(gaps) ** 0.5:.4f})")
        print(f"| {method} | {len(pairs)} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch", type=Path, help="cpu_pilot.py's scratch folder: collect its runs into --file first")
    parser.add_argument("--file", type=Path, default=HERE / "cpu_pilot" / "train_loss.json")
    args = parser.parse_args()
    if args.scratch is not None:
        runs = collect(args.scratch)
        if not runs:
            raise SystemExit(f"no <method>-<base><seed>/results.json in {args.scratch}")
        args.file.write_text(json.dumps(runs) + "\n")
    elif not args.file.exists():
        raise SystemExit(f"no {args.file}: pass --scratch (cpu_pilot.py's scratch folder) first")
    table(json.loads(args.file.read_text()))


if __name__ == "__main__":
    main()
