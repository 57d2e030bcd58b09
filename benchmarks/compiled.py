"""The compiled table of issue 19: every method's training step under ``torch.compile(model)``, in one process.

    python benchmarks/compiled.py --out DIR                                  # main set (H200: ~7 min)
    python benchmarks/compiled.py --out DIR --modes default,max-autotune-no-cudagraphs,reduce-overhead --only loco,oft
    python benchmarks/compiled.py --out DIR --hidden 4096 --layers 2         # the width variants (and 8192)
    python benchmarks/compiled.py --out DIR --seq 4096 --batch 1             # the sequence variant
    python benchmarks/compiled.py --out DIR --sections infer                 # compiled prefill and decoding (~3 min)
    python benchmarks/compiled.py --device cpu --smoke --backend aot_eager --out /tmp/c   # CPU check of the harness

Model and step as ``benchmarks/efficiency.py`` (random Llama, bf16, batch 4 x 1024, all 7 projections,
AdamW), built through the public API only (``orthotune.get_model`` + configs, ``torch.compile(model)``),
so the script measures whatever the library's per-step mechanism is. Every compiled row is compiled
afresh after ``torch._dynamo.reset()``; its first step's seconds (compilation included) and dynamo's
counters (graphs, graph breaks, recompilations) are recorded. Ratios are to **peft LoRA r16 compiled
(default mode)** of the same run; eager rows also to peft LoRA eager; peak memory to peft LoRA compiled.

``mode="reduce-overhead"`` rows are also what ``orthotune.GraphedStep`` runs: its former hand-made capture of the
eager step (optimiser included) lost to them on every row (``results/compiled/call6_modes/``, measured with the
``--graphed`` rows this script had then), so it now wraps that mode.

Sections: ``train`` (the table above) and ``infer`` (no grad, eval mode, compiled: prefill of batch x seq,
and the cost per decoded token with a static KV cache, for the base, merged and unmerged adapters;
targets: unmerged <= 1.10x the compiled base, merged 1.00x). Writes ``compiled.json`` and
``compiled.md`` under ``--out`` after every row (a run cut short keeps what it measured) and prints the
table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import efficiency as eff  # noqa: E402

import orthotune  # noqa: E402
from orthotune.methods.registry import METHODS  # noqa: E402
from orthotune.ops import skew  # noqa: E402

LORA, FLOOR = "peft LoRA r16", "floor (frozen base, input grads)"


def specs() -> list[eff.Spec]:
    """The rows' methods: the floor, peft's LoRA r16 and OFT b32, every orthotune method at its usual configuration."""
    ot = [
        ("orthotune LoRA r16", "LoRAConfig", dict(r=16, lora_alpha=32), None),
        ("orthotune PiSSA r16", "PiSSAConfig", dict(r=16, lora_alpha=16), "pissa"),
        ("orthotune PiSSA r16 residual", "PiSSAConfig", dict(r=16, lora_alpha=16, residual_base=True), "pissa"),
        ("orthotune LoCA n1000", "LoCAConfig", dict(n_frequency=1000), "loca"),
        ("orthotune FourierFT n1000", "FourierFTConfig", dict(n_frequency=1000), "fourierft"),
        ("orthotune LoCO k3 r6 exact", "LoCOConfig", dict(chain_length=3, rank=6), "loco"),
        ("orthotune LoCO k3 r6 approx", "LoCOConfig", dict(chain_length=3, rank=6, mode="approx"), "loco"),
        ("orthotune OFT b32", "OFTConfig", dict(r=0, oft_block_size=32), "oft"),
        ("orthotune BOFT b8 m2", "BOFTConfig", dict(boft_block_size=8, boft_n_butterfly_factor=2), "boft"),
        ("orthotune HRA r8", "HRAConfig", dict(r=8), "hra"),
        ("orthotune GOFT", "GOFTConfig", {}, "goft"),
        ("orthotune GOFT weight", "GOFTConfig", dict(compute="weight"), "goft"),
        ("orthotune BOFT b8 m2 weight", "BOFTConfig", dict(boft_block_size=8, boft_n_butterfly_factor=2, compute="weight"), "boft"),
        ("orthotune PSOFT r32", "PSOFTConfig", dict(r=32), "psoft"),
        ("orthotune LOFT principal r16", "LOFTConfig", dict(support="principal", r=16), "loft"),
    ]
    return [
        eff.Spec(FLOOR, "reference", None),
        eff.Spec(LORA, "peft", eff._peft("LoraConfig", r=16, lora_alpha=32)),
        eff.Spec("peft OFT b32", "peft", eff._peft("OFTConfig", r=0, oft_block_size=32)),
        *(eff.Spec(name, "orthotune", eff._ot(cfg, **kw), needs=needs) for name, cfg, kw, needs in ot),
    ]


@dataclasses.dataclass
class Row:
    spec: eff.Spec
    how: str  # "eager" or a torch.compile mode ("default", "reduce-overhead", ...)
    squarings: int | None = None  # LoCO's fixed squarings under CUDA-graph capture (None: the library's)

    @property
    def name(self) -> str:
        return f"{self.spec.name}, {'compiled' if self.compiled else self.how}" + (
            f" [{self.how}]" if self.compiled and self.how != "default" else "") + (
            f" [squarings {self.squarings}]" if self.squarings is not None else "")

    @property
    def compiled(self) -> bool:
        return self.how != "eager"


def rows_in_order(chosen: list[eff.Spec], modes: list[str], every_default: bool = True) -> list[Row]:
    """The yardstick first, then every compiled row, then the other modes, then eager rows: a run cut short
    by its budget keeps the rows that decide. ``every_default=False``: only the yardstick and the floor run in
    the default mode (``--modes`` named other modes only)."""
    first = [s for s in chosen if s.name in (LORA, FLOOR)]
    rest = [s for s in chosen if s not in first]
    rows = [Row(s, modes[0]) for s in first + (rest if every_default else [])]
    rows += [Row(s, m) for m in modes[1:] for s in first + rest]
    rows += [Row(s, "eager") for s in first + rest]
    return rows


def _compile(model: nn.Module, mode: str, backend: str, fullgraph: bool) -> Callable[..., Any]:
    kw: dict[str, Any] = dict(backend=backend, fullgraph=fullgraph)
    if mode != "default":
        kw["mode"] = mode
    return torch.compile(model, **kw)


def train_row(row: Row, shape: eff.Shape, args: argparse.Namespace) -> dict[str, Any]:
    """One row: a freshly built model, its first step timed (compilation included), then the median step."""
    from torch._dynamo.utils import counters

    if row.squarings is not None:  # the bound is read while the graphs are recorded, in the first steps
        previous, skew.CAPTURED_SQUARINGS = skew.CAPTURED_SQUARINGS, row.squarings
        try:
            return dict(train_row(dataclasses.replace(row, squarings=None), shape, args), name=row.name, squarings=row.squarings)
        finally:
            skew.CAPTURED_SQUARINGS = previous
    device = args.device
    torch._dynamo.reset()
    counters.clear()
    eff._reset(device)
    resident = torch.cuda.memory_allocated() if device == "cuda" else 0
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), device=device, generator=torch.Generator(device).manual_seed(1))
    model = eff.build(row.spec, shape, device, ids)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    call = _compile(model, row.how, args.backend, args.fullgraph) if row.compiled else model
    step = eff.eager_step(call, model.get_input_embeddings(), ids, params, floor=row.spec.build is None)
    timer = eff.Timer(device)
    t0 = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    times = [timer(step) for _ in range(args.warmup + args.steps)][args.warmup:]
    peak = (torch.cuda.max_memory_allocated() - resident) / 2**30 if device == "cuda" else None
    median = statistics.median(times)
    out = dict(name=row.name, method=row.spec.name, library=row.spec.library, how=row.how, step_ms=times, median_ms=median,
               peak_gib=peak, trainable=sum(p.numel() for p in params), first_step_s=first_s,
               compile_s=max(0.0, first_s - median / 1e3) if row.compiled else None, **eff.dynamo_counts())
    del params, step
    eff._reset(device)
    return out


def ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios to peft LoRA r16 compiled (default mode) and to the compiled floor; eager rows also to peft LoRA eager."""
    by = {(r["method"], r["how"]): r for r in rows if r.get("median_ms")}
    lora, floor, lora_eager = by.get((LORA, "default")), by.get((FLOOR, "default")), by.get((LORA, "eager"))

    def ratio(a: dict[str, Any], b: dict[str, Any] | None, key: str) -> float | None:
        return a[key] / b[key] if a.get(key) and b and b.get(key) else None

    for r in rows:
        r["x_lora_compiled"], r["x_floor_compiled"] = ratio(r, lora, "median_ms"), ratio(r, floor, "median_ms")
        r["x_lora_eager"] = ratio(r, lora_eager, "median_ms")
        r["mem_x_lora_compiled"] = ratio(r, lora, "peak_gib")


