"""Training-step time and memory of orthotune's methods against peft's, side by side in one process.

    python benchmarks/efficiency.py --out benchmarks/results          # everything (an H100: ~4 min)
    python benchmarks/efficiency.py --sections train --only lora,loco  # a subset, by name substring

Model: a randomly initialised Llama-style causal LM (hidden 2048, intermediate 5632, 8 layers, 16
heads, vocab 32000; no download), bf16 base, batch 4 x 1024, adapters on all 7 projections, AdamW.
Per method: median step time over the timed steps (CUDA events, after warm-up; methods run in
``--rounds`` interleaved rounds and the median over all rounds is reported), peak allocated memory
(model included), trainable parameters. Sections:

* ``train``: peft (LoRA r16, OFT b32, BOFT b8 m2, HRA r8, FourierFT n1000, PSOFT), full fine-tuning, the
  frozen-base floor (no adapter, backward through the activations), and every orthotune method at
  its usual configuration and at trainable parameters matched to LoRA r16 where the method allows.
* ``infer``: forward latency of the merged model and of the unmerged adapters against the base
  (prefill 4 x 1024, and 32 greedy decoding steps with the KV cache).
* ``scaling``: hidden 1024 to 8192 (2 layers) and rank 4 to 64 for LoRA, LoCO, OFT and HRA.
* ``profile``: where the time of one step goes (torch.profiler, top kernels) for a few methods.

Writes ``efficiency.json``, ``efficiency.md``, ``scaling.png`` and ``profile.txt`` under ``--out``
and prints the markdown table last. The same rows under ``torch.compile`` (issue 19's compiled table)
are ``benchmarks/compiled.py``'s.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import orthotune
from orthotune.methods.registry import METHODS

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Builder = Callable[[nn.Module], nn.Module]


@dataclass
class Shape:
    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 8
    heads: int = 16
    vocab: int = 32000
    batch: int = 4
    seq: int = 1024

    @classmethod
    def scaled(cls, hidden: int, layers: int = 2) -> Shape:
        return cls(hidden=hidden, intermediate=int(round(hidden * 2.75 / 256)) * 256, layers=layers, heads=hidden // 128)


def make_model(shape: Shape, device: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.heads, vocab_size=shape.vocab,
        max_position_embeddings=max(2048, shape.seq),
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------- methods
@dataclass
class Spec:
    name: str
    library: str  # "peft", "orthotune" or "reference"
    build: Builder | None  # None: the frozen-base floor
    note: str = ""
    matched: bool = False  # configured for trainable parameters matched to peft LoRA r16
    needs: str | None = None  # orthotune method that must be registered
    prepare: Callable[[nn.Module, torch.Tensor], None] | None = None
    graphed: bool = False  # the step captured once in a CUDA graph and replayed (orthotune.GraphedStep)


def _peft(config_name: str, **kw: Any) -> Builder:
    def build(model: nn.Module) -> nn.Module:
        import peft

        return peft.get_peft_model(model, getattr(peft, config_name)(target_modules=TARGETS, **kw))

    return build


def _ot(config_name: str, **kw: Any) -> Builder:
    def build(model: nn.Module) -> nn.Module:
        return orthotune.get_model(model, getattr(orthotune, config_name)(target_modules=TARGETS, **kw))

    return build


def _per_layer(builder: Builder) -> Builder:
    """An orthotune model without the per-step plan's hooks: every layer computes its own core (ablation)."""

    def build(model: nn.Module) -> nn.Module:
        wrapped = builder(model)
        wrapped.base_model._forward_pre_hooks.clear()
        wrapped.base_model._forward_hooks.clear()
        return wrapped

    return build


