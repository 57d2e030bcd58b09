"""Where a compiled training step's time goes for orthotune's rotations (issue 19).

    python benchmarks/compile_profile.py --out DIR [--layers 4] [--only ROW;ROW] [--budget 520]

Every row in one process, on the model of ``benchmarks/efficiency.py`` (random Llama, hidden 2048,
bf16, batch 4 x 1024, all 7 projections, AdamW), eager and under ``torch.compile`` (default mode),
ratios to peft LoRA r16 compiled. Variants of the per-step cores under compile:

* ``plan`` (the library): ``torch.compile(model)``; the model's plan (:mod:`orthotune.layer.plan`) traces
  into the graph and computes every group's cores in one batched call, which each layer reads.
* ``per-layer`` (ablation): the plan's hooks removed, so every layer computes its own ``core()``
  inside the graph.
* ``eager plan``: the plan's hooks run eagerly, the base model's ``forward`` compiled: the batched
  cores are graph inputs.
* ``unpadded`` (ablation): as ``plan``, with :func:`orthotune.ops.lowrank.pad_square` switched off, so
  LoCO's bf16 one form keeps its rank ``2kr`` (36 for k3 r6) instead of the 16-byte-aligned 40.

The ``plan_fallbacks`` column counts per-layer ``core()`` calls after setup (a ``plan`` row of a
batched method should show none).

Writes ``compile_profile.json``, ``compile_profile.md`` and ``profile.txt`` under ``--out`` (after each row,
so a run cut short keeps what it measured) and prints the markdown table last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import efficiency as eff  # noqa: E402

import orthotune  # noqa: E402
from orthotune.methods.base import AdapterMethod  # noqa: E402
from orthotune.ops import lowrank  # noqa: E402

LORA = "peft LoRA r16"
FLOOR = "floor"


# ---------------------------------------------------------------------------------------------- variants
FALLBACKS = [0]
_OWN_CORE = AdapterMethod.core


def _counted_core(self: AdapterMethod, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    FALLBACKS[0] += 1  # counted when traced (or run eagerly): a planned row should show none
    return _OWN_CORE(self, dtype)


@contextlib.contextmanager
def counting_fallbacks():
    """Count the per-layer ``core()`` calls of one row."""
    AdapterMethod.core = _counted_core
    try:
        yield
    finally:
        AdapterMethod.core = _OWN_CORE


@contextlib.contextmanager
def unpadded(active: bool):
    """Switch the one form's rank padding off for the ``unpadded`` ablation (while its graph is traced)."""
    own = lowrank.pad_square
    if active:
        lowrank.pad_square = lambda K: K
    try:
        yield
    finally:
        lowrank.pad_square = own


def apply_variant(model: nn.Module, variant: str, compile_kw: dict[str, Any]) -> Callable[..., Any]:
    """The callable a step runs for ``variant`` (model built)."""
    if variant == "eager":
        return model
    if variant == "per-layer" and isinstance(model, orthotune.OrthoModel):
        model.plan.detach()
    if variant == "eager plan":  # hooks run eagerly, the forward compiled
        inner = model.base_model if isinstance(model, orthotune.OrthoModel) else model
        inner.forward = torch.compile(inner.forward, **compile_kw)
        return model
    return torch.compile(model, **compile_kw)


# ---------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    spec: str
    variant: str  # eager | plan | per-layer | eager plan | unpadded
    mode: str = "default"

    @property
    def name(self) -> str:
        if self.variant == "eager":
            return f"{self.spec}, eager"
        variant = "" if self.variant == "plan" else f" {self.variant}"  # plain torch.compile(model): the library's path
        return f"{self.spec}, compiled{variant}" + ("" if self.mode == "default" else f" [{self.mode}]")


