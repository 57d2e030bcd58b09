"""Peak memory and step time of training adapters on a 4-bit (QLoRA-style) Llama, orthotune against peft.

    python benchmarks/quantized.py --out benchmarks/results/quantized   # one GPU (an H200: ~6 min)
    python benchmarks/quantized.py --small --out /tmp/q                  # CPU smoke test at a tiny size

Model: Llama-3-8B-shaped (hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocab 128256), random
init, built in bf16 and every decoder projection replaced by a bitsandbytes ``Linear4bit`` (NF4, double
quantisation, bf16 compute), as ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)`` loads it. ``--layers`` decoder
layers (default 8: one call holds every method, both batch shapes, eager and compiled); the per-layer
figures (memory and time of one more layer, from the size sweep) scale the numbers to 32 layers.
Each library gets its own preparation, as its users run it: peft's ``prepare_model_for_kbit_training``
(every non-quantised parameter in float32: norms, embeddings, head) and orthotune's (the same, but the untied
input embeddings left in bf16 with a float32 output: the same numbers); both turn on activation
checkpointing with input gradients. "peft LoRA r16, orthotune prep" is peft's LoRA on orthotune's
preparation, so that the adapters alone compare too. Adapters on all 7 projections, AdamW.

Sections: ``main`` (batch 1 x 2048 and 4 x 1024, eager and per-layer ``torch.compile``; peft LoRA r16
and peft OFT b32 against orthotune LoRA r16, LoCO at LoRA r16's parameters, OFT b32, HRA r8, LoCA) and
``sizes`` (1B, 3B and 8B Llama-3 shapes at full depth, batch 1 x 2048, eager: the memory-vs-size plot).
Writes quantized.json (after every run, so a cut-short call keeps what it measured), quantized.md and
memory_vs_size.png under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).parent))
import efficiency as eff  # noqa: E402

import orthotune  # noqa: E402
from orthotune.training.graphs import compile_settings  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 128256


SIZES = {
    "1B": Shape("1B", 2048, 8192, 16, 32, 8),
    "3B": Shape("3B", 3072, 8192, 28, 24, 8),
    "8B": Shape("8B", 4096, 14336, 32, 32, 8),
}
SMALL = Shape("small", 64, 192, 2, 4, 2, vocab=256)


def quantize_linears(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every decoder nn.Linear by an NF4 double-quantised Linear4bit (transformers' bnb loading, done in place)."""
    count = 0
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, attr = name.rpartition(".")
            setattr(model.model.layers.get_submodule(parent) if parent else model.model.layers, attr,
                    nf4_linear(module, compute_dtype))
            count += 1
    return count


def nf4_linear(module: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """``module`` as a frozen NF4 double-quantised ``Linear4bit`` on its weight's device."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(
        module.in_features, module.out_features, bias=module.bias is not None, compute_dtype=compute_dtype,
        compress_statistics=True, quant_type="nf4", device="meta",
    )
    w = module.weight.data
    q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q)
    q.weight = q.weight.to(w.device)  # quantises
    if module.bias is not None:
        q.bias = nn.Parameter(module.bias.data, requires_grad=False)
    return q


def make_model(shape: Shape, device: str) -> nn.Module:
    """A random Llama of ``shape`` in bf16 with 4-bit projections (each method's build prepares it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
        max_position_embeddings=4096, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    quantize_linears(model, dtype)
    model.is_loaded_in_4bit = True  # as transformers' 4-bit loading marks it (peft's preparation reads it)
    return model


def prepare(model: nn.Module, library: str) -> nn.Module:
    """``library``'s prepare_model_for_kbit_training, with non-reentrant activation checkpointing."""
    kwargs = {"use_reentrant": False}
    if library == "peft":
        import peft

        return peft.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs=kwargs)
    return orthotune.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs=kwargs)


def _ot(name: str, **kw: Any) -> Callable[[nn.Module], nn.Module]:
    return lambda m: orthotune.get_model(prepare(m, "orthotune"), getattr(orthotune, name)(target_modules=TARGETS, **kw))


def _peft(name: str, preparation: str = "peft", **kw: Any) -> Callable[[nn.Module], nn.Module]:
    def build(m: nn.Module) -> nn.Module:
        import peft

        return peft.get_peft_model(prepare(m, preparation), getattr(peft, name)(target_modules=TARGETS, **kw))

    return build


