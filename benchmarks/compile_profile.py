"""Where a compiled training step's time goes for orthotune's rotations, and prototypes of the fix (issue 19).

    python benchmarks/compile_profile.py --out DIR [--layers 4] [--only loco,hra] [--budget 520]

Every row in one process, on the model of ``benchmarks/efficiency.py`` (random Llama, hidden 2048,
bf16, batch 4 x 1024, all 7 projections, AdamW), eager and under ``torch.compile`` (default mode),
ratios to peft LoRA r16 compiled. Variants of the per-step cores under compile:

* ``per-layer`` (the library as it is): under compile ``batching.current`` falls back to each layer's
  ``step_core()``, so the cores are computed layer by layer inside the graph (LoCO's ``expm`` is
  ``torch.linalg.matrix_exp`` there).
* ``per-layer, masked expm``: the same, with ``expm`` by Taylor + a fixed 20 masked squarings under compile.
* ``graph plan``: a forward pre-hook traced into the compiled graph computes every group's cores in
  one batched call (the library's ``step_cores``), and each layer reads its slice: the explicit
  per-step plan of issue 19, inside the graph (masked expm).
* ``eager plan``: the same batched cores computed eagerly before the compiled forward
  (the base model's ``forward`` compiled, its hooks not), read by the graph as inputs.

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
from orthotune import batching  # noqa: E402
from orthotune.ops import skew  # noqa: E402

LORA = "peft LoRA r16"
FLOOR = "floor"


# ---------------------------------------------------------------------------------------------- prototypes
_CORES: list[tuple[torch.Tensor, ...]] = []  # this forward's batched cores, one entry per step_cores chunk
_ORIGINAL_CURRENT = batching.current
FALLBACKS = [0]
_ORIGINAL_EXPM = skew.expm


def _plan_current(module: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``batching.current`` reading this forward's planned cores (slot set on the module at setup)."""
    slot = getattr(module, "_plan_slot", None)
    if slot is not None and _CORES:
        chunk, j = slot
        return batching._cast(tuple(t[j] for t in _CORES[chunk]), dtype)
    FALLBACKS[0] += 1  # counted when traced (or run eagerly): a planned row should show none
    return _ORIGINAL_CURRENT(module, dtype)


def _masked_expm(X: torch.Tensor, max_squarings: int | None = None) -> torch.Tensor:
    """``skew.expm`` with its capture path (Taylor + ``CAPTURED_SQUARINGS`` masked squarings) under compile."""
    if not torch.compiler.is_compiling():
        return _ORIGINAL_EXPM(X, max_squarings)
    return skew.taylor_expm(X, max_squarings or skew.CAPTURED_SQUARINGS)


class Plan:
    """Prototype of the explicit per-step plan: the batched groups fixed at setup, cores computed per forward."""

    def __init__(self, model: nn.Module) -> None:
        groups, _ = batching._groups(model)
        self.groups = [(cls, modules, dtype) for (cls, _, dtype), modules in groups.items()]
        chunk = 0
        for cls, modules, _ in self.groups:
            with torch.no_grad():
                chunks = cls.step_cores(modules)
            for indices, _ in chunks:
                for j, i in enumerate(indices):
                    modules[i].__dict__["_plan_slot"] = (chunk, j)
                chunk += 1

    def compute(self) -> None:
        _CORES.clear()
        for cls, modules, dtype in self.groups:
            for _, stacked in cls.step_cores(modules):
                _CORES.append(batching._cast(stacked, dtype))


def _drop_batching_hooks(inner: nn.Module) -> None:
    for hooks in (inner._forward_pre_hooks, inner._forward_hooks):
        for key, fn in list(hooks.items()):
            if fn in (batching.refresh_hook, batching.end_hook):
                del hooks[key]