def _full(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _gradient_supports(model: nn.Module, ids: torch.Tensor) -> None:
    """Fill LOFT's gradient-informed supports from two batches (the recipe's first-order statistic)."""
    orthotune.select_supports(model, [dict(input_ids=ids, labels=ids)] * 2, num_batches=2, progress=False)


def train_specs() -> list[Spec]:
    return [
        Spec("floor: frozen base, no adapter", "reference", None, "backward through the activations only"),
        Spec("peft LoRA r16", "peft", _peft("LoraConfig", r=16, lora_alpha=32)),
        Spec("peft OFT b32", "peft", _peft("OFTConfig", r=0, oft_block_size=32), "peft default: Cayley-Neumann, 5 terms"),
        Spec("peft BOFT b8 m2", "peft", _peft("BOFTConfig", boft_block_size=8, boft_n_butterfly_factor=2)),
        Spec("peft HRA r8", "peft", _peft("HRAConfig", r=8)),
        Spec("peft FourierFT n1000", "peft", _peft("FourierFTConfig", n_frequency=1000)),
        Spec("peft PSOFT r32", "peft", _peft("PsoftConfig", r=32)),
        Spec("full fine-tuning", "reference", _full),
        Spec("orthotune LoRA r16", "orthotune", _ot("LoRAConfig", r=16, lora_alpha=32), matched=True),
        Spec("orthotune LoCO k4 r4 exact parallel", "orthotune", _ot("LoCOConfig", chain_length=4, rank=4)),
        Spec("orthotune LoCO k3 r6 exact parallel", "orthotune", _ot("LoCOConfig", chain_length=3, rank=6), matched=True),
        Spec("orthotune LoCO k4 r4 exact sequential", "orthotune", _ot("LoCOConfig", chain_length=4, rank=4, mode="sequential")),
        Spec("orthotune LoCO k4 r4 approx exp(sum)", "orthotune", _ot("LoCOConfig", chain_length=4, rank=4, mode="approx")),
        Spec("orthotune OFT b32", "orthotune", _ot("OFTConfig", r=0, oft_block_size=32), "exact Cayley", needs="oft"),
        Spec("orthotune OFT b64", "orthotune", _ot("OFTConfig", r=0, oft_block_size=64), "exact Cayley", matched=True, needs="oft"),
        Spec("orthotune BOFT b8 m2", "orthotune", _ot("BOFTConfig", boft_block_size=8, boft_n_butterfly_factor=2), needs="boft"),
        Spec("orthotune BOFT b16 m4", "orthotune", _ot("BOFTConfig", boft_block_size=16, boft_n_butterfly_factor=4), matched=True, needs="boft"),
        Spec("orthotune HRA r8", "orthotune", _ot("HRAConfig", r=8), needs="hra"),
        Spec("orthotune HRA r32", "orthotune", _ot("HRAConfig", r=32), matched=True, needs="hra"),
        Spec("orthotune GOFT", "orthotune", _ot("GOFTConfig"), needs="goft"),
        Spec("ablation: OFT b32 folded", "ablation", _ot("OFTConfig", r=0, oft_block_size=32, compute="weight"),
             "compute='weight': W0 T formed per call", needs="oft"),
        Spec("ablation: BOFT b8 m2 folded", "ablation",
             _ot("BOFTConfig", boft_block_size=8, boft_n_butterfly_factor=2, compute="weight"), needs="boft"),
        Spec("ablation: GOFT folded", "ablation", _ot("GOFTConfig", compute="weight"), needs="goft"),
        Spec("orthotune PSOFT r32", "orthotune", _ot("PSOFTConfig", r=32), needs="psoft"),
        Spec("orthotune LOFT principal r16", "orthotune", _ot("LOFTConfig", support="principal", r=16), needs="loft"),
        Spec("orthotune LOFT gradient r16", "orthotune", _ot("LOFTConfig", support="gradient", r=16), needs="loft",
             prepare=_gradient_supports),
        Spec("orthotune LoCA n1000", "orthotune", _ot("LoCAConfig", n_frequency=1000)),
        Spec("orthotune FourierFT n1000", "orthotune", _ot("FourierFTConfig", n_frequency=1000)),
        Spec("ablation: LoCO k4 r4 exact, cores per layer", "ablation", _per_layer(_ot("LoCOConfig", chain_length=4, rank=4)),
             "no per-step plan"),
        Spec("ablation: LoRA r16, cast per layer", "ablation", _per_layer(_ot("LoRAConfig", r=16, lora_alpha=32)),
             "no per-step plan"),
    ]


GRAPH_SUFFIX = ", CUDA graph"
PROFILED = ["floor: frozen base, no adapter", "peft LoRA r16", "orthotune LoRA r16", "orthotune LoCO k4 r4 exact parallel",
            "orthotune LoCO k3 r6 exact parallel", "orthotune HRA r8", "orthotune OFT b32", "orthotune LoCA n1000"]


def graphed_specs(specs: list[Spec]) -> list[Spec]:
    """CUDA-graph copies of the floor, peft LoRA and every orthotune method (not peft's other methods or ablations)."""
    keep = [s for s in specs if s.library == "orthotune" or s.build is None or s.name == "peft LoRA r16"]
    return [dataclasses.replace(s, name=s.name + GRAPH_SUFFIX, graphed=True) for s in keep]


# ---------------------------------------------------------------------------------------------- timing
def dynamo_counts() -> dict[str, int]:
    """What dynamo compiled since its counters were last cleared: graphs, graph breaks, recompilations."""
    from torch._dynamo.utils import counters

    return dict(graphs=counters["stats"].get("unique_graphs", 0), graph_breaks=sum(counters["graph_break"].values()),
                recompiles=sum(counters["recompiles"].values()))


def _reset(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Timer:
    """Milliseconds of a region: CUDA events on a GPU, a host clock on the CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def build(spec: Spec, shape: Shape, device: str, ids: torch.Tensor) -> nn.Module:
    model = make_model(shape, device)
    for p in model.parameters():
        p.requires_grad_(False)
    if spec.build is not None:
        model = spec.build(model)
    if spec.prepare is not None:
        spec.prepare(model, ids)
    return model


def training(spec: Spec, shape: Shape, device: str, ids: torch.Tensor) -> tuple[list[nn.Parameter], Callable[[], None]]:
    """A freshly built model's trainable parameters and one training step (forward, backward, AdamW).

    Graphed specs step through ``orthotune.GraphedStep`` (the untimed warm-up calls compile and record its graphs)."""
    model = build(spec, shape, device, ids)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    emb = model.get_input_embeddings()
    if spec.graphed:
        return params, _graphed_step(spec, model, params, emb, ids)
    return params, eager_step(model, emb, ids, params, floor=spec.build is None)


def eager_step(call: Callable[..., Any], emb: nn.Module, ids: torch.Tensor, params: list[nn.Parameter],
               floor: bool) -> Callable[[], None]:
    """One training step through ``call`` (the model, or a compiled one): forward, backward, AdamW."""
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None

    def step() -> None:
        if floor:  # the floor: backward through the activations only
            out = call(inputs_embeds=emb(ids).detach().requires_grad_(), labels=ids, use_cache=False)
        else:
            out = call(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def _graphed_step(spec: Spec, model: nn.Module, params: list[nn.Parameter], emb: nn.Module,
                  ids: torch.Tensor) -> Callable[[], None]:
    """The same step as :func:`training`'s, through ``orthotune.GraphedStep`` (``torch.compile(mode="reduce-overhead")``:
    compiled forward and backward replayed from CUDA graphs, AdamW eager). The floor has no trainable parameter: a
    scalar multiplier on its loss gives the optimiser one."""
    if spec.build is None:
        scale = nn.Parameter(torch.ones((), device=ids.device))
        params = [scale]

        def loss_fn(m: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
            x = emb(batch["input_ids"]).detach().requires_grad_()
            return m(inputs_embeds=x, labels=batch["labels"], use_cache=False).loss * scale
    else:
        loss_fn = orthotune.training.graphs.model_loss
    opt = torch.optim.AdamW(params, lr=1e-5)
    graphed = orthotune.GraphedStep(model, opt, loss_fn)
    batch = dict(input_ids=ids, labels=ids, use_cache=False)

    def step() -> None:
        graphed(batch)

    return step


def train_run(spec: Spec, shape: Shape, device: str, warmup: int, steps: int) -> dict[str, Any]:
    """Median step ms, peak GiB and trainable parameters of one method (model built afresh)."""
    _reset(device)
    resident = torch.cuda.memory_allocated() if device == "cuda" else 0  # left by earlier rows: not this row's
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), device=device, generator=torch.Generator(device).manual_seed(1))
    params, step = training(spec, shape, device, ids)
    timer = Timer(device)
    times = [timer(step) for _ in range(warmup + steps)][warmup:]
    peak = (torch.cuda.max_memory_allocated() - resident) / 2**30 if device == "cuda" else float("nan")
    result = dict(step_ms=times, peak_gib=peak, trainable=sum(p.numel() for p in params), resident_gib=resident / 2**30)
    del params, step
    _reset(device)
    return result


def train_section(args: argparse.Namespace, shape: Shape, specs: list[Spec],
                  on_round: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for rnd in range(args.rounds):
        if rnd and on_round is not None:  # a run cut short keeps the rounds it finished
            on_round(_summarise(list(rows.values())))
        for spec in specs:
            row = rows.setdefault(spec.name, dict(name=spec.name, library=spec.library, note=spec.note,
                                                  matched=spec.matched, step_ms=[], peak_gib=None, trainable=None))
            if row.get("error") or row.get("skipped"):
                continue
            if spec.needs and spec.needs not in METHODS:
                row["skipped"] = f"orthotune method {spec.needs!r} is not on this branch"
                continue
            if rnd > 0 and row["step_ms"] and statistics.median(row["step_ms"]) > args.slow_ms:
                continue  # far from every threshold: one round is enough
            try:
                r = train_run(spec, shape, args.device, args.warmup, args.steps)
            except Exception as err:  # one broken method must not sink the run
                row["error"] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
                _reset(args.device)
                continue
            row["step_ms"] += r["step_ms"]
            row["peak_gib"] = max(row["peak_gib"] or 0.0, r["peak_gib"])
            row["trainable"] = r["trainable"]
            print(f"[train r{rnd}] {spec.name}: {statistics.median(r['step_ms']):.1f} ms, {r['peak_gib']:.2f} GiB, "
                  f"{r['trainable']:,} trainable (resident before: {r['resident_gib']:.3f} GiB)", flush=True)
    return _summarise(list(rows.values()))


def _summarise(out: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for row in out:
        row["median_ms"] = statistics.median(row["step_ms"]) if row["step_ms"] else None
    _ratios(out, "peft LoRA r16", "floor: frozen base, no adapter")
    return out


def _ratios(rows: list[dict[str, Any]], lora_name: str, floor_name: str) -> None:
    """Ratios to peft LoRA (eager, as peft runs), to peft LoRA captured the same way (``x_lora_graph``), and to
    the floor of the row's own mode (graphed rows: the graphed floor)."""
    by = {r["name"]: r for r in rows}
    lora, lora_graph = by.get(lora_name), by.get(lora_name + GRAPH_SUFFIX)

    def ratio(a: dict[str, Any], b: dict[str, Any] | None, key: str) -> float | None:
        return a[key] / b[key] if a.get(key) and b and b.get(key) else None

    for r in rows:
        floor = by.get(floor_name + GRAPH_SUFFIX if r["name"].endswith(GRAPH_SUFFIX) else floor_name)
        r["x_lora"], r["x_floor"] = ratio(r, lora, "median_ms"), ratio(r, floor, "median_ms")
        r["x_lora_graph"], r["mem_x_lora"] = ratio(r, lora_graph, "median_ms"), ratio(r, lora, "peak_gib")


# ---------------------------------------------------------------------------------------------- inference
@torch.no_grad()
def infer_section(args: argparse.Namespace, shape: Shape) -> list[dict[str, Any]]:
    """Prefill and decoding latency: base, merged adapters, unmerged adapters (kept separate)."""
    device, timer = args.device, Timer(args.device)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), device=device, generator=torch.Generator(device).manual_seed(2))
    prompt = ids[:, :128]

    def adapted(cfg: orthotune.AdapterConfig, merge: bool) -> nn.Module:
        model = orthotune.get_model(make_model(shape, device), cfg)
        with torch.no_grad():  # move away from the identity, as after training
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p), alpha=1e-3)
        return model.merge_and_unload() if merge else model

    variants: list[tuple[str, Callable[[], nn.Module]]] = [
        ("base model", lambda: make_model(shape, device)),
        ("orthotune LoCO k4 r4, merged", lambda: adapted(orthotune.LoCOConfig(target_modules=TARGETS), True)),
        ("orthotune LoCO k4 r4, unmerged", lambda: adapted(orthotune.LoCOConfig(target_modules=TARGETS), False)),
        ("orthotune LoRA r16, unmerged", lambda: adapted(orthotune.LoRAConfig(target_modules=TARGETS, r=16, lora_alpha=32), False)),
    ]
    if "hra" in METHODS:
        variants.append(("orthotune HRA r8, unmerged", lambda: adapted(orthotune.HRAConfig(target_modules=TARGETS, r=8), False)))
    modes = [False] + ([True] if device == "cuda" and args.graph != "eager" else [])
    runs = [(name + (GRAPH_SUFFIX if graph else ""), make, graph) for graph in modes for name, make in variants
            if not (graph and "merged" in name and "unmerged" not in name)]  # merged = the base model's graph
    rows = {name: dict(name=name, prefill_ms=[], decode_ms=[]) for name, _, _ in runs}
    for _ in range(args.rounds):  # interleaved: drift is shared by every variant
        for name, make, graph in runs:
            _reset(device)
            try:
                model = make().eval()
                prefill = _graphed_prefill(model, ids) if graph else lambda: model(input_ids=ids, use_cache=False)
                for i in range(args.warmup + args.steps):
                    t = timer(prefill)
                    if i >= args.warmup:
                        rows[name]["prefill_ms"].append(t)
                del prefill
                _reset(device)
                if graph:
                    decode = _graphed_decode(model, prompt, 32)
                else:
                    gen = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
                    decode = lambda: model.generate(prompt, **gen)  # noqa: E731
                decode()
                rows[name]["decode_ms"].append(timer(decode) / 32)
                del model, decode
            except Exception as err:
                rows[name]["error"] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
    out = list(rows.values())
    for r in out:
        for k in ("prefill_ms", "decode_ms"):
            r[k.replace("_ms", "_median_ms")] = statistics.median(r[k]) if r[k] else None
    for r in out:
        base = rows["base model" + (GRAPH_SUFFIX if r["name"].endswith(GRAPH_SUFFIX) else "")]
        for k in ("prefill", "decode"):
            b, v = base.get(f"{k}_median_ms"), r.get(f"{k}_median_ms")
            r[f"{k}_x_base"] = v / b if b and v else None
        print(f"[infer] {r['name']}: prefill {r['prefill_median_ms']} ms, decode {r['decode_median_ms']} ms/token", flush=True)
    return out