SPECS: dict[str, eff.Builder | None] = {
    FLOOR: None,
    LORA: eff._peft("LoraConfig", r=16, lora_alpha=32),
    "orthotune LoRA r16": eff._ot("LoRAConfig", r=16, lora_alpha=32),
    "LoCO k3 r6 exact": eff._ot("LoCOConfig", chain_length=3, rank=6),
    "LoCO k3 r6 approx": eff._ot("LoCOConfig", chain_length=3, rank=6, mode="approx"),
    "LoCO k4 r4 exact": eff._ot("LoCOConfig", chain_length=4, rank=4),
    "OFT b32": eff._ot("OFTConfig", r=0, oft_block_size=32),
    "HRA r8": eff._ot("HRAConfig", r=8),
}
ROTATIONS = ["LoCO k3 r6 exact", "HRA r8", "OFT b32", "LoCO k3 r6 approx"]


def rows_in_order() -> list[Row]:
    """Most informative first: a run cut short by its budget keeps the rows that decide."""
    rows = [Row(LORA, "plan"), Row(FLOOR, "plan")]
    for s in ROTATIONS:
        rows += [Row(s, "plan"), Row(s, "per-layer"), Row(s, "eager plan")]
    rows += [Row("orthotune LoRA r16", "plan"), Row("LoCO k3 r6 exact", "unpadded"), Row("LoCO k4 r4 exact", "plan")]
    rows += [Row(s, "eager") for s in SPECS]
    rows += [Row(s, "plan", "max-autotune-no-cudagraphs") for s in ("LoCO k3 r6 exact", "HRA r8")]
    rows += [Row(LORA, "plan", "max-autotune-no-cudagraphs")]
    return rows


def make_step(row: Row, shape: eff.Shape, ids: torch.Tensor, device: str, backend: str) -> tuple[Callable[[], Any], list[nn.Parameter]]:
    model = eff.make_model(shape, device)
    for p in model.parameters():
        p.requires_grad_(False)
    builder = SPECS[row.spec]
    if builder is not None:
        model = builder(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    emb = model.get_input_embeddings()
    kw: dict[str, Any] = {"backend": backend} if backend != "inductor" else {}
    if row.mode != "default":
        kw["mode"] = row.mode
    fn = apply_variant(model, row.variant, kw)
    return eff.eager_step(fn, emb, ids, params, floor=builder is None), params


def run_row(row: Row, shape: eff.Shape, warmup: int, steps: int, device: str, backend: str) -> dict[str, Any]:
    torch._dynamo.reset()
    eff._reset(device)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), device=device, generator=torch.Generator(device).manual_seed(1))
    from torch._dynamo.utils import counters

    counters.clear()
    with counting_fallbacks(), unpadded(row.variant == "unpadded"):
        step, params = make_step(row, shape, ids, device, backend)
        FALLBACKS[0] = 0  # get_model's finite-init probe calls each layer once, before any plan exists
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        timer = eff.Timer(device)
        times = [timer(step) for _ in range(warmup + steps)][warmup:]
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        info = dict(eff.dynamo_counts(), plan_fallbacks=FALLBACKS[0])
        result = dict(name=row.name, spec=row.spec, variant=row.variant, mode=row.mode, step_ms=times,
                      median_ms=statistics.median(times), peak_gib=peak, first_step_s=first_s, **info)
        result["_step"] = step
    return result


def profile_rows(step: Callable[[], Any], name: str, variant: str) -> str:
    """Top kernels, kernel count and host synchronisations of 3 compiled steps."""
    with counting_fallbacks():
        for _ in range(2):
            step()
        events, wall, gpu, launches = eff.profile_steps(step)
    syncs = {e.key: e.count / 3 for e in events if any(k in e.key for k in ("Synchronize", "cudaMemcpy", "item", "_local_scalar"))}
    head = (f"=== {name}: wall {wall:.1f} ms/step (profiled), GPU busy {gpu:.1f} ms/step, {launches:.0f} kernels/step; "
            f"host syncs/copies per step: {syncs}\n")
    return head + events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=90) + "\n" + \
        "most launched (3 steps):\n" + events.table(sort_by="count", row_limit=20, max_name_column_width=90) + "\n"


