"""The evaluation table: every method at a matched trainable-parameter budget, on the four recipes.

For each task (a recipe under ``recipes/``) and method:

1. **Budget.** The method's hyperparameters are the candidate whose adapter parameter count on the
   task's target layers is closest to LoRA r=8's (counted exactly by building the method's modules
   on the layer shapes).
2. **Learning rate** (``--sweep``). Three learning rates, the method's default rate
   (``orthotune.methods.defaults``, the one a user who keeps the defaults gets) x {1/3, 1, 3}, seed 0,
   scored on the task's *validation* split; the best one is kept. Where the best lies on the grid's
   edge, the grid grows by 3x past it (``--grow``, at most twice; ``--lr auto``'s rule), so no row's
   position is its grid's edge. Every row is swept the same way. Each sweep run is also scored on the
   *test* split, so seed 0 of the table is the sweep's run at the chosen rate (the same trained
   weights, not a second run).
3. **Table.** Seeds 0, 1, 2 at that rate, scored on the *test* split: mean, std, step-0 baseline,
   exact trainable parameters, training time; beside it the validation score at the default rate
   against the swept best (issue 22's "defaults within 1 point").

Runs go to a pool of worker processes (one GPU shared by several runs: small models leave it
mostly idle), highest priority first: pretraining the ViT/DiT backbones, then ready table runs
(seed by seed), then sweep runs. With ``--deadline`` no run starts that would not finish in
time, so an incomplete table shows fewer seeds instead of nothing.

    python benchmarks/quality.py --tasks text vit dit --workers 8 --deadline 300 --out benchmarks/results
    python benchmarks/quality.py --report benchmarks/results      # quality.md from the JSON files
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SEEDS = (0, 1, 2)
SWEEP = (1 / 3, 1.0, 3.0)


@dataclass
class Bench:
    """One task of the table: its recipe, the benchmark's overrides, and the split keys."""

    recipe: str
    overrides: dict[str, Any] = field(default_factory=dict)
    val: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] = field(default_factory=dict)
    full_lr: float = 1e-4  # base learning rate of full fine-tuning
    pretrain: str | None = None  # backbone spec the task needs first
    metric: str = "accuracy"
    higher_is_better: bool = True
    secondary: str | None = None  # another final metric the table shows (lower is better)


BENCHES: dict[str, Bench] = {
    "text": Bench("recipes/text_banking77.yaml",
                  {"data.train_size": None, "data.eval_size": None, "train.steps": None, "train.epochs": 1},
                  val={"data.eval_split": "dev"}, test={"data.eval_split": "test"}, full_lr=1e-4),
    "lm": Bench("recipes/lm_arithmetic.yaml", {}, val={"data.eval_split": "val"}, test={"data.eval_split": "test"}, full_lr=3e-5,
                metric="exact_match", secondary="answer_nll"),
    "vit": Bench("recipes/vit_digits.yaml", {}, val={"data.eval_split": "val"}, test={"data.eval_split": "test"},
                 full_lr=3e-4, pretrain="vit-fmnist"),
    "dit": Bench("recipes/dit_digits.yaml", {}, val={"data.eval_split": "val"}, test={"data.eval_split": "test"},
                 full_lr=3e-4, pretrain="dit-fmnist", metric="denoising_loss", higher_is_better=False),
}


@dataclass
class Method:
    """A table row: a registered method, its candidate hyperparameters and its base learning rate."""

    method: str  # name in orthotune.METHODS, or "full"
    candidates: Callable[[int, int], list[dict[str, Any]]]  # (LoRA budget, number of layers) -> kwargs list
    note: str = ""
    monotone: bool = True  # candidates come in increasing parameter count: the search stops past the budget


def _per_layer(budget: int, layers: int) -> int:
    return max(1, round(budget / layers))


# The rows, in order of priority when a deadline cuts the session short. Their base learning rate (the
# sweep's centre) is the method config's documented default: see base_lr.
METHODS: dict[str, Method] = {
    "lora": Method("lora", lambda b, n: [dict(r=8, lora_alpha=16)], "r=8 (the budget)"),
    "loco": Method("loco", lambda b, n: [dict(rank=r, chain_length=k, mode="exact") for k in (2,) for r in range(1, 65)],
                   "a chain of 2 rotations, exact parallel form"),
    "loco-parallel": Method("loco", lambda b, n: [dict(rank=r, chain_length=k, mode="approx") for k in (2,) for r in range(1, 65)],
                            "a chain of 2 rotations, exp(S_1 + S_2) approximation"),
    "loft-grad": Method("loft", lambda b, n: [dict(support="gradient", transform="cayley", r=r) for r in range(4, 401, 2)],
                        "gradient-informed support, Cayley transform"),
    "loft-random": Method("loft", lambda b, n: [dict(support="random", transform="cayley", r=r) for r in range(4, 401, 2)],
                          "random support, Cayley transform (loft-grad's control)"),
    "loca": Method("loca", lambda b, n: [dict(n_frequency=_per_layer(b, n))], "learned DCT locations"),
    "oft": Method("oft", lambda b, n: [dict(r=0, oft_block_size=s) for s in (2, 4, 8, 16, 32, 64, 128, 192, 256)],
                  "block-diagonal Cayley"),
    "boft": Method("boft", lambda b, n: [dict(boft_block_size=s, boft_n_butterfly_factor=m) for s in (2, 4, 8, 16, 32, 64)
                                         for m in (1, 2, 3, 4, 5)], "butterfly factors", monotone=False),
    "hra": Method("hra", lambda b, n: [dict(r=r) for r in range(2, 129, 2)], "Householder reflections"),
    "psoft": Method("psoft", lambda b, n: [dict(r=r) for r in range(4, 401, 2)], "principal subspace (PSOFT)"),
    "pissa": Method("pissa", lambda b, n: [dict(r=8, lora_alpha=16)], "principal singular init"),
    "fourierft": Method("fourierft", lambda b, n: [dict(n_frequency=_per_layer(b, n), scaling=150.0)], "random DFT cells"),
    "full": Method("full", lambda b, n: [{}], "every parameter"),
}


