"""The paired comparisons in this folder's README (and ../call17/'s), from the JSON files the calls wrote.

    python benchmarks/results/quantized/quality_lm_loco_bf16rot/paired.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent


def table_runs(path: Path, method: str) -> dict[int, tuple[float, float]]:
    """seed -> (test exact match in points, answer NLL) of a quality.py file's table runs."""
    runs = json.loads(path.read_text())["tasks"]["lm"]["runs"][method]
    return {r["seed"]: (100 * r["value"], r["final"]["answer_nll"]) for r in runs if r["key"].startswith("table:") and "value" in r}


def loose_runs(path: Path) -> dict[int, tuple[float, float]]:
    return {r["seed"]: (100 * r["final"]["exact_match"], r["final"]["answer_nll"]) for r in json.loads(path.read_text())["runs"]}


def paired(a: dict, b: dict, seeds: list[int], i: int) -> str:
    diff = [a[s][i] - b[s][i] for s in seeds]
    digits = 2 if i == 0 else 4
    return f"{statistics.mean(diff):+.{digits}f} (s.e. {statistics.stdev(diff) / len(diff) ** 0.5:.{digits}f})"


def main() -> None:
    bf16 = table_runs(HERE / "seeds_6-11/quality_lm_bf16.json", "loco")  # seeds 0-5 resumed, 6-11 run
    nf4 = table_runs(HERE / "quality_lm_nf4.json", "loco") | loose_runs(HERE / "seeds_6-11/quality_lm_nf4_runs.json")
    fp32 = table_runs(HERE / "fp32_rotation_ab/seeds_0-11/quality_lm_nf4.json", "loco")
    corr = table_runs(HERE / "../call17/loco/quality_lm_nf4.json", "loco")
    arms = {"bf16 base": bf16, "NF4, bf16 rotation (main)": nf4, "NF4, float32 rotation": fp32, "NF4 + frozen rank-8 correction": corr}
    for label, seeds in (("seeds 0-11", list(range(12))), ("seeds 0-8", sorted(corr)), ("seeds 0-2", [0, 1, 2])):
        print(f"\n{label}\n\n| LoCO k2 r3, 3e-3 | test exact match | answer NLL | minus bf16 base: exact match | answer NLL |")
        print("|---|---:|---:|---:|---:|")
        for name, arm in arms.items():
            if not all(s in arm for s in seeds):
                continue
            em = statistics.mean(arm[s][0] for s in seeds)
            nll = statistics.mean(arm[s][1] for s in seeds)
            rest = ("", "") if arm is bf16 else (paired(arm, bf16, seeds, 0), paired(arm, bf16, seeds, 1))
            print(f"| {name} | {em:.2f} | {nll:.4f} | {rest[0]} | {rest[1]} |")
    print("\nNF4 float32 minus bf16 rotation, seeds 0-11: exact match", paired(fp32, nf4, list(range(12)), 0),
          "answer NLL", paired(fp32, nf4, list(range(12)), 1))
    print("NF4 + correction minus main, seeds 0-8: exact match", paired(corr, nf4, sorted(corr), 0),
          "answer NLL", paired(corr, nf4, sorted(corr), 1))
    swept = HERE / "../quality_lm_swept"
    ob, on = table_runs(swept / "quality_lm_bf16.json", "oft"), table_runs(swept / "quality_lm_nf4.json", "oft")
    oc = table_runs(HERE / "../call17/oft/quality_lm_nf4.json", "oft")
    s6 = list(range(6))
    print(f"\nOFT b32 at 2e-3, seeds 0-5: bf16 {statistics.mean(ob[s][0] for s in s6):.2f}, NF4 {statistics.mean(on[s][0] for s in s6):.2f} "
          f"({paired(on, ob, s6, 0)}), NF4 + correction {statistics.mean(oc[s][0] for s in s6):.2f} ({paired(oc, ob, s6, 0)}; "
          f"answer NLL {paired(oc, on, s6, 1)} against NF4)")


if __name__ == "__main__":
    main()
