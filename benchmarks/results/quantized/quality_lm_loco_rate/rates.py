"""This folder's README table: LoCO at 2e-3 (this call) against 3e-3 (../quality_lm_loco_bf16rot/), seed by seed.

    python benchmarks/results/quantized/quality_lm_loco_rate/rates.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent
OLD = HERE.parent / "quality_lm_loco_bf16rot"
sys.path.insert(0, str(OLD))
from paired import loose_runs, paired, table_runs  # noqa: E402


def main() -> None:
    arms = {
        ("bf16", "3e-3"): table_runs(OLD / "seeds_6-11/quality_lm_bf16.json", "loco"),
        ("NF4", "3e-3"): table_runs(OLD / "quality_lm_nf4.json", "loco") | loose_runs(OLD / "seeds_6-11/quality_lm_nf4_runs.json"),
        ("bf16", "2e-3"): table_runs(HERE / "quality_lm_bf16.json", "loco"),
        ("NF4", "2e-3"): table_runs(HERE / "quality_lm_nf4.json", "loco"),
    }
    seeds = sorted(set.intersection(*(set(a) for a in arms.values())))
    print(f"seeds {seeds[0]}-{seeds[-1]}\n")
    print("| base | lr | test exact match | std | answer NLL | NF4 - bf16 at this lr: exact match (paired s.e.) | answer NLL |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (base, lr), arm in arms.items():
        ems = [arm[s][0] for s in seeds]
        rest = ("", "") if base == "bf16" else tuple(paired(arm, arms[("bf16", lr)], seeds, i) for i in (0, 1))
        print(f"| {base} | {lr} | {statistics.mean(ems):.2f} | {statistics.stdev(ems):.2f} | "
              f"{statistics.mean(arm[s][1] for s in seeds):.4f} | {rest[0]} | {rest[1]} |")
    for base in ("bf16", "NF4"):
        print(f"\n{base}, 2e-3 minus 3e-3: exact match {paired(arms[(base, '2e-3')], arms[(base, '3e-3')], seeds, 0)}, "
              f"answer NLL {paired(arms[(base, '2e-3')], arms[(base, '3e-3')], seeds, 1)}")
    print(f"NF4 at 2e-3 minus bf16 at 3e-3: exact match {paired(arms[('NF4', '2e-3')], arms[('bf16', '3e-3')], seeds, 0)}")


if __name__ == "__main__":
    main()