# ---------------------------------------------------------------------------------------------- inference
def infer_variants(shape: eff.Shape, device: str) -> list[tuple[str, Callable[[], nn.Module]]]:
    """The base, a merged adapter and unmerged adapters of the methods whose inference path differs."""

    def adapted(cfg: orthotune.AdapterConfig, merge: bool) -> nn.Module:
        model = orthotune.get_model(eff.make_model(shape, device), cfg)
        with torch.no_grad():  # move away from the identity, as after training
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p), alpha=1e-3)
        return model.merge_and_unload() if merge else model

    t = eff.TARGETS
    configs = [("LoCO k3 r6", lambda: orthotune.LoCOConfig(target_modules=t, chain_length=3, rank=6), "loco"),
               ("LoRA r16", lambda: orthotune.LoRAConfig(target_modules=t, r=16, lora_alpha=32), None),
               ("HRA r8", lambda: orthotune.HRAConfig(target_modules=t, r=8), "hra"),
               ("OFT b32", lambda: orthotune.OFTConfig(target_modules=t, r=0, oft_block_size=32), "oft")]
    out: list[tuple[str, Callable[[], nn.Module]]] = [("base model", lambda: eff.make_model(shape, device))]
    out.append(("orthotune LoCO k3 r6, merged", lambda: adapted(configs[0][1](), True)))
    out += [(f"orthotune {name}, unmerged", lambda c=cfg: adapted(c(), False)) for name, cfg, needs in configs
            if needs is None or needs in METHODS]
    return out


