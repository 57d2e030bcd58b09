"""The ``orthotune`` command line: thin over ``orthotune.train``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> None:
    from .train.demo import run_demo

    run_demo(out_dir=args.out, train_size=args.train_size, test_size=args.test_size, epochs=args.epochs, lr=args.lr, seed=args.seed, min_gain=args.min_gain)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orthotune", description="Structure-preserving parameter-efficient fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fine-tune all-MiniLM-L6-v2 on BANKING77 with LoCO on CPU, save, reload, merge")
    demo.add_argument("--out", default="runs/demo", help="output folder (adapter and results.json)")
    demo.add_argument("--train-size", type=int, default=None, help="use a seeded subset of the training set")
    demo.add_argument("--test-size", type=int, default=None, help="evaluate on a seeded subset of the test set")
    demo.add_argument("--epochs", type=int, default=1)
    demo.add_argument("--lr", type=float, default=3e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--min-gain", type=float, default=0.02, help="fail unless accuracy rises by this much")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
