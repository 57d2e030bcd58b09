"""Call 24's GPU tables: NF4 against bf16 for LoCO k2 r3 (3e-3) and OFT b32 (2e-3) on 2000 test questions, seeds 0-8,
paired by seed, from the quality.py files in gpu/<method>/ (OFT's NF4 file is the second call's, which resumed the
first's eight runs and ran seed 8, out of GPU memory in the first).

    python benchmarks/results/quantized/call24/paired.py
"""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

HERE = Path(__file__).parent
METHODS = {"loco": "LoCO k2 r3, 3e-3", "oft": "OFT b32, 2e-3"}
# quality_lm_loco_bf16rot/paired.py reads quality.py's files (as ../quality_lm_loco_rate/rates.py uses it); loaded by
# path, since this script has its name
_spec = importlib.util.spec_from_file_location("bf16rot_paired", HERE.parent / "quality_lm_loco_bf16rot" / "paired.py")
_bf16rot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bf16rot)
table_runs = _bf16rot.table_runs


def mean_se(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) / len(values) ** 0.5


def seed_table(label: str, bf16: dict, nf4: dict) -> None:
    """Each seed run on both bases: exact match and answer NLL, NF4 against bf16."""
    print(f"\n{label} (test exact match, %; answer NLL)\n")
    print("| seed | bf16 | NF4 | gap | NLL gap |\n|---|---:|---:|---:|---:|")
    for s in sorted(bf16.keys() & nf4.keys()):
        print(f"| {s} | {bf16[s][0]:.2f} | {nf4[s][0]:.2f} | {nf4[s][0] - bf16[s][0]:+.2f} | {nf4[s][1] - bf16[s][1]:+.4f} |")


def pair_row(label: str, bf16: dict, nf4: dict) -> tuple:
    """The summary row of seeds run on both bases: their count, mean scores, gap (s.e., s.d.) and NLL gap (s.e.)."""
    seeds = sorted(bf16.keys() & nf4.keys())
    gap = [nf4[s][0] - bf16[s][0] for s in seeds]
    nll = [nf4[s][1] - bf16[s][1] for s in seeds]
    return (label, len(seeds), statistics.mean(bf16[s][0] for s in seeds), statistics.mean(nf4[s][0] for s in seeds),
            *mean_se(gap), statistics.stdev(gap), *mean_se(nll))


def summary_table(first: str, rows: list[tuple]) -> None:
    print(f"\n| {first} | seeds | bf16 | NF4 | NF4 - bf16 | s.e. over seeds | s.d. of one pair's gap | answer NLL gap (s.e.) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, n, b, q, g, se, sd, ng, nse in rows:
        print(f"| {label} | {n} | {b:.2f} | {q:.2f} | **{g:+.2f}** | {se:.2f} | {sd:.2f} | {ng:+.4f} ({nse:.4f}) |")


def main() -> None:
    summary = []
    for method, label in METHODS.items():
        bf16 = table_runs(HERE / "gpu" / method / "quality_lm_bf16.json", method)
        nf4 = table_runs(HERE / "gpu" / method / "quality_lm_nf4.json", method)
        seed_table(label, bf16, nf4)
        summary.append(pair_row(label, bf16, nf4))
    summary_table("method", summary)


if __name__ == "__main__":
    main()
