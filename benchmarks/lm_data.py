"""The LM recipe's generated questions as JSON lines files, for a machine without reasoning-gym (the GPU image).

Writes ``train.jsonl``, ``val.jsonl`` and ``test.jsonl`` (TRL's prompt/completion format: ``data.train_file=
DIR/train.jsonl`` and so on) with exactly the rows ``recipes/lm_arithmetic.yaml`` generates, or, with ``--eval-size``,
the rows it generates under ``data.eval_size=N``: a test split of N questions whose first 200 are the recipe's own (the
generator's draws come in order), with val and train drawn as the recipe draws them, never repeating a test question.

    python benchmarks/lm_data.py --out .carry/lmq/b/lm-data-2000 --eval-size 2000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def lm_jsonl(dest: Path, eval_size: int | None = None, recipe: Path = ROOT / "recipes" / "lm_arithmetic.yaml") -> dict[str, int]:
    """Write the recipe's splits (at ``data.eval_size=eval_size`` if given) to ``dest``; returns each split's rows."""
    from orthotune.recipes.causal_lm import LMDataSettings, load_rows
    from orthotune.recipes.runconfig import load_run_config
    from orthotune.recipes.task import from_mapping

    config = load_run_config(recipe)
    data = dict(config.data) if eval_size is None else {**config.data, "eval_size": eval_size}
    rows, _ = load_rows(from_mapping(LMDataSettings, data, "data"), config.model.get("prompt_suffix", ""))
    dest.mkdir(parents=True)
    for split, items in rows.items():
        (dest / f"{split}.jsonl").write_text("".join(json.dumps({"prompt": r["messages"][-1]["content"], "completion": r["answer"]}) + "\n"
                                                     for r in items))
    return {split: len(items) for split, items in rows.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the three files")
    parser.add_argument("--eval-size", type=int, default=None, help="the recipe's data.eval_size (its own: 200)")
    args = parser.parse_args(argv)
    print(args.out, lm_jsonl(args.out, args.eval_size))


if __name__ == "__main__":
    main()