def base_lr(name: str, task: str) -> float:
    """Row ``name``'s base learning rate on ``task``: its config's default (``orthotune.methods.defaults``),
    full fine-tuning's per-task rate for ``full``."""
    from types import SimpleNamespace

    from orthotune.methods.defaults import default_lr

    m = METHODS[name]
    if m.method == "full":
        return BENCHES[task].full_lr
    support = m.candidates(1, 1)[0].get("support")
    return default_lr(SimpleNamespace(method=m.method, support=support))


# --------------------------------------------------------------------------- budgets
def target_shapes(bench: Bench, extra: list[str]) -> list[tuple[int, int]]:
    """(d_in, d_out) of every layer the task's recipe targets, from a weightless copy of its model."""
    import torch

    from orthotune.model.inject import iter_named_layers, matcher
    from orthotune.layer.adapter_layer import layer_dims, layer_kind
    from orthotune.recipes.runconfig import load_run_config

    config = load_run_config(ROOT / bench.recipe, [f"{k}={json.dumps(v)}" for k, v in bench.overrides.items()] + extra)
    build = _skeleton(config)
    with torch.device("meta"):
        model = build()
    # matched by name as get_model matches them (its weight checks refuse meta tensors, which carry the shapes)
    targets = config.adapter_config().target_modules
    if targets == "all-linear":  # get_model's rule (inject.find_targets): every linear layer but the output head
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [layer_dims(m) for _, m in iter_named_layers(model) if layer_kind(m) in ("linear", "conv1d") and m is not head]
    is_target = matcher(targets)
    return [layer_dims(m) for n, m in iter_named_layers(model) if is_target(n) and layer_kind(m) is not None]


def _skeleton(config: Any) -> Callable[[], Any]:
    """A function building the task's model without weights (files are read here, outside the meta device)."""
    from transformers import AutoConfig

    if config.task == "text_classification":
        from transformers import AutoModelForSequenceClassification

        from orthotune.recipes.assets import minilm_path

        hf = AutoConfig.from_pretrained(config.model.get("path") or minilm_path(), num_labels=2)
        return lambda: AutoModelForSequenceClassification.from_config(hf)
    if config.task == "causal_lm":
        from transformers import AutoModelForCausalLM

        from orthotune.recipes.assets import smollm2_path

        hf = AutoConfig.from_pretrained(config.model.get("path") or smollm2_path())
        return lambda: AutoModelForCausalLM.from_config(hf)
    from orthotune.recipes.pretrain import SPECS, build_backbone

    ref = config.model["checkpoint"]
    if ref.startswith("pretrained:"):
        spec = SPECS[ref.split(":", 1)[1]]
        kind, arch = spec.kind, spec.model
    else:
        saved = json.loads((Path(ref) / "config.json").read_text())
        kind, arch = saved["kind"], saved["model"]
    return lambda: build_backbone(kind, arch)


def count(method: str, kwargs: dict[str, Any], shapes: list[tuple[int, int]]) -> int | None:
    """Exact adapter parameters of ``method(**kwargs)`` on ``shapes``; None if a layer rejects it."""
    import torch

    from orthotune.methods.registry import METHODS as REGISTRY

    config_cls, module_cls = REGISTRY[method]
    try:
        config = config_cls(target_modules=["x"], **kwargs)
        total = 0
        for (d_in, d_out), k in _multiset(shapes).items():
            module_cls.check_layer(config, d_in, d_out, "x")
            module = module_cls(config, d_in, d_out, torch.zeros(d_out, d_in))
            total += k * sum(p.numel() for p in module.parameters())
        return total
    except (ValueError, TypeError):
        return None


def _multiset(shapes: list[tuple[int, int]]) -> dict[tuple[int, int], int]:
    out: dict[tuple[int, int], int] = {}
    for s in shapes:
        out[s] = out.get(s, 0) + 1
    return out


def match_budget(name: str, shapes: list[tuple[int, int]]) -> dict[str, Any]:
    """The candidate closest to LoRA r=8's parameter count: {kwargs, params, budget} or {error}."""
    from orthotune.methods.registry import METHODS as REGISTRY

    budget = count("lora", dict(r=8), shapes)
    m = METHODS[name]
    if m.method == "full":
        return {"kwargs": {}, "params": None, "budget": budget}
    if m.method not in REGISTRY:
        return {"error": f"method {m.method!r} is not registered in this build", "budget": budget}
    candidates = m.candidates(budget, len(shapes))
    if m.monotone:  # bisect for the first candidate at or over the budget (a rejected one counts as over)
        lo, hi = 0, len(candidates)
        while lo < hi:
            mid = (lo + hi) // 2
            n = count(m.method, candidates[mid], shapes)
            lo, hi = (mid + 1, hi) if n is not None and n < budget else (lo, mid)
        candidates = candidates[max(0, lo - 1) : lo + 1]
    best = None
    for kwargs in candidates:
        n = count(m.method, kwargs, shapes)
        if n is not None and (best is None or abs(n - budget) < abs(best[1] - budget)):
            best = (kwargs, n)
    if best is None:
        return {"error": "no candidate fits these layers", "budget": budget}
    return {"kwargs": best[0], "params": best[1], "budget": budget}


