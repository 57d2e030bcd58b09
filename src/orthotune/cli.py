"""The ``orthotune`` command line: thin over ``orthotune.recipes``.

    orthotune finetune --config recipes/text_banking77.yaml --set adapter.rank=8 --seed 1
    orthotune finetune --config recipes/text_banking77.yaml --resume     # continue from the last checkpoint
    torchrun --nproc_per_node 2 -m orthotune finetune --config recipes/text_banking77.yaml   # DDP on 2 GPUs
    orthotune eval runs/banking77-loco
    orthotune merge runs/banking77-loco --out merged/banking77-loco
    orthotune inspect runs/banking77-loco
    orthotune pretrain vit-fmnist
    orthotune methods loco
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .methods.config import AdapterConfig
from .methods.registry import METHODS
from .recipes.demo import run_demo
from .recipes.finetune import adapter_folder, evaluate_adapter, finetune, load_run, merge_adapter
from .recipes.inspection import inspect_adapter, summary, write_report
from .recipes.pretrain import SPECS, checkpoint_dir, pretrain
from .recipes.runconfig import load_run_config
from .training import distributed

# flag -> recipe key: shortcuts for the most used overrides
_SHORTCUTS = {"task": "task", "method": "method", "output_dir": "output_dir", "seed": "seed", "steps": "train.steps",
              "epochs": "train.epochs", "lr": "train.lr", "batch_size": "train.batch_size", "device": "device",
              "compile": "train.compile"}


def _recipe(args: argparse.Namespace):
    overrides = [f"{key}={getattr(args, flag)}" for flag, key in _SHORTCUTS.items() if getattr(args, flag, None) is not None]
    return load_run_config(args.config, list(args.set) + overrides)


def _finetune(args: argparse.Namespace) -> None:
    config = _recipe(args)
    try:
        results = finetune(config, resume=args.resume, progress=not args.quiet, distributed=args.distributed)
    except BaseException:
        distributed.shutdown(wait=False)  # other ranks may never reach a barrier: the launcher stops them
        raise
    main = distributed.is_main_process()
    distributed.shutdown()
    if not main:
        return
    final = results.get("final", {})
    before = results.get("before") or {}
    metric = results["metric"]
    line = f"{config.task} / {config.method} (seed {config.seed}): {metric} {final.get(metric, float('nan')):.4f}"
    if metric in before:
        line += f" (step 0: {before[metric]:.4f})"
    print(line + f"; {results['parameters']['trainable']:,} trainable parameters; {results['train_seconds']:.1f} s training")
    print(f"results, adapter and curves in {config.output_dir}")


def _run_and_adapter(args: argparse.Namespace):
    if args.config:
        return load_run(args.run, _recipe(args), args.adapter)
    return load_run(args.run, None, args.adapter, overrides=list(args.set))  # --set on a run folder: e.g. a moved data file


def _eval(args: argparse.Namespace) -> None:
    config, adapter = _run_and_adapter(args)
    metrics = evaluate_adapter(config, adapter)
    print(json.dumps(metrics, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")


def _merge(args: argparse.Namespace) -> None:
    config, adapter = _run_and_adapter(args)
    print(f"merged model written to {merge_adapter(config, adapter, args.out)}")


def _inspect(args: argparse.Namespace) -> None:
    adapter = adapter_folder(args.adapter)
    report = inspect_adapter(adapter)
    print(summary(report))
    out = Path(args.out) if args.out else adapter.parent / f"{adapter.name}-inspect"
    files = write_report(report, out)
    print("wrote " + ", ".join(str(f) for f in files))


def _pretrain(args: argparse.Namespace) -> None:
    out = Path(args.out) if args.out else checkpoint_dir(args.name)
    if out.exists():
        raise SystemExit(f"{out} exists already; remove it to pretrain again")
    pretrain(SPECS[args.name], out, progress=not args.quiet, device=args.device)


def _methods(args: argparse.Namespace) -> None:
    common = {f.name for f in dataclasses.fields(AdapterConfig)}
    names = [args.name] if args.name else sorted(METHODS)
    for name in names:
        if name not in METHODS:
            raise SystemExit(f"unknown method {name!r}; registered: {sorted(METHODS)} (and 'full' for full fine-tuning)")
        config_cls = METHODS[name][0]
        print(f"{name}: {config_cls.__name__}")
        for f in dataclasses.fields(config_cls):
            if f.name in common and not args.name:
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            print(f"  adapter.{f.name} = {default!r}: {f.metadata.get('help', '')}")
    if not args.name:
        print("full: full fine-tuning (every parameter trains; no adapter settings)")


def _demo(args: argparse.Namespace) -> None:
    run_demo(out_dir=args.out, train_size=args.train_size or None, test_size=args.test_size or None, epochs=args.epochs, lr=args.lr,
             seed=args.seed, min_gain=args.min_gain, max_length=args.max_length)


def _lr(text: str) -> float | str:
    """``--lr``: a number or ``auto``."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _add_recipe_args(p: argparse.ArgumentParser, shortcuts: bool) -> None:
    p.add_argument("--config", help="recipe file (.yaml or .json); see recipes/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key with a YAML value, e.g. adapter.rank=8, train.lr=1e-3, "
                   "'adapter.target_modules=[query,value]' (repeatable)")
    if shortcuts:
        p.add_argument("--task", help="task name (recipe key task)")
        p.add_argument("--method", help="a registered method (orthotune methods) or 'full'")
        p.add_argument("--output-dir", help="run folder")
        p.add_argument("--seed", type=int)
        p.add_argument("--steps", type=int)
        p.add_argument("--epochs", type=float)
        p.add_argument("--lr", type=_lr, help="peak learning rate, or 'auto': a short range test around the method's default, scored on "
                       "the validation split (held-out training batches without one), picks it (recorded in lr_search.json)")
        p.add_argument("--batch-size", type=int)
        p.add_argument("--device", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
        p.add_argument("--no-compile", dest="compile", action="store_const", const="false",
                       help="train eagerly (recipe key train.compile; default auto: torch.compile on CUDA)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orthotune", description="Structure-preserving parameter-efficient fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)

    ft = sub.add_parser("finetune", help="fine-tune with a recipe: progress bar, periodic eval, checkpoints, results.json, curves.png")
    _add_recipe_args(ft, shortcuts=True)
    ft.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint, if any")
    ft.add_argument("--quiet", action="store_true", help="no progress bar")
    ft.add_argument("--distributed", choices=["auto", "ddp", "fsdp", "none"], default="auto",
                    help="under torchrun / accelerate launch: DDP or FSDP2 over the launched processes (auto: DDP when "
                    "WORLD_SIZE > 1); rank 0 prints and writes (docs/distributed.md)")
    ft.set_defaults(func=_finetune)

    for name, helptext, func in (("eval", "evaluate a trained adapter on the recipe's held-out data", _eval),
                                 ("merge", "merge an adapter into its base model and write a plain model folder", _merge)):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("run", nargs="?", help="a run folder (holding config.yaml and adapter/)")
        _add_recipe_args(p, shortcuts=False)
        p.add_argument("--adapter", help="adapter folder (default: <run>/adapter)")
        if name == "merge":
            p.add_argument("--out", required=True, help="folder to create for the merged model")
        else:
            p.add_argument("--out", help="also write the metrics to this JSON file")
        p.set_defaults(func=func)

    ins = sub.add_parser("inspect", help="config, parameter counts, rotation-angle spectra and orthogonality errors of an adapter")
    ins.add_argument("adapter", help="a run folder, or an adapter folder (adapter_config.json + adapter_model.safetensors)")
    ins.add_argument("--out", help="folder for inspect.json and inspect.png (default: <adapter>-inspect)")
    ins.set_defaults(func=_inspect)

    pre = sub.add_parser("pretrain", help="pretrain a recipe backbone from scratch (ViT / DiT on Fashion-MNIST)")
    pre.add_argument("name", choices=["vit-fmnist", "dit-fmnist"])
    pre.add_argument("--out", help="checkpoint folder (default: the cache folder recipes load)")
    pre.add_argument("--device", default=None)
    pre.add_argument("--quiet", action="store_true")
    pre.set_defaults(func=_pretrain)

    met = sub.add_parser("methods", help="list the registered methods and their adapter.* settings")
    met.add_argument("name", nargs="?")
    met.set_defaults(func=_methods)

    demo = sub.add_parser("demo", help="fine-tune all-MiniLM-L6-v2 on BANKING77 with LoCO on CPU, save, reload, merge")
    demo.add_argument("--out", default="runs/demo", help="output folder (adapter and results.json)")
    demo.add_argument("--train-size", type=int, default=2310, help="a seeded random subset of the 9,003 training examples (0: all)")
    demo.add_argument("--test-size", type=int, default=1540, help="a seeded random subset of the 3,080 test examples (0: all)")
    demo.add_argument("--max-length", type=int, default=32, help="tokens per example (longer ones are truncated)")
    demo.add_argument("--epochs", type=int, default=1)
    demo.add_argument("--lr", type=float, default=6e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--min-gain", type=float, default=0.02, help="fail unless accuracy rises by this much")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as err:
        # bad input (recipe, adapter folder, settings): one clear line, not a traceback
        print(f"orthotune {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