@torch.no_grad()
def infer_row(name: str, make: Callable[[], nn.Module], shape: eff.Shape, args: argparse.Namespace) -> dict[str, Any]:
    """Compiled prefill (batch x seq) and compiled decoding steps (one token, static KV cache) of one model."""
    from transformers import StaticCache

    from torch._dynamo.utils import counters

    device, timer = args.device, eff.Timer(args.device)
    torch._dynamo.reset()
    counters.clear()
    eff._reset(device)
    model = make().eval()
    compiled = _compile(model, args.infer_mode, args.backend, args.fullgraph)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), device=device, generator=torch.Generator(device).manual_seed(2))
    t0 = time.perf_counter()
    compiled(input_ids=ids, use_cache=False)
    first_s = time.perf_counter() - t0
    prefill = [timer(lambda: compiled(input_ids=ids, use_cache=False)) for _ in range(args.warmup + args.steps)][args.warmup:]
    prompt, tokens = ids[:, :128], args.decode_tokens
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + tokens)
    model(input_ids=prompt, past_key_values=cache, use_cache=True, cache_position=torch.arange(prompt.shape[1], device=device))
    token = prompt[:, -1:].clone()
    position = torch.tensor([prompt.shape[1]], device=device)

    def decode() -> None:  # `tokens` steps from the prompt's end (the token fixed: the step's cost, not sampling's)
        position.fill_(prompt.shape[1])
        for layer in cache.layers:  # each static layer counts its own writes (transformers >= 5)
            layer.cumulative_length.fill_(prompt.shape[1])
        for _ in range(tokens):
            compiled(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True)
            position.add_(1)

    decode_ms = [timer(decode) / tokens for _ in range(args.warmup + 3)][args.warmup:]
    out = dict(name=name, prefill_ms=prefill, prefill_median_ms=statistics.median(prefill), decode_ms=decode_ms,
               decode_median_ms=statistics.median(decode_ms), first_call_s=first_s, **eff.dynamo_counts())
    del model, compiled, cache
    eff._reset(device)
    return out