def given_budget(name: str, shapes: list[tuple[int, int]], given: dict[str, Any]) -> dict[str, Any]:
    """Row ``name`` with ``--adapter`` hyperparameters laid over its budget-matched ones (a capacity test, off the
    matched budget): {kwargs, params, budget, given}, or {error} where no candidate matched the budget."""
    matched = match_budget(name, shapes)
    if "error" in matched:
        return matched
    kwargs = {**matched["kwargs"], **given}
    n = count(METHODS[name].method, kwargs, shapes)
    if n is None:  # asked for by name: stop rather than leave the row out
        raise SystemExit(f"--adapter {name}={json.dumps(given)}: {METHODS[name].method} rejects {kwargs} on a target layer")
    return {"kwargs": kwargs, "params": n, "budget": matched["budget"], "given": given}


# --------------------------------------------------------------------------- jobs
def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """In a worker: pretrain a backbone, or one fine-tuning run; returns a compact record."""
    t0 = time.perf_counter()
    try:
        if job["kind"] == "pretrain":
            from orthotune.recipes.pretrain import PretrainSpec, ensure_pretrained

            path = ensure_pretrained(job["name"], progress=False, spec=PretrainSpec(**job["spec"]))
            meta = json.loads((path / "config.json").read_text())["pretraining"]
            return {"path": str(path), "test": meta["test"], "seconds": meta["seconds"], "wall": time.perf_counter() - t0}
        from orthotune.recipes.finetune import evaluate_adapter, finetune
        from orthotune.recipes.runconfig import RunConfig

        r = finetune(RunConfig.from_dict(job["config"]), progress=False)
        out = {"value": r["final"][r["metric"]], "final": r["final"], "before": r.get("before"),
               "parameters": {k: r["parameters"][k] for k in ("trainable", "adapter", "total")},
               "train_seconds": r["train_seconds"], "history_eval": r["history"]["eval"],
               # each logged step's training loss, in step order: paired by seed, two runs' fit of the same batches
               "train_loss": [round(loss, 5) for _, loss, _ in sorted(r["history"]["train"])], "files": r.get("files", [])}
        if job.get("test_config"):  # a sweep run: its weights scored on the test split too (seed 0 of the table)
            out["test_eval"] = evaluate_adapter(RunConfig.from_dict(job["test_config"]), Path(job["config"]["output_dir"]) / "adapter")
        return {**out, "wall": time.perf_counter() - t0}
    except Exception as err:  # one failed run must not stop the table: record it
        return {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:], "wall": time.perf_counter() - t0}


def recipe_config(bench: Bench, split: dict[str, Any], method: str, kwargs: dict[str, Any], lr: float, seed: int,
                  out_dir: Path, extra: list[str]) -> dict[str, Any]:
    from orthotune.recipes.runconfig import apply_overrides, read_mapping

    data = read_mapping(ROOT / bench.recipe)
    target = data.get("adapter", {}).get("target_modules")
    data["method"] = METHODS[method].method
    data["adapter"] = {} if METHODS[method].method == "full" else {"target_modules": target, **kwargs}
    data["seed"] = seed
    data["output_dir"] = str(out_dir)
    overrides = [f"{k}={json.dumps(v)}" for k, v in {**bench.overrides, **split}.items()]
    overrides += [f"train.lr={lr!r}", "train.save_every=0", "train.eval_every=0", f"train.eval_before={str(split is bench.test).lower()}"]
    overrides += extra
    return apply_overrides(data, overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(BENCHES), choices=list(BENCHES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds 0..N-1 per table row (3: the table's protocol)")
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True, help="tune the learning rate on validation")
    parser.add_argument("--grow", type=int, default=0, metavar="N",
                        help="grow a sweep by 3x past a winning edge, at most N times (2: --lr auto's rule; 0: the fixed grid)")
    parser.add_argument("--lr-from", help="an earlier session's JSON: scale each method's base lr by what its sweeps chose there")
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                        help="a method's base learning rate instead of the table's (e.g. loco=3e-3; with --no-sweep, the rate run)")
    parser.add_argument("--adapter", action="append", default=[], metavar="METHOD=JSON",
                        help="a row's hyperparameters over its budget-matched ones, e.g. 'loco={\"rank\": 8}' (a capacity test)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per worker")
    parser.add_argument("--deadline", type=float, default=None, help="seconds from start after which no run may still be going")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="shorter backbone pretraining (quick checks only)")
    parser.add_argument("--first-estimate", type=float, default=30.0, help="assumed seconds of a task's first run (deadline)")
    parser.add_argument("--scratch", default="/tmp/orthotune-bench", help="run folders")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--tag", default=None, help="name of this session's JSON (default: the task names)")
    parser.add_argument("--set", action="append", default=[],
                        help="extra recipe override for every run (train.steps=5) or for one task (vit:train.steps=5)")
    parser.add_argument("--resume", metavar="JSON", nargs="+", help="earlier quality_*.json files of the same setup: their finished "
                        "runs are kept, not rerun (a session cut by a device call's time limit continues in the next call)")
    parser.add_argument("--report", metavar="DIR", help="only (re)write DIR/quality.md from the JSON files there")
    args = parser.parse_args()
    if args.report:
        write_report(Path(args.report))
        return
    run_session(args)