def loco_rank_matched(shape: Shape) -> int:
    """LoCO's rank whose trainable parameters come closest to LoRA r16's on the 7 projections."""
    h, i, kv = shape.hidden, shape.intermediate, shape.hidden * shape.kv_heads // shape.heads
    lora = 16 * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))
    per_rank = 2 * 4 * (6 * h + i)  # LoCO: 2 * chain_length (4, the default) * rank * d_in per layer
    return max(1, round(lora / per_rank))


def methods(shape: Shape) -> dict[str, Callable[[nn.Module], nn.Module]]:
    return {
        "peft LoRA r16": _peft("LoraConfig", r=16, lora_alpha=16),
        "peft OFT b32": _peft("OFTConfig", oft_block_size=32, r=0),
        "peft LoRA r16, orthotune prep": _peft("LoraConfig", "orthotune", r=16, lora_alpha=16),
        "LoRA r16": _ot("LoRAConfig", r=16, lora_alpha=16),
        f"LoCO r{loco_rank_matched(shape)} (=LoRA r16 params)": _ot("LoCOConfig", rank=loco_rank_matched(shape)),
        "OFT b32": _ot("OFTConfig", oft_block_size=32),
        "HRA r8": _ot("HRAConfig", r=8),
        "LoCA n1000": _ot("LoCAConfig", n_frequency=1000),
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def mode_label(compiled: bool, autocast: bool) -> str:
    """A run's mode as the tables name it: eager or compiled, with or without autocast."""
    return ("compiled" if compiled else "eager") + (", autocast bf16" if autocast else "")


def training(shape: Shape, build: Callable[[nn.Module], nn.Module], batch: int, seq: int, device: str, compiled: bool,
             autocast: bool) -> tuple[nn.Module, list[nn.Parameter], Callable[[], torch.Tensor]]:
    """The adapted model (its decoder layers compiled one by one if ``compiled``), its trainable parameters and one
    AdamW training step on a fixed batch (returns the loss). ``autocast``: forward and loss under
    ``torch.autocast(bfloat16)``, as ``Trainer(bf16=True)`` trains."""
    model = build(make_model(shape, device))
    model.train()
    if compiled:  # a fresh compiler cache per run, as a user's process has: graphs of earlier runs would make
        # dynamo recompile this one with dynamic shapes, and past its recompile limit run it eagerly
        torch._dynamo.reset()
        counters.clear()
        for layer in model.get_base_model().model.layers:
            layer.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, shape.vocab, (batch, seq), device=device, generator=torch.Generator(device).manual_seed(0))

    def step() -> torch.Tensor:
        # compile_settings: transformers >= 5.25's layers set a context variable dynamo refuses inside a checkpoint
        # (docs/speed.md); without it every checkpointed layer runs eagerly, for peft as for orthotune
        with compile_settings(compiled), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, params, step