# ---------------------------------------------------------------------------------------------- report
def ratios(rows: list[dict[str, Any]]) -> None:
    by = {(r["spec"], r["variant"], r["mode"]): r for r in rows if r.get("median_ms")}
    lora = by.get((LORA, "plan", "default"))
    floor = by.get((FLOOR, "plan", "default"))
    lora_e = by.get((LORA, "eager", "default"))
    for r in rows:
        if r.get("median_ms"):
            r["x_lora_compiled"] = r["median_ms"] / lora["median_ms"] if lora else None
            r["x_floor_compiled"] = r["median_ms"] / floor["median_ms"] if floor else None
            r["x_lora_eager"] = r["median_ms"] / lora_e["median_ms"] if lora_e else None
            r["mem_x_lora_compiled"] = r["peak_gib"] / lora["peak_gib"] if lora else None


def markdown(env: dict[str, Any], shape: eff.Shape, rows: list[dict[str, Any]]) -> str:
    f = eff._f
    lines = [f"# Compiled training step: where the rotations' time goes (issue 19)", "",
             f"{env.get('gpu')}, torch {env['torch']}, triton {env.get('triton')}, transformers {env['transformers']}, "
             f"peft {env.get('peft')}, {env['date']}, commit {env.get('commit')}.",
             f"Random Llama {shape.layers}x{shape.hidden} (intermediate {shape.intermediate}), bf16, batch "
             f"{shape.batch} x {shape.seq}, all 7 projections, AdamW; median of the timed steps. "
             "Ratios to peft LoRA r16 compiled (default mode) in the same process.", "",
             "| row | ms | x peft LoRA compiled | x compiled floor | x peft LoRA eager | peak GiB | graphs | breaks | recompiles | first step s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['name']} | error: {r['error'][:120]} | | | | | | | | |")
            continue
        lines.append(f"| {r['name']} | {f(r['median_ms'], '{:.1f}')} | {f(r.get('x_lora_compiled'))} | "
                     f"{f(r.get('x_floor_compiled'))} | {f(r.get('x_lora_eager'))} | {f(r['peak_gib'])} | {r['graphs']} | "
                     f"{r['graph_breaks']} | {r['recompiles']} | {f(r['first_step_s'], '{:.0f}')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager for a CPU dry run)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (CPU dry run of the script)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--budget", type=float, default=520.0, help="seconds: no new row starts after this")
    ap.add_argument("--only", default="", help="';'-separated row names to run (default: all)")
    ap.add_argument("--profile", default="LoCO k3 r6 exact, compiled per-layer;LoCO k3 r6 exact, compiled",
                    help="';'-separated row names to profile")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    shape = eff.Shape(layers=args.layers)
    if args.tiny:
        shape = eff.Shape(hidden=128, intermediate=256, layers=1, heads=2, vocab=128, batch=1, seq=16)
    env = eff.environment(args.device)
    torch._dynamo.config.cache_size_limit = 64
    rows: list[dict[str, Any]] = []
    profiles: list[str] = []
    wanted = [w for w in args.only.split(";") if w]
    for row in rows_in_order():
        if wanted and row.name not in wanted:
            continue
        if time.perf_counter() - start > args.budget:
            rows.append(dict(name=row.name, spec=row.spec, variant=row.variant, mode=row.mode, error="not run: budget"))
            continue
        try:
            r = run_row(row, shape, args.warmup, args.steps, args.device, args.backend)
            step = r.pop("_step")
            print(f"[{time.perf_counter() - start:.0f}s] {row.name}: {r['median_ms']:.1f} ms, {r['peak_gib']:.2f} GiB, "
                  f"graphs {r['graphs']}, breaks {r['graph_breaks']}, recompiles {r['recompiles']}, first step {r['first_step_s']:.0f}s",
                  flush=True)
            if row.name in args.profile.split(";") and args.device == "cuda":
                profiles.append(profile_rows(step, row.name, row.variant))
                (args.out / "profile.txt").write_text("\n".join(profiles))
            del step
        except Exception as err:
            traceback.print_exc()
            r = dict(name=row.name, spec=row.spec, variant=row.variant, mode=row.mode, error=f"{type(err).__name__}: {err}")
        rows.append(r)
        ratios(rows)
        (args.out / "compile_profile.json").write_text(json.dumps(dict(env=env, shape=vars(shape), rows=rows), indent=1))
        (args.out / "compile_profile.md").write_text(markdown(env, shape, rows))
    print(markdown(env, shape, rows))


if __name__ == "__main__":
    main()