def run_session(args: argparse.Namespace) -> None:
    from orthotune.recipes.runconfig import load_run_config

    start = time.time()
    deadline = start + args.deadline if args.deadline else math.inf
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.scratch)
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be at least 1, got {args.seeds}")
    seeds = tuple(range(args.seeds))
    session: dict[str, Any] = {"environment": environment(args), "tasks": {}}
    jobs: dict[str, dict[str, Any]] = {}
    budgets: dict[str, dict[str, Any]] = {}
    multipliers = lr_multipliers(Path(args.lr_from)) if args.lr_from else {}
    base_lrs = parse_base_lrs(args.lr, args.methods)
    given = parse_adapters(args.adapter, args.methods)
    if args.grow < 0:
        raise SystemExit(f"--grow must be 0 or more, got {args.grow}")
    groups: dict[tuple[str, str], dict[str, Any]] = {}  # (task, method) -> its sweep, grown while the session runs
    session["base_lrs"] = base_lrs or None
    session["lr_from"] = {"file": args.lr_from, "multipliers": multipliers} if args.lr_from else None
    rank = {m: i for i, m in enumerate(args.methods)}  # the order given is the order of priority
    tasks_rank = {t: i for i, t in enumerate(args.tasks)}
    for task in args.tasks:
        bench = BENCHES[task]
        extra = task_overrides(args.set, task)
        shapes = target_shapes(bench, extra)
        budgets[task] = {m: given_budget(m, shapes, given[m]) if m in given else match_budget(m, shapes) for m in args.methods}
        session["tasks"][task] = {"recipe": bench.recipe, "overrides": extra, "layers": len(shapes), "budgets": budgets[task],
                                  "sweeps": {}, "runs": {}}
        checkpoint = load_run_config(ROOT / bench.recipe, extra).model.get("checkpoint", "")
        pretrain = checkpoint.split(":", 1)[1] if checkpoint.startswith("pretrained:") else None
        if pretrain and f"pretrain:{pretrain}" not in jobs:
            from orthotune.recipes.pretrain import SPECS

            spec = dataclasses.replace(SPECS[pretrain], **({"steps": args.pretrain_steps} if args.pretrain_steps else {}))
            jobs[f"pretrain:{pretrain}"] = {"kind": "pretrain", "name": pretrain, "spec": dataclasses.asdict(spec), "deps": [], "prio": (0,)}
        deps = [f"pretrain:{pretrain}"] if pretrain else []
        for m in args.methods:
            if "error" in budgets[task][m]:
                continue
            base = base_lrs.get(m, base_lr(m, task)) * multipliers.get(m, 1.0)
            session["tasks"][task].setdefault("base_lrs", {})[m] = base
            group = {"task": task, "method": m, "lrs": [], "keys": [], "table": [], "grown": 0, "settled": not args.sweep,
                     "deps": deps, "extra": extra, "prio": (rank[m], tasks_rank[task])}
            groups[(task, m)] = group
            for lr in [base * f for f in SWEEP] if args.sweep else []:
                add_sweep_run(group, lr, jobs, prio=(2, rank[m], tasks_rank[task], lr))
            for seed in seeds:
                key = f"table:{task}:{m}:{seed}"
                group["table"].append(key)  # its sweep_keys/sweep_lrs are the group's lists: they grow with it
                jobs[key] = {"kind": "run", "task": task, "method": m, "seed": seed, "split": "test", "deps": deps + group["keys"],
                             "prio": (1, seed, rank[m], tasks_rank[task]), "base_lr": base, "extra": extra,
                             "sweep_keys": group["keys"], "sweep_lrs": group["lrs"]}

    tag = args.tag or "-".join(args.tasks)
    results: dict[str, dict[str, Any]] = {}
    for path in args.resume or []:  # runs are seeded: a later file's record of the same run is the same run
        results.update(resumed_runs(Path(path), session, jobs))
    if args.resume:
        session["resumed_from"] = {"file": args.resume[0] if len(args.resume) == 1 else args.resume, "runs": len(results)}
        print(f"{len(results)} finished runs kept from {', '.join(args.resume)}", flush=True)
    pending = {k: j for k, j in jobs.items() if k not in results}
    grow_sweeps(groups, jobs, pending, results, args.grow)
    durations: dict[str, list[float]] = {}
    ctx = mp.get_context("spawn")
    print(f"{len(jobs)} jobs on {args.workers} workers" + (f", deadline {args.deadline:.0f} s" if args.deadline else ""), flush=True)
    with cf.ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx, initializer=_init_worker, initargs=(args.threads,)) as pool:
        running: dict[cf.Future, str] = {}
        while pending or running:
            ready = sorted((k for k, j in pending.items() if all(d in results for d in j["deps"])), key=lambda k: pending[k]["prio"])
            for key in ready:
                if len(running) >= args.workers:
                    break
                job = pending.pop(key)
                if any("error" in results[d] for d in job["deps"] if d.startswith("pretrain:")):
                    results[key] = {"error": "its backbone failed to pretrain"}
                    continue
                if job["kind"] == "run":
                    bench = BENCHES[job["task"]]
                    extra = list(job["extra"]) + [f"model.checkpoint={results[d]['path']}" for d in job["deps"] if d.startswith("pretrain:")]
                    kwargs = budgets[job["task"]][job["method"]]["kwargs"]
                    if job["split"] == "test":
                        if sweep_cut(job["sweep_keys"], results):  # a rate chosen from part of the grid is not the table's
                            results[key] = {"error": "skipped: its learning-rate sweep was cut by the deadline"}
                            continue
                        job["lr"] = chosen_lr(job, results)
                        swept = seed_zero_from_sweep(job, results)
                        if swept is not None:
                            results[key] = swept
                            print(f"[{time.time() - start:6.1f} s] {key}: {swept.get('error') or format(swept['value'], '.4f')} "
                                  f"(the sweep's run at lr {job['lr']:.3g})", flush=True)
                            continue
                        folder = scratch / job["task"] / job["method"] / f"test-{job['seed']}"
                    else:
                        folder = scratch / job["task"] / job["method"] / f"val-lr{job['lr']:.3g}"
                        job["test_config"] = recipe_config(bench, bench.test, job["method"], kwargs, job["lr"], job["seed"], folder, extra)
                    job["config"] = recipe_config(bench, bench.test if job["split"] == "test" else bench.val, job["method"],
                                                  kwargs, job["lr"], job["seed"], folder, extra)
                estimate = statistics.mean(durations.get(job.get("task", ""), [args.first_estimate])) * 1.15
                if job["kind"] == "run" and time.time() + estimate > deadline:
                    results[key] = {"error": "skipped: not enough time left before the deadline"}
                    continue
                running[pool.submit(run_job, {k: v for k, v in job.items() if k not in ("deps", "prio")})] = key
            if not running:
                if pending and not ready:
                    for key in list(pending):  # their dependencies can no longer run
                        results[key] = {"error": "a job it depends on did not run"}
                        pending.pop(key)
                continue
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                key = running.pop(fut)
                results[key] = res = fut.result()
                job = jobs[key]
                if job["kind"] == "run" and "error" not in res:
                    durations.setdefault(job["task"], []).append(res["wall"])
                status = res.get("error") or (f"{res['value']:.4f}" if "value" in res else f"test {res.get('test')}")
                print(f"[{time.time() - start:6.1f} s] {key}: {status} ({res['wall']:.1f} s)", flush=True)
            for key in grow_sweeps(groups, jobs, pending, results, args.grow):
                print(f"[{time.time() - start:6.1f} s] {key}: added (the sweep's best was on its edge)", flush=True)
            save_session(session, jobs, results, out, tag, start)

    save_session(session, jobs, results, out, tag, start)
    print(f"wrote {out / f'quality_{tag}.json'} and {out / 'quality.md'} in {time.time() - start:.0f} s", flush=True)