def apply_variant(model: nn.Module, variant: str, compile_kw: dict[str, Any]) -> Callable[..., Any]:
    """The callable a step runs for ``variant`` (model built, prototypes installed)."""
    if variant == "eager":
        return model
    inner = model.base_model if isinstance(model, orthotune.OrthoModel) else model
    if variant in ("graph plan", "eager plan"):
        plan = Plan(inner)
        _drop_batching_hooks(inner)
        inner.register_forward_pre_hook(lambda m, a: plan.compute())
        inner.register_forward_hook(lambda m, a, o: _CORES.clear(), always_call=True)
        if variant == "eager plan":  # hooks run eagerly, the forward compiled
            inner.forward = torch.compile(inner.forward, **compile_kw)
            return model
    return torch.compile(model, **compile_kw)


@contextlib.contextmanager
def patched(variant: str):
    """Install the prototype's ``batching.current`` / ``skew.expm`` for one row."""
    batching.current = _plan_current if "plan" in variant else _ORIGINAL_CURRENT
    skew.expm = _masked_expm if ("masked" in variant or "plan" in variant) else _ORIGINAL_EXPM
    try:
        yield
    finally:
        batching.current, skew.expm = _ORIGINAL_CURRENT, _ORIGINAL_EXPM


# ---------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    spec: str
    variant: str  # eager | per-layer | per-layer, masked expm | graph plan | eager plan
    mode: str = "default"

    @property
    def name(self) -> str:
        if self.variant == "eager":
            return f"{self.spec}, eager"
        return f"{self.spec}, compiled {self.variant}" + ("" if self.mode == "default" else f" [{self.mode}]")


SPECS: dict[str, eff.Builder | None] = {
    FLOOR: None,
    LORA: eff._peft("LoraConfig", r=16, lora_alpha=32),
    "orthotune LoRA r16": eff._ot("LoRAConfig", r=16, lora_alpha=32),
    "LoCO k3 r6 exact": eff._ot("LoCOConfig", chain_length=3, rank=6),
    "LoCO k3 r6 approx": eff._ot("LoCOConfig", chain_length=3, rank=6, mode="approx"),
    "OFT b32": eff._ot("OFTConfig", r=0, oft_block_size=32),
    "HRA r8": eff._ot("HRAConfig", r=8),
}
ROTATIONS = ["LoCO k3 r6 exact", "HRA r8", "OFT b32", "LoCO k3 r6 approx"]


def rows_in_order() -> list[Row]:
    """Most informative first: a run cut short by its budget keeps the rows that decide."""
    rows = [Row(LORA, "per-layer"), Row(FLOOR, "per-layer")]
    for s in ROTATIONS:
        rows += [Row(s, "per-layer"), Row(s, "graph plan"), Row(s, "eager plan")]
    rows += [Row("orthotune LoRA r16", "per-layer")]
    rows += [Row(s, "eager") for s in SPECS]
    rows += [Row(s, "graph plan", "max-autotune-no-cudagraphs") for s in ("LoCO k3 r6 exact", "HRA r8")]
    rows += [Row(LORA, "per-layer", "max-autotune-no-cudagraphs")]
    rows += [Row("LoCO k3 r6 exact", "per-layer, masked expm")]  # 56 unrolled 20-squaring loops: slow to compile
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
    with patched(row.variant):
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
        info = dict(graphs=counters["stats"].get("unique_graphs", 0), graph_breaks=sum(counters["graph_break"].values()),
                    recompiles=sum(counters["recompiles"].values()) if "recompiles" in counters else 0,
                    plan_fallbacks=FALLBACKS[0])
        result = dict(name=row.name, spec=row.spec, variant=row.variant, mode=row.mode, step_ms=times,
                      median_ms=statistics.median(times), peak_gib=peak, first_step_s=first_s, **info)
        result["_step"] = step
    return result


def profile_rows(step: Callable[[], Any], name: str, variant: str) -> str:
    """Top kernels, kernel count and host synchronisations of 3 compiled steps."""
    with patched(variant):
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
    lora = by.get((LORA, "per-layer", "default"))
    floor = by.get((FLOOR, "per-layer", "default"))
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
    ap.add_argument("--profile", default="LoCO k3 r6 exact, compiled per-layer;LoCO k3 r6 exact, compiled graph plan",
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