def _capture(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Warm ``fn`` up on the warm-up stream ``GraphedStep`` uses, then capture it: (graph, the outputs its replays overwrite)."""
    for _ in range(2):
        orthotune.training.graphs.on_warmup_stream(fn)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _graphed_prefill(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """One forward over ``ids`` captured in a CUDA graph (the adapters' inference cores are cached outside it)."""
    graph, _ = _capture(lambda: model(input_ids=ids, use_cache=False).logits)
    return graph.replay


def _graphed_decode(model: nn.Module, prompt: torch.Tensor, tokens: int) -> Callable[[], None]:
    """Greedy decoding of ``tokens`` tokens with a static KV cache, one captured graph per token step: the
    prefill runs eagerly once, each call replays the decoding step ``tokens`` times from the prompt's end."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + tokens)
    start = torch.tensor([prompt.shape[1]], device=prompt.device)
    position = start.clone()
    logits = model(input_ids=prompt, past_key_values=cache, use_cache=True,
                   cache_position=torch.arange(prompt.shape[1], device=prompt.device)).logits
    first = logits[:, -1:].argmax(-1)
    token = first.clone()

    def one() -> torch.Tensor:
        out = model(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True).logits
        return out[:, -1:].argmax(-1)

    graph, next_token = _capture(one)

    def decode() -> None:
        position.copy_(start)
        token.copy_(first)
        for layer in cache.layers:  # each static layer counts its own writes (transformers >= 5)
            layer.cumulative_length.fill_(prompt.shape[1])
        for _ in range(tokens):
            graph.replay()
            token.copy_(next_token)
            position.add_(1)

    return decode


# ---------------------------------------------------------------------------------------------- scaling
def scaling_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Step time at hidden 1024..8192 (usual configs) and rank 4..64 (hidden 2048), 2 layers each."""
    rows = []
    floor = Spec("floor", "reference", None)

    def methods(rank: int) -> list[Spec]:
        specs = [
            Spec("peft LoRA", "peft", _peft("LoraConfig", r=rank, lora_alpha=2 * rank)),
            Spec("orthotune LoRA", "orthotune", _ot("LoRAConfig", r=rank, lora_alpha=2 * rank)),
            Spec("orthotune LoCO", "orthotune", _ot("LoCOConfig", chain_length=4, rank=max(1, rank // 4))),
            Spec("orthotune HRA", "orthotune", _ot("HRAConfig", r=rank), needs="hra"),
        ]
        return [s for s in specs if not s.needs or s.needs in METHODS]

    oft = Spec("orthotune OFT b32", "orthotune", _ot("OFTConfig", r=0, oft_block_size=32), needs="oft")
    peft_oft = Spec("peft OFT b32", "peft", _peft("OFTConfig", r=0, oft_block_size=32))
    grid: list[tuple[str, int, int, list[Spec]]] = []
    graphs = args.device == "cuda" and args.graph != "eager"
    for hidden in args.hidden:
        extra = [peft_oft] + ([oft] if "oft" in METHODS else [])
        eager = [floor] + methods(16) + extra
        chosen = (eager if args.graph != "graphed" else []) + (graphed_specs(eager) if graphs else [])
        grid.append(("hidden", hidden, 16, chosen))
    for rank in args.ranks:
        grid.append(("rank", args.rank_hidden, rank, [floor] + methods(rank)))
    for sweep, hidden, rank, specs in grid:
        shape = Shape.scaled(hidden)
        by: dict[str, dict[str, Any]] = {}
        for spec in specs:
            try:
                r = train_run(spec, shape, args.device, args.warmup, max(5, args.steps // 2))
            except Exception as err:
                print(f"[scaling] {sweep} {hidden} r{rank} {spec.name}: {type(err).__name__}: {err}", flush=True)
                _reset(args.device)
                continue
            by[spec.name] = dict(sweep=sweep, hidden=hidden, rank=rank, name=spec.name, median_ms=statistics.median(r["step_ms"]),
                                 peak_gib=r["peak_gib"], trainable=r["trainable"])
        _ratios(list(by.values()), "peft LoRA", "floor")
        for row in by.values():
            print(f"[scaling] {sweep} hidden={hidden} rank={rank} {row['name']}: {row['median_ms']:.1f} ms "
                  f"({row['x_lora'] or float('nan'):.2f}x peft LoRA)", flush=True)
            rows.append(row)
    return rows


def plot_scaling(rows: list[dict[str, Any]], path: Path, rank_hidden: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, sweep, xkey, xlabel in ((axes[0], "hidden", "hidden", "hidden size (2 layers, rank 16)"),
                                    (axes[1], "rank", "rank", "rank (2 layers)")):
        sub = [r for r in rows if r["name"] != "floor" and (r["sweep"] == sweep or (sweep == "rank" and r["hidden"] == rank_hidden))]
        for name in sorted({r["name"] for r in sub}):
            pts = sorted((r[xkey], r["x_lora"]) for r in sub if r["name"] == name and r["x_lora"])
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("step time / peft LoRA")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------- profile
def profile_steps(step: Callable[[], Any], steps: int = 3) -> tuple[Any, float, float, float]:
    """``steps`` warmed-up calls of ``step`` under torch.profiler: the averaged events, and per step the wall ms
    (profiled), the GPU-busy ms and the kernels launched."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    return events, wall_ms, sum(e.self_device_time_total for e in kernels) / 1e3 / steps, sum(e.count for e in kernels) / steps


def profile_section(args: argparse.Namespace, shape: Shape, specs: list[Spec], path: Path) -> list[dict[str, Any]]:
    """Top kernels and the CPU/GPU split of a few training steps per method."""
    rows, text = [], []
    for spec in specs:
        _reset(args.device)
        ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), device=args.device)
        params, step = training(spec, shape, args.device, ids)
        for _ in range(4):  # graphed specs capture on the third call
            step()
        events, wall_ms, gpu_ms, launches = profile_steps(step)
        cpu_ms = sum(e.self_cpu_time_total for e in events if e.device_type.name == "CPU") / 1e3 / 3
        ops = sum(e.count for e in events if e.key.startswith("aten::")) / 3
        rows.append(dict(name=spec.name, cpu_ms=cpu_ms, wall_ms=wall_ms, gpu_busy_ms=gpu_ms, kernels_per_step=launches,
                         aten_ops_per_step=ops))
        text.append(f"=== {spec.name}: CPU (profiled) {cpu_ms:.1f} ms/step, wall {wall_ms:.1f}, GPU busy {gpu_ms:.1f}, "
                    f"{launches:.0f} kernels and {ops:.0f} aten ops per step\n")
        text.append(events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))
        text.append("most called (3 steps):\n" + events.table(sort_by="count", row_limit=25, max_name_column_width=60))
        del params, step, events
    path.write_text("\n".join(text))
    return rows


# ---------------------------------------------------------------------------------------------- report
def environment(device: str) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
        orthotune=orthotune.__version__, commit=os.environ.get("ORTHOTUNE_COMMIT", _git_commit()),
    )
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        env["peft"] = None
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    return env


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    return [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def markdown(env: dict[str, Any], shape: Shape, res: dict[str, Any]) -> str:
    lines = [
        "# orthotune efficiency benchmark",
        "",
        f"{env.get('gpu', 'cpu')}, driver {env.get('driver')}, CUDA {env.get('cuda')}; torch {env['torch']}, "
        f"transformers {env['transformers']}, peft {env['peft']}, triton {env.get('triton')}; orthotune "
        f"{env['orthotune']} ({env.get('commit')}); {env['date']}.",
        "",
        f"Random-init Llama: hidden {shape.hidden}, intermediate {shape.intermediate}, {shape.layers} layers, "
        f"{shape.heads} heads, vocab {shape.vocab}; bf16 base; batch {shape.batch} x {shape.seq}; adapters on "
        f"{', '.join(TARGETS)}; AdamW. Step time: median over {res['args']['rounds']} interleaved rounds of "
        f"{res['args']['steps']} steps after {res['args']['warmup']} warm-up steps (CUDA events); peak: "
        "max allocated memory, model included.",
        "",
    ]
    if res.get("train"):
        rows = []
        for r in res["train"]:
            note = r.get("skipped") or r.get("error") or r.get("note", "")
            if r.get("matched"):
                note = ("params matched to LoRA r16; " + note).rstrip("; ")
            rows.append([r["name"], _f(r.get("median_ms"), "{:.1f}"), _f(r.get("x_lora")), _f(r.get("x_lora_graph")),
                         _f(r.get("x_floor")), _f(r.get("peak_gib")), _f(r.get("mem_x_lora")), _f(r.get("trainable"), "{:,}"), note])
        lines += _table("Training step", ["method", "step ms", "x peft LoRA", "x peft LoRA, CUDA graph", "x floor (same mode)",
                                          "peak GiB", "mem x peft LoRA", "trainable", "note"], rows)
    if res.get("infer"):
        rows = [[r["name"], _f(r.get("prefill_median_ms")), _f(r.get("prefill_x_base"), "{:.3f}"),
                 _f(r.get("decode_median_ms")), _f(r.get("decode_x_base"), "{:.3f}")] for r in res["infer"]]
        lines += _table("Inference (no grad)", ["model", f"prefill {shape.batch}x{shape.seq} ms", "x base",
                                                f"decode ms/token (batch {shape.batch})", "x base"], rows)
    if res.get("scaling"):
        rows = [[r["sweep"], str(r["hidden"]), str(r["rank"]), r["name"], _f(r["median_ms"], "{:.1f}"), _f(r.get("x_lora")),
                 _f(r.get("x_lora_graph")), _f(r.get("x_floor")), _f(r.get("mem_x_lora")), f"{r['trainable']:,}"] for r in res["scaling"]]
        lines += _table("Scaling (2 layers, batch 4 x 1024)", ["sweep", "hidden", "rank", "method", "step ms", "x peft LoRA",
                                                                "x peft LoRA, CUDA graph",
                                                                "x floor", "mem x peft LoRA", "trainable"], rows)
    if res.get("profile"):
        rows = [[r["name"], f"{r['cpu_ms']:.1f}", f"{r['wall_ms']:.1f}", f"{r['gpu_busy_ms']:.1f}",
                 f"{r['kernels_per_step']:.0f}", f"{r['aten_ops_per_step']:.0f}"] for r in res["profile"]]
        lines += _table("Profile (3 steps under torch.profiler, which slows the host)",
                        ["method", "CPU ms/step", "wall ms/step", "GPU busy ms/step", "kernels/step", "aten ops/step"], rows)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--sections", default="train,infer,scaling,profile")
    ap.add_argument("--only", default="", help="comma-separated substrings of method names (train section)")
    ap.add_argument("--skip", default="", help="comma-separated substrings of method names to leave out (train section)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--slow-ms", type=float, default=200.0, help="methods slower than this run one round only")
    ap.add_argument("--hidden", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--ranks", type=int, nargs="*", default=[4, 64], help="rank 16 is the hidden sweep's")
    ap.add_argument("--rank-hidden", type=int, default=2048, help="hidden size of the rank sweep")
    ap.add_argument("--small", action="store_true", help="a tiny model (CPU smoke test of the harness)")
    ap.add_argument("--profile", default="", help="';'-separated exact method names for the profile section "
                    "(default: the floor, peft and orthotune LoRA, LoCO, HRA, OFT, LoCA)")
    ap.add_argument("--graph", choices=["both", "eager", "graphed"], default="both",
                    help="train rows: eager steps, steps captured in CUDA graphs (orthotune.GraphedStep), or both")
    args = ap.parse_args(argv)
    shape = Shape(hidden=64, intermediate=128, layers=2, heads=4, vocab=256, batch=2, seq=32) if args.small else Shape()
    if args.small:
        args.hidden, args.ranks, args.rank_hidden = [64, 128], [4, 8], 64
    sections = set(args.sections.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(args.device)
    print(json.dumps(env), flush=True)
    res: dict[str, Any] = dict(env=env, shape=shape.__dict__, args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    specs = train_specs()
    if args.only:
        keep = [s.strip().lower() for s in args.only.split(",")]
        specs = [s for s in specs if s.build is None or "peft lora" in s.name.lower() or any(k in s.name.lower() for k in keep)]
    if args.skip:
        drop = [s.strip().lower() for s in args.skip.split(",")]
        specs = [s for s in specs if not any(k in s.name.lower() for k in drop)]
    if args.small:
        specs = [s for s in specs if s.library != "peft" or "LoRA" in s.name]  # peft's BOFT/PSOFT need real widths
    if args.device == "cuda" and args.graph != "eager":
        specs = (specs if args.graph == "both" else []) + graphed_specs(specs)
    def save() -> None:  # after every section: a run cut short still leaves its numbers
        (args.out / "efficiency.json").write_text(json.dumps(res, indent=1, default=str))
        (args.out / "efficiency.md").write_text(markdown(env, shape, res))

    if "train" in sections:
        res["train"] = train_section(args, shape, specs, on_round=lambda rows: (res.update(train=rows), save()))
        save()
    if "infer" in sections:
        res["infer"] = infer_section(args, shape)
        save()
    if "profile" in sections and args.device == "cuda":
        names = [n.strip() for n in args.profile.split(";")] if args.profile else PROFILED
        every = train_specs() + graphed_specs(train_specs())
        chosen = [s for s in every if s.name in names and (not s.needs or s.needs in METHODS)]
        res["profile"] = profile_section(args, shape, chosen, args.out / "profile.txt")
        save()
    if "scaling" in sections:
        res["scaling"] = scaling_section(args)
        if res["scaling"]:
            plot_scaling(res["scaling"], args.out / "scaling.png", args.rank_hidden)
        save()
    print(markdown(env, shape, res))

if __name__ == "__main__":
    sys.exit(main())