def save_session(session: dict[str, Any], jobs: dict[str, dict[str, Any]], results: dict[str, dict[str, Any]], out: Path,
                 tag: str, start: float) -> None:
    """Write the session so far (every finished job) to quality_<tag>.json and refresh quality.md."""
    for task in session["tasks"].values():
        task["sweeps"], task["runs"] = {}, {}
    for key, job in jobs.items():
        if key not in results:
            continue
        res = results[key]
        if job["kind"] == "pretrain":
            session.setdefault("pretraining", {})[job["name"]] = res
            continue
        entry = {"key": key, "method": job["method"], "seed": job["seed"], "lr": job.get("lr"), **res}
        bucket = "sweeps" if key.startswith("sweep:") else "runs"
        session["tasks"][job["task"]][bucket].setdefault(job["method"], []).append(entry)
    session["wall_seconds"] = time.time() - start
    session["complete"] = all(k in results for k in jobs)
    (out / f"quality_{tag}.json").write_text(json.dumps(session, indent=1) + "\n")
    write_report(out)


def resumed_runs(path: Path, session: dict[str, Any], jobs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The finished fine-tuning runs of an earlier session, by job key; its setup (budgets, base rates) must be this one's."""
    old = json.loads(path.read_text())
    kept: dict[str, dict[str, Any]] = {}
    for task, t in session["tasks"].items():
        before = old["tasks"].get(task)
        if before is None or BENCHES[task].pretrain:  # a backbone is pretrained anew each session: never mix two
            continue
        setups = [("overrides", before.get("overrides"), t.get("overrides"))]
        setups += [(f"{what} of {m}", before[what][m], t[what][m]) for what in ("budgets", "base_lrs") for m in t[what]
                   if m in (before.get(what) or {})]
        for what, old_value, new_value in setups:
            if old_value != new_value:
                raise SystemExit(f"--resume {path}: task {task!r} ran with other {what} ({old_value} vs {new_value}); "
                                 "resume only a session of the same setup")
        for bucket in ("sweeps", "runs"):
            for m, entries in before[bucket].items():
                for e in entries:  # a grown sweep's extra runs are not jobs yet: grow_sweeps finds them here
                    if "value" in e and (e.get("key") in jobs or (bucket == "sweeps" and m in t["budgets"])):
                        kept[e["key"]] = e
    # a table run whose rate was chosen from an incomplete sweep is run again once the sweep is complete
    return {k: e for k, e in kept.items() if k not in jobs or all(d in kept for d in jobs[k].get("sweep_keys", []))}


def lr_multipliers(path: Path) -> dict[str, float]:
    """Per method, the median (over the tasks of an earlier session) of tuned lr / that session's base lr."""
    session = json.loads(path.read_text())
    found: dict[str, list[float]] = {}
    for task, t in session["tasks"].items():
        for m, runs in t["runs"].items():
            base = (t.get("base_lrs") or {}).get(m)
            if base is None:  # sessions before the base rates were recorded: their centres are unknown here
                continue
            chosen = {r["lr"] for r in runs if "value" in r}
            if len(chosen) == 1:
                found.setdefault(m, []).append(chosen.pop() / base)
    return {m: statistics.median_low(v) for m, v in found.items()}


def method_item(flag: str, what: str, item: str, methods: list[str]) -> tuple[str, str]:
    """``METHOD=VALUE`` of a per-method flag as (method, value); anything else, or a method not run, stops the session."""
    method, sep, value = item.partition("=")
    if not sep or method not in methods:
        raise SystemExit(f"{flag} {item!r}: expected METHOD={what} with METHOD one of the methods run ({', '.join(methods)})")
    return method, value


def parse_base_lrs(items: list[str], methods: list[str]) -> dict[str, float]:
    """``--lr METHOD=LR`` items as {method: lr}; a method not run, or a rate that is not a positive number, stops the session."""
    out: dict[str, float] = {}
    for item in items:
        method, value = method_item("--lr", "LR", item, methods)
        try:
            out[method] = float(value)
        except ValueError:
            raise SystemExit(f"--lr {item!r}: {value!r} is not a number") from None
        if not out[method] > 0:
            raise SystemExit(f"--lr {item!r}: the rate must be positive")
    return out


def parse_adapters(items: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``--adapter METHOD=JSON`` items as {method: hyperparameters}; a method not run, or JSON that is not an object, stops the session."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        method, value = method_item("--adapter", "JSON", item, methods)
        try:
            out[method] = json.loads(value)
        except json.JSONDecodeError as err:
            raise SystemExit(f"--adapter {item!r}: {value!r} is not JSON ({err})") from None
        if not isinstance(out[method], dict):
            raise SystemExit(f"--adapter {item!r}: expected a JSON object such as {{\"rank\": 8}}")
    return out


def task_overrides(items: list[str], task: str) -> list[str]:
    """The ``--set`` items for ``task``: unprefixed ones, and ``task:key=value`` ones without the prefix."""
    out = []
    for item in items:
        key = item.split("=", 1)[0]
        if ":" not in key:
            out.append(item)
        elif key.split(":", 1)[0] == task:
            out.append(item.split(":", 1)[1])
    return out


def best_rate(scored: dict[float, float], higher: bool) -> float | None:
    """The rate with the best finite score (the lower rate on a tie): the table's rule, in its runs and its report."""
    finite = {lr: v for lr, v in scored.items() if math.isfinite(v)}
    if not finite:
        return None
    return max(sorted(finite), key=lambda lr: finite[lr] if higher else -finite[lr])  # max keeps the first of a tie


def best_swept(keys: list[str], lrs: list[float], task: str, results: dict[str, dict[str, Any]]) -> float | None:
    """The best learning rate on validation among finished sweep runs with a finite score (the lower one on ties)."""
    scored = {lr: results[k]["value"] for k, lr in zip(keys, lrs) if "value" in results.get(k, {})}
    return best_rate(scored, BENCHES[task].higher_is_better)


def sweep_cut(keys: list[str], results: dict[str, dict[str, Any]]) -> bool:
    """Whether a run of this sweep was skipped for the deadline (its grid is incomplete, unlike a run that failed)."""
    return any(results.get(k, {}).get("error", "").startswith("skipped") for k in keys)


def chosen_lr(job: dict[str, Any], results: dict[str, dict[str, Any]]) -> float:
    """The sweep's best learning rate on validation (the lower one on ties); the base rate without a sweep."""
    best = best_swept(job["sweep_keys"], job["sweep_lrs"], job["task"], results)
    return job["base_lr"] if best is None else best


def add_sweep_run(group: dict[str, Any], lr: float, jobs: dict[str, dict[str, Any]], prio: tuple) -> str:
    """A sweep run of ``group`` at ``lr`` (seed 0, validation), appended to the group's grid; returns its key."""
    key = f"sweep:{group['task']}:{group['method']}:{lr:.3g}"
    jobs[key] = {"kind": "run", "task": group["task"], "method": group["method"], "lr": lr, "seed": 0, "split": "val",
                 "deps": group["deps"], "prio": prio, "extra": group["extra"]}
    group["keys"].append(key)
    group["lrs"].append(lr)
    return key


def grow_sweeps(groups: dict[tuple[str, str], dict[str, Any]], jobs: dict[str, dict[str, Any]], pending: dict[str, dict[str, Any]],
                results: dict[str, dict[str, Any]], limit: int) -> list[str]:
    """Grow each finished sweep whose best rate lies on its grid's edge by one 3x step past it (at most ``limit`` times).

    The table runs of a grown sweep wait for the new run (and run again if a resumed session had them).
    Returns the keys of the sweep runs added.
    """
    from orthotune.recipes.lr_search import next_factor

    added = []
    for group in groups.values():
        sign = -1.0 if BENCHES[group["task"]].higher_is_better else 1.0
        while not group["settled"] and all(k in results for k in group["keys"]):
            if sweep_cut(group["keys"], results):  # no edge can be judged on a cut grid; its table runs are skipped
                group["settled"] = True
                break
            # --lr auto's rule on the rates themselves; sorted, so a tie goes to the lower rate (as chosen_lr)
            values = [results[k].get("value", math.nan) for k in group["keys"]]
            trials = sorted(({"factor": lr, "score": sign * v if math.isfinite(v) else None} for lr, v in zip(group["lrs"], values)),
                            key=lambda t: t["factor"])
            beyond = next_factor(trials)
            if beyond is None or group["grown"] >= limit:
                group["settled"] = True
                break
            group["grown"] += 1
            key = add_sweep_run(group, beyond, jobs, prio=(1, -1, *group["prio"]))
            new = key not in results  # a resumed session that grew the same way ran it already
            if new:
                pending[key] = jobs[key]
                added.append(key)
            for table_key in group["table"]:
                jobs[table_key]["deps"].append(key)
                if new and table_key in results:  # kept from a resumed session whose grid lacked this rate: run again
                    del results[table_key]
                    pending[table_key] = jobs[table_key]
    return added


def seed_zero_from_sweep(job: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Seed 0 of the table when the sweep ran it: the chosen sweep run's test score, as a table record (None otherwise)."""
    if job["seed"] != 0 or job["lr"] not in job["sweep_lrs"]:
        return None
    sweep_key = job["sweep_keys"][job["sweep_lrs"].index(job["lr"])]
    res = results.get(sweep_key, {})
    if "test_eval" not in res:
        return None
    metric = BENCHES[job["task"]].metric
    return {"value": res["test_eval"][metric], "final": res["test_eval"], "before": None, "parameters": res["parameters"],
            "train_seconds": res["train_seconds"], "wall": 0.0, "from_sweep": sweep_key}


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "cpu_count": os.cpu_count(),
           "workers": args.workers, "threads_per_worker": args.threads, "deadline_s": args.deadline, "sweep": args.sweep,
           "grow": args.grow,
           "extra_overrides": args.set}
    try:
        from orthotune.recipes.compat import import_timm

        env["timm"] = import_timm().__version__
    except ImportError:
        env["timm"] = None
    return env


# --------------------------------------------------------------------------- report
TITLES = {"text": "Text classification: all-MiniLM-L6-v2 on BANKING77 (test accuracy)",
          "lm": "Causal LM: SmolLM2-135M-Instruct on reasoning-gym basic_arithmetic (test exact match)",
          "vit": "Image classification: ViT (pretrained on Fashion-MNIST) -> digits, 20-shot (test accuracy)",
          "dit": "Diffusion: DiT (pretrained on Fashion-MNIST) -> digits (held-out denoising loss, lower is better)"}


def _fmt(values: list[float], pct: bool) -> str:
    if not values:
        return "-"
    scale = 100.0 if pct else 1.0
    mean = statistics.mean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    digits = 1 if pct else 4
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={len(values)})"


def merge_tasks(sessions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task, the runs its table shows: the newest session that ran the task defines the table.

    For a task with no pretrained backbone, older sessions with the same recipe and overrides fill in
    the (method, seed) runs the newer ones lack, for methods whose matched configuration and learning
    rate are the same (runs are seeded: on the H100 a rerun of a seed gave the same number). A backbone is pretrained
    anew in each session, so such tasks are never merged across sessions.
    """
    merged: dict[str, dict[str, Any]] = {}
    for s in sorted(sessions, key=lambda s: s["environment"]["date"], reverse=True):
        for task, t in s["tasks"].items():
            swept = s["environment"].get("sweep", True)
            t = {**t, "runs": {m: [{**r, "swept": swept} for r in rs] for m, rs in t["runs"].items()}}
            if task not in merged:
                merged[task] = {**t, "budgets": dict(t["budgets"]), "runs": {m: list(r) for m, r in t["runs"].items()},
                                "device": s["environment"]["device"], "dates": [s["environment"]["date"]]}
                continue
            table = merged[task]
            if BENCHES[task].pretrain or (t["recipe"], t.get("overrides")) != (table["recipe"], table.get("overrides")):
                continue
            used = False
            for m, budget in t["budgets"].items():
                if table["budgets"].setdefault(m, budget) != budget:
                    continue
                runs = table["runs"].setdefault(m, [])
                have = {r.get("seed") for r in runs if "value" in r}
                lrs = {r.get("lr") for r in runs if "value" in r}  # a tuned rate differs per session: never mix rates
                new = [r for r in t["runs"].get(m, []) if r.get("seed") not in have and ("value" in r or not runs)
                       and (not lrs or r.get("lr") in lrs)]
                runs += new
                used |= any("value" in r for r in new)
                for what in ("sweeps", "base_lrs"):  # the sweep that chose the rate of the runs taken
                    if m in (t.get(what) or {}) and m not in (table.get(what) or {}):
                        table[what] = {**(table.get(what) or {}), m: t[what][m]}
            if used:
                table["dates"].append(s["environment"]["date"])
    for table in merged.values():  # a seed with a result drops that seed's skipped or failed attempts
        for m, runs in table["runs"].items():
            done = {r.get("seed") for r in runs if "value" in r}
            table["runs"][m] = sorted((r for r in runs if "value" in r or r.get("seed") not in done or r.get("seed") is None),
                                      key=lambda r: (r.get("seed") is None, r.get("seed") or 0))
        table["budgets"] = {m: table["budgets"][m] for m in sorted(table["budgets"], key=lambda m: list(METHODS).index(m))}
    return merged


def default_vs_best(table: dict[str, Any], method: str, pct: bool) -> str:
    """Seed 0's validation score at the method's default rate (the sweep's centre) and at the best rate swept."""
    base = (table.get("base_lrs") or {}).get(method)
    scored = {r["lr"]: r["value"] for r in (table.get("sweeps") or {}).get(method, []) if "value" in r}
    if base is None or not scored:
        return "-"
    at_default = next((v for lr, v in scored.items() if math.isclose(lr, base, rel_tol=1e-9)), None)
    best_lr = best_rate(scored, higher=pct)  # the rate the table trains at (chosen_lr's rule)
    scale, digits = (100.0, 1) if pct else (1.0, 4)
    shown = "-" if at_default is None else f"{at_default * scale:.{digits}f}"
    if best_lr is None:
        return f"{shown} / -"
    return f"{shown} / {scored[best_lr] * scale:.{digits}f} (x{best_lr / base:.2g})"


def write_report(out: Path) -> Path:
    """quality.md: one table per task from every quality_*.json in ``out`` (see :func:`merge_tasks`)."""
    sessions = [json.loads(p.read_text()) for p in sorted(out.glob("quality_*.json"))]
    lines = ["# Evaluation table", "",
             "Generated by `benchmarks/quality.py` from the JSON files beside this one (every run's numbers are there).", ""]
    for s in sorted(sessions, key=lambda s: s["environment"]["date"]):
        env = s["environment"]
        grown = f", grown 3x past a winning edge at most {env['grow']} times" if env.get("grow") else ""
        lrs = (f"learning rate tuned per method on validation (base x 1/3, 1, 3{grown}; seed 0)" if env.get("sweep", True)
               else "no learning-rate sweep: each method at one base rate (its runs' lr)")
        lines.append(f"- session {', '.join(s['tasks'])}: {env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
                     f"timm {env.get('timm')}, {env['date']}, {env['workers']} concurrent runs, {s['wall_seconds']:.0f} s; {lrs}")
        for name, res in (s.get("pretraining") or {}).items():
            if "error" in res:
                lines.append(f"  - pretraining {name}: failed ({res['error']})")
            else:
                lines.append(f"  - pretraining {name}: Fashion-MNIST test {res['test']}, {res['seconds']:.0f} s")
    tables = merge_tasks(sessions)
    for task, t in sorted(tables.items(), key=lambda kv: list(BENCHES).index(kv[0])):
        pct = BENCHES[task].higher_is_better
        second = BENCHES[task].secondary
        where = t["device"]
        sources = "; runs of the session of " + " and ".join(t["dates"])
        lines += ["", f"## {TITLES.get(task, task)} [{where}]", "",
                  f"Recipe `{t['recipe']}`" + (f" with `{' '.join(t['overrides'])}`" if t.get("overrides") else "")
                  + f"; {t['layers']} adapted layers; budget = LoRA r=8 = "
                  f"{next(iter(t['budgets'].values()))['budget']:,} adapter parameters{sources}.", "",
                  "| method | hyperparameters | adapter params (vs LoRA) | lr | step 0 | test | train s |"
                  + (f" test {second} |" if second else "") + " val at default lr / swept best |",
                  "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if second else "") + "---:|"]
        for m, b in t["budgets"].items():
            if "error" in b:
                lines.append(f"| {m} | {b['error']} | | | | | |")
                continue
            runs = t["runs"].get(m, [])
            ok = [r for r in runs if "value" in r]
            params = ok[0]["parameters"]["adapter"] if ok else b["params"]
            kwargs = ", ".join(f"{k}={v}" for k, v in b["kwargs"].items()) or "all weights"
            lr = f"{ok[0]['lr']:.2g}" + (" (swept)" if ok[0].get("swept") else "") if ok else "-"
            before = [r["before"][BENCHES[task].metric] for r in ok if r.get("before")]
            skipped = [r for r in runs if r.get("error", "").startswith("skipped")]
            errors = sorted({r["error"] for r in runs if "error" in r and r not in skipped})
            test = _fmt([r["value"] for r in ok], pct)
            if skipped:
                test += f" ({len(skipped)} not run: out of time)"
            if errors:
                test += f" ({len(runs) - len(ok) - len(skipped)} failed: {errors[0][:80]})"
            secs = f"{statistics.mean(r['train_seconds'] for r in ok):.1f}" if ok else "-"
            ratio = f" ({100 * params / b['budget']:.0f}%)" if METHODS[m].method != "full" else ""
            row = (f"| {m} | {kwargs} | {params:,}{ratio} | {lr} | {_fmt(before, pct) if before else '-'} | {test} | {secs} |"
                   if params is not None else f"| {m} | {kwargs} | - | {lr} | - | {test} | {secs} |")
            if second:
                row += f" {_fmt([r['final'][second] for r in ok if second in r.get('final', {})], False)} |"
            row += f" {default_vs_best(t, m, pct)} |"
            lines.append(row)
    path = out / "quality.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    main()