def infer_ratios(rows: list[dict[str, Any]]) -> None:
    base = next((r for r in rows if r["name"] == "base model" and r.get("prefill_median_ms")), None)
    for r in rows:
        for k in ("prefill", "decode"):
            v = r.get(f"{k}_median_ms")
            r[f"{k}_x_base"] = v / base[f"{k}_median_ms"] if base and v else None


# ---------------------------------------------------------------------------------------------- report
def markdown(env: dict[str, Any], shape: eff.Shape, res: dict[str, Any]) -> str:
    f, a = eff._f, res["args"]
    lines = [
        "# Compiled training step (issue 19)", "",
        f"{env.get('gpu', 'cpu')}, driver {env.get('driver')}, CUDA {env.get('cuda')}; torch {env['torch']}, triton "
        f"{env.get('triton')}, transformers {env['transformers']}, peft {env.get('peft')}; orthotune {env['orthotune']} "
        f"({env.get('commit')}); {env['date']}.", "",
        f"Random Llama {shape.layers} x {shape.hidden} (intermediate {shape.intermediate}), bf16, batch {shape.batch} x "
        f"{shape.seq}, all 7 projections, AdamW. torch.compile(model, backend={a['backend']!r}, fullgraph={a['fullgraph']}), "
        f"each row compiled afresh; median of {a['steps']} steps after {a['warmup']} (the first step, compilation "
        "included, is timed apart). Ratios to peft LoRA r16 compiled (default mode) of this run.", "",
    ]
    if res.get("train"):
        lines += ["| row | ms | x peft LoRA compiled | x compiled floor | x peft LoRA eager | peak GiB | mem x peft LoRA compiled "
                  "| trainable | compile s | graphs | breaks | recompiles |", "|" + "---|" * 12]
        for r in res["train"]:
            if r.get("error"):
                lines.append(f"| {r['name']} | {r['error'][:160]} |" + " |" * 10)
                continue
            lines.append(
                f"| {r['name']} | {f(r['median_ms'], '{:.1f}')} | {f(r.get('x_lora_compiled'))} | {f(r.get('x_floor_compiled'))} | "
                f"{f(r.get('x_lora_eager'))} | {f(r.get('peak_gib'))} | {f(r.get('mem_x_lora_compiled'))} | {r['trainable']:,} | "
                f"{f(r.get('compile_s'), '{:.0f}')} | {r['graphs']} | {r['graph_breaks']} | {r['recompiles']} |")
        lines.append("")
    if res.get("infer"):
        lines += [f"## Inference, compiled ({a['infer_mode']} mode, no grad)", "",
                  f"| model | prefill {shape.batch}x{shape.seq} ms | x base | decode ms/token (batch {shape.batch}) | x base "
                  "| first call s | graphs | breaks | recompiles |", "|" + "---|" * 9]
        for r in res["infer"]:
            if r.get("error"):
                lines.append(f"| {r['name']} | {r['error'][:160]} |" + " |" * 7)
                continue
            lines.append(f"| {r['name']} | {f(r['prefill_median_ms'])} | {f(r.get('prefill_x_base'), '{:.3f}')} | "
                         f"{f(r['decode_median_ms'], '{:.3f}')} | {f(r.get('decode_x_base'), '{:.3f}')} | "
                         f"{f(r['first_call_s'], '{:.0f}')} | {r['graphs']} | {r['graph_breaks']} | {r['recompiles']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sections", default="train", help="train and/or infer (comma-separated)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager or eager for a CPU check)")
    ap.add_argument("--modes", default="default", help="comma-separated torch.compile modes for the compiled rows "
                    "(default, max-autotune-no-cudagraphs, reduce-overhead); the yardstick is default: without it in the list "
                    "only peft LoRA and the floor run in the default mode")
    ap.add_argument("--no-eager", dest="eager", action="store_false", help="leave out the eager rows")
    ap.add_argument("--no-fullgraph", dest="fullgraph", action="store_false", help="allow graph breaks (counted)")
    ap.add_argument("--only", default="", help="comma-separated substrings of method names (the floor and peft LoRA always run)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--infer-mode", default="default", help="torch.compile mode of the inference rows")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--captured-squarings", default="", help="comma-separated bounds: extra reduce-overhead rows of LoCO "
                    f"exact with orthotune.ops.skew.CAPTURED_SQUARINGS set to each (the library's: {skew.CAPTURED_SQUARINGS})")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds: no new row starts after this (it is listed as not run)")
    ap.add_argument("--smoke", action="store_true", help="a tiny model, 1 warm-up and 2 steps (CPU check of the harness)")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    every_default = "default" in modes
    if not every_default:
        modes.insert(0, "default")  # the yardstick's mode
    if args.smoke:
        shape = eff.Shape(hidden=64, intermediate=128, layers=1, heads=4, vocab=128, batch=2, seq=16)
        args.warmup, args.steps, args.decode_tokens = 1, 2, 2
    elif args.hidden != 2048:
        shape = dataclasses.replace(eff.Shape.scaled(args.hidden, args.layers), batch=args.batch, seq=args.seq)
    else:
        shape = eff.Shape(layers=args.layers, batch=args.batch, seq=args.seq)
    if args.device != "cuda" and ("reduce-overhead" in modes or args.captured_squarings):
        raise SystemExit("mode reduce-overhead (and --captured-squarings) needs CUDA (it records CUDA graphs); leave it out on the CPU")
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    env = eff.environment(args.device)
    print(json.dumps(env), flush=True)
    res: dict[str, Any] = dict(env=env, shape=vars(shape), args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    sections = set(args.sections.split(","))
    keep = [k.strip().lower() for k in args.only.split(",") if k.strip()]
    chosen = [s for s in specs() if s.name in (LORA, FLOOR) or not keep or any(k in s.name.lower() for k in keep)]
    skipped = [s.name for s in chosen if s.needs and s.needs not in METHODS]
    chosen = [s for s in chosen if s.name not in skipped]
    res["skipped"] = [f"{n}: method not registered on this branch" for n in skipped]

    def save() -> None:
        (args.out / "compiled.json").write_text(json.dumps(res, indent=1, default=str))
        (args.out / "compiled.md").write_text(markdown(env, shape, res))

    def run(rows: list[Any], name: Callable[[Any], str], fn: Callable[[Any], dict[str, Any]], key: str,
            base: Callable[[Any], dict[str, Any]], after: Callable[[list[dict[str, Any]]], None]) -> None:
        res[key] = []
        for row in rows:
            if time.perf_counter() - start > args.budget:
                res[key].append(dict(base(row), error=f"not run: past the {args.budget:.0f} s budget"))
                continue
            try:
                r = fn(row)
                print(f"[{time.perf_counter() - start:.0f}s] {r['name']}: {r.get('median_ms', r.get('prefill_median_ms')):.1f} ms, "
                      f"first call {r.get('first_step_s', r.get('first_call_s')):.1f} s, graphs {r['graphs']}, "
                      f"breaks {r['graph_breaks']}, recompiles {r['recompiles']}", flush=True)
            except Exception as err:  # one broken row must not sink the run
                traceback.print_exc()
                r = dict(base(row), error=f"{type(err).__name__}: {err}")
                eff._reset(args.device)
            res[key].append(r)
            after(res[key])
            save()

    if "train" in sections:
        rows = [r for r in rows_in_order(chosen, modes, every_default) if args.eager or r.how != "eager"]
        loco = [s for s in specs() if s.name == "orthotune LoCO k3 r6 exact"]
        extra = [Row(s, "reduce-overhead", int(n)) for n in args.captured_squarings.split(",") if n.strip() for s in loco]
        rows = rows[:2] + extra + rows[2:]  # after the yardstick and the floor
        run(rows, lambda r: r.name, lambda r: train_row(r, shape, args), "train",
            lambda r: dict(name=r.name, method=r.spec.name, library=r.spec.library, how=r.how), ratios)
    if "infer" in sections:
        run(infer_variants(shape, args.device), lambda v: v[0], lambda v: infer_row(v[0], v[1], shape, args), "infer",
            lambda v: dict(name=v[0]), infer_ratios)
    res["total_s"] = time.perf_counter() - start
    save()
    print(markdown(env, shape, res))
    return res


if __name__ == "__main__":
    main()
