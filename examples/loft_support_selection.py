"""Gradient-informed LOFT supports against random (and principal) ones, on real weights and data.

all-MiniLM-L6-v2 embeds BANKING77 utterances; a frozen nearest-class-mean head scores them, so
only the LOFT adapters learn. Every adapter rotates the same layers inside an r-dimensional support
(the same trainable parameters) and sees the same batches; only the support differs. Prints the
held-out loss before training and after the same number of steps for each support.

    python examples/loft_support_selection.py            # about 2 minutes on 2 CPU cores
    python examples/loft_support_selection.py --steps 200 --r 16 --supports gradient random principal
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from orthotune.recipes.support_comparison import Setting, compare_supports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Setting):
        if f.name == "targets":
            parser.add_argument("--targets", nargs="+", default=Setting().targets)
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    parser.add_argument("--supports", nargs="+", default=["gradient", "random", "principal"])
    parser.add_argument("--threads", type=int, default=2)
    args = vars(parser.parse_args())
    torch.set_num_threads(args.pop("threads"))
    supports = tuple(args.pop("supports"))
    setting = Setting(**args)
    start = time.perf_counter()
    report = compare_supports(setting, supports, progress=True)
    print(f"\nLOFT r={setting.r} ({setting.transform}) on {', '.join(setting.targets)}; {setting.steps} steps of "
          f"{setting.batch_size}, {setting.optimizer} lr {setting.lr}; held-out BANKING77 dev loss ({setting.n_eval} utterances)")
    print(f"{'support':<22}{'trainable':>10}{'captured':>10}{'train loss':>12}{'eval loss':>11}")
    print(f"{'(before training)':<22}{'':>10}{'':>10}{'':>12}{report['base']['eval_loss']:>11.4f}")
    for name in supports:
        row = report[name]
        captured = f"{row['captured_fraction']:.3f}" if "captured_fraction" in row else "-"
        print(f"{name:<22}{int(row['trainable']):>10}{captured:>10}{row['train_loss']:>12.4f}{row['eval_loss']:>11.4f}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