def run(shape: Shape, label: str, build: Callable[[nn.Module], nn.Module], batch: int, seq: int, device: str,
        compiled: bool, warmup: int, steps: int, autocast: bool = False) -> dict[str, Any]:
    """Build, adapt, train ``warmup + steps`` steps (:func:`training`); peak memory (model included) and median step time."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    model, params, step = training(shape, build, batch, seq, device, compiled, autocast)
    build_s = time.perf_counter() - t0
    if device == "cuda":  # the peak of training, not of building (a bf16 model is quantised after it is built)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    model_gib = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None
    times, losses = [], []
    for i in range(warmup + steps):
        _sync(device)
        t = time.perf_counter()
        loss = step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        losses.append(loss.item())
    row = {
        "shape": shape.name, "layers": shape.layers, "method": label, "batch": f"{batch}x{seq}",
        "mode": mode_label(compiled, autocast), "trainable": sum(p.numel() for p in params),
        "step_ms": 1000 * statistics.median(times), "build_s": build_s, "loss_first": losses[0], "loss_last": losses[-1],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None, "model_gib": model_gib,
        "embedding_dtype": str(model.get_base_model().get_input_embeddings().weight.dtype).removeprefix("torch."),
        "head_dtype": str(model.get_base_model().get_output_embeddings().weight.dtype).removeprefix("torch."),
    }
    if compiled:  # what dynamo compiled over all steps: one graph for every layer, no break, is the expected
        row.update(eff.dynamo_counts())
    del model, step, params
    return row


def environment(device: str) -> dict[str, Any]:
    import bitsandbytes
    import peft
    import transformers

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__, "orthotune": orthotune.__version__, "device": device,
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def markdown(res: dict[str, Any]) -> str:
    env = res["env"]
    lines = [
        "# 4-bit base (NF4, double quantisation, bf16 compute): orthotune vs peft", "",
        f"{env.get('gpu', env['device'])}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
        f"bitsandbytes {env['bitsandbytes']}; {env['date']}. Adapters on all 7 projections, activation checkpointing, "
        "AdamW; each library's own prepare_model_for_kbit_training (embeddings / head: the input embeddings' and "
        "output head's dtypes after it); ratios "
        "against peft LoRA r16 in the same batch shape and mode (\"autocast bf16\": forward and loss under "
        "torch.autocast, as Trainer(bf16=True) runs, for both libraries).", "",
    ]
    main = [r for r in res["rows"] if r["section"] == "main" and "error" not in r]
    for batch in sorted({r["batch"] for r in main}):
        for mode in dict.fromkeys(r["mode"] for r in main):
            rows = [r for r in main if r["batch"] == batch and r["mode"] == mode]
            if not rows:
                continue
            ref = next((r for r in rows if r["method"] == "peft LoRA r16"), None)
            lines += [f"## {rows[0]['shape']} shape, {rows[0]['layers']} layers, batch {batch}, {mode}", "",
                      "| method | embeddings / head | trainable | peak GiB | x peft LoRA | step ms | x peft LoRA |",
                      "|---|---|---|---|---|---|---|"]
            for r in rows:
                mem = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
                mem_x = "-" if ref is None or r["peak_gib"] is None else f"{r['peak_gib'] / ref['peak_gib']:.3f}"
                time_x = "-" if ref is None else f"{r['step_ms'] / ref['step_ms']:.3f}"
                dtypes = f"{r.get('embedding_dtype', '-')} / {r.get('head_dtype', '-')}"
                lines.append(f"| {r['method']} | {dtypes} | {r['trainable']:,} | {mem} | {mem_x} "
                             f"| {r['step_ms']:.1f} | {time_x} |")
            lines.append("")
    sizes = [r for r in res["rows"] if r["section"] == "sizes" and "error" not in r]
    if sizes:
        lines += ["## Memory vs model size (full depth, batch 1 x 2048, eager)", "",
                  "| shape | layers | method | peak GiB | step ms |", "|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['layers']} | {r['method']} | {r['peak_gib'] or 0:.2f} | {r['step_ms']:.1f} |" for r in sizes]
        lines.append("")
    per_layer = res.get("per_layer")
    if per_layer:
        lines += ["## One more 8B-shaped layer costs (from the 8-layer and 32-layer runs, batch 1 x 2048, eager)", "",
                  "| method | GiB per layer | ms per layer |", "|---|---|---|"]
        lines += [f"| {m} | {v['gib']:.3f} | {v['ms']:.1f} |" for m, v in per_layer.items()]
        lines.append("")
    errors = [r for r in res["rows"] if "error" in r]
    if errors:
        lines += ["## Runs that failed", ""] + [f"- {r['method']} {r['batch']} {r['mode']}: {r['error']}" for r in errors] + [""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"] for r in rows}):
        pts = [(r["shape"], r["peak_gib"]) for r in rows if r["method"] == method and r["peak_gib"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xlabel("Llama-3 shape (NF4 base)")
    ax.set_ylabel("peak GPU memory, GiB (batch 1 x 2048)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def per_layer(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Slope between the main 8B-shaped run (few layers) and the full 32-layer run, batch 1 x 2048, eager."""
    out = {}
    for full in [r for r in rows if r["section"] == "sizes" and r["shape"] == "8B" and "error" not in r]:
        part = next((r for r in rows if r["section"] == "main" and r["method"] == full["method"] and r["batch"] == "1x2048"
                     and r["mode"] == "eager" and "error" not in r), None)
        if part and full["peak_gib"] and part["layers"] != full["layers"]:
            n = full["layers"] - part["layers"]
            out[full["method"]] = {"gib": (full["peak_gib"] - part["peak_gib"]) / n, "ms": (full["step_ms"] - part["step_ms"]) / n}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/quantized"))
    ap.add_argument("--sections", default="main,sizes")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the 8B-shaped model in the main section")
    ap.add_argument("--batches", default="1x2048,4x1024")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--only", default="", help="comma-separated substrings of method names")
    ap.add_argument("--size-methods", default="peft LoRA r16,LoRA r16,LoCO,OFT b32")
    ap.add_argument("--compiled-methods", default="peft LoRA r16,LoRA r16,LoCO,OFT b32,HRA r8,LoCA")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--deadline", type=float, default=0.0, help="seconds: start no run after this (0: none)")
    ap.add_argument("--small", action="store_true", help="a tiny model on the CPU (harness smoke test)")
    ap.add_argument("--autocast", action="store_true", help="train every method under torch.autocast(bfloat16)")
    args = ap.parse_args(argv)

    device = "cpu" if args.small or not torch.cuda.is_available() else "cuda"
    main_shape = SMALL if args.small else replace(SIZES["8B"], layers=args.layers)
    sizes = [replace(SMALL, name=n, layers=k) for n, k in (("1B", 1), ("3B", 2), ("8B", 3))] if args.small else list(SIZES.values())
    seq_scale = 16 if args.small else 1
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"env": environment(device), "args": {k: str(v) for k, v in vars(args).items()},
                           "main_shape": asdict(main_shape), "rows": []}

    # eager main runs first, then the size sweep, then the compiled runs (the first cut by --deadline)
    plan: list[tuple[str, Shape, str, Callable, int, int, bool]] = []
    only = [s for s in args.only.split(",") if s]
    compiled_only = [s for s in args.compiled_methods.split(",") if s]
    main_runs = [
        (mode == "compiled", int(b.split("x")[0]), int(b.split("x")[1]) // seq_scale)
        for mode in args.modes.split(",") for b in args.batches.split(",")
    ]
    if "main" in args.sections:
        for compiled, batch, seq in [r for r in main_runs if not r[0]]:
            plan += [("main", main_shape, label, build, batch, seq, False) for label, build in methods(main_shape).items()
                     if not only or any(s in label for s in only)]
    if "sizes" in args.sections:
        wanted = [s for s in args.size_methods.split(",") if s]
        for shape in sizes:
            plan += [("sizes", shape, label.split(" (")[0], build, 1, 2048 // seq_scale, False)
                     for label, build in methods(shape).items() if any(label.startswith(s) for s in wanted)]
    if "main" in args.sections:
        for compiled, batch, seq in [r for r in main_runs if r[0]]:
            plan += [("main", main_shape, label, build, batch, seq, True) for label, build in methods(main_shape).items()
                     if (not only or any(s in label for s in only)) and any(label.startswith(s) for s in compiled_only)]

    for section, shape, label, build, batch, seq, compiled in plan:
        if args.deadline and time.perf_counter() - start > args.deadline:
            print(f"deadline: skipped {section} {label} {batch}x{seq}", flush=True)
            continue
        try:
            row = run(shape, label, build, batch, seq, device, compiled, args.warmup, args.steps, args.autocast)
        except Exception as e:  # a failed run is a result too (e.g. out of memory, a compile error)
            traceback.print_exc()
            row = {"shape": shape.name, "layers": shape.layers, "method": label, "batch": f"{batch}x{seq}",
                   "mode": mode_label(compiled, args.autocast), "error": f"{type(e).__name__}: {str(e)[:300]}"}
        row["section"] = section
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        res["per_layer"] = per_layer(res["rows"])
        (args.out / "quantized.json").write_text(json.dumps(res, indent=1))
    (args.out / "quantized.md").write_text(markdown(res))
    size_rows = [r for r in res["rows"] if r["section"] == "sizes" and "error" not in r]
    if size_rows:
        plot(size_rows, args.out / "memory_vs_size.png")
    print(markdown(res))


if __name__ == "__main__":
    main()
