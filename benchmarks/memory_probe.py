"""Where a training step's peak memory goes, on the CPU: orthotune's methods against peft LoRA r16 (issue 21).

    python benchmarks/memory_probe.py --out DIR                          # hidden 1024, 2 layers, seq 256 (~4 min)
    python benchmarks/memory_probe.py --out DIR --hidden 512 --intermediate 1792 --seq 128

The GPU table (``benchmarks/quantized.py``) measures peak memory but cannot say what is live at the peak. This
probe runs one training step (after a first one, so AdamW's state exists) of the table's model at a smaller
shape (``quantized.make_model``: NF4 projections through bitsandbytes' CPU kernels, bf16 compute, each library's
``prepare_model_for_kbit_training`` as in the table, activation checkpointing), all 7 projections adapted,
under ``torch.profiler`` with ``profile_memory=True``, replays the profiler's allocation timeline (``torch.profiler._memory_profiler.MemoryProfile``: a private API,
torch 2.14), and reports the peak of live CPU bytes, what is live then by the profiler's categories, and the
largest groups of activations and autograd intermediates by the op that made them. Allocations are the same
on a GPU but for library workspaces (cuBLAS), which is what makes the CPU a fair place to find differences
between methods; absolute figures are not the GPU's. Writes ``memory_probe.json`` and ``memory_probe.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import quantized  # noqa: E402  (the 8B table's method list and LoCO's matched rank)


PROBED = ("peft LoRA r16", "LoRA r16", "LoCO", "OFT b32", "HRA r8")  # label prefixes of quantized.methods()
DETAIL = ("ACTIVATION", "AUTOGRAD_DETAIL", "TEMPORARY", "unknown")


def methods(shape: quantized.Shape) -> dict[str, Callable[[nn.Module], nn.Module]]:
    """The 8B table's methods (``quantized.methods``: same configurations, all 7 projections) but peft OFT and LoCA."""
    return {label: build for label, build in quantized.methods(shape).items() if label.startswith(PROBED)}


def peak_of_step(model: nn.Module, ids: torch.Tensor) -> dict[str, Any]:
    """One profiled AdamW step (after an unprofiled one): peak live bytes, by category, and its largest groups."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    mp = prof._memory_profile()
    live: dict[str, int] = {}
    size: dict[Any, int] = {}
    category: dict[Any, str] = {}
    peak, at_peak, keys_at_peak = 0, {}, {}
    for _, action, (key, version), nbytes in mp.timeline:
        if key.device.type != "cpu":
            continue
        cat = mp._categories.get(key, version)
        name = cat.name if cat is not None else "unknown"
        if action.name in ("PREEXISTING", "CREATE", "INCREMENT_VERSION"):
            if key in category:  # a new version replaces the old one's bytes
                live[category[key]] -= size[key]
            live[name] = live.get(name, 0) + nbytes
            size[key], category[key] = nbytes, name
        elif action.name == "DESTROY" and key in category:
            live[category.pop(key)] -= size.pop(key)
        total = sum(live.values())
        if total > peak:
            peak, at_peak, keys_at_peak = total, dict(live), {k: (category[k], size[k]) for k in category}
    maker = {}
    for node in mp._data_flow_graph.flow_nodes:
        for key in node.outputs:
            maker.setdefault(key, node._event.name)
    groups: dict[tuple[str, str], list[int]] = {}
    for key, (cat, nbytes) in keys_at_peak.items():
        if cat in DETAIL:
            g = groups.setdefault((cat, maker.get(key, "?")), [0, 0])
            g[0] += nbytes
            g[1] += 1
    top = sorted(groups.items(), key=lambda kv: -kv[1][0])[:8]
    return {"peak_mib": peak / 2**20, "by_category_mib": {k: v / 2**20 for k, v in sorted(at_peak.items()) if v},
            "largest": [{"category": c, "made_by": op, "mib": b / 2**20, "tensors": n} for (c, op), (b, n) in top]}


def markdown(res: dict[str, Any]) -> str:
    s = res["shape"]
    ref = res["rows"].get("peft LoRA r16", {}).get("peak_mib")
    lines = ["# Peak memory of one training step on the CPU (`benchmarks/memory_probe.py`)", "",
             f"torch {res['torch']}, peft {res['peft']}; random Llama {s['layers']} x {s['hidden']} (intermediate "
             f"{s['intermediate']}), NF4 projections, bf16 compute, activation checkpointing, batch 1 x {res['seq']}, all 7 projections, AdamW.", "",
             "| method | peak MiB | x peft LoRA r16 | live at the peak (MiB) |", "|---|---|---|---|"]
    for name, r in res["rows"].items():
        cats = ", ".join(f"{k} {v:.2f}" for k, v in r["by_category_mib"].items())
        lines.append(f"| {name} | {r['peak_mib']:.2f} | {r['peak_mib'] / ref:.3f} | {cats} |")
    lines += ["", "Largest groups of activations and autograd intermediates live at the peak:", ""]
    for name, r in res["rows"].items():
        lines.append(f"- {name}: " + "; ".join(f"{g['category']} from {g['made_by']} {g['mib']:.2f} MiB ({g['tensors']})"
                                               for g in r["largest"][:5]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=1024, help="128256 for Llama-3's embeddings and head")
    ap.add_argument("--only", default="", help="comma-separated substrings of method names (peft LoRA r16 always runs)")
    args = ap.parse_args(argv)
    import peft

    shape = quantized.Shape(name="probe", hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                            heads=max(1, args.hidden // 128), kv_heads=max(1, args.hidden // 512), vocab=args.vocab)
    ids = torch.randint(0, shape.vocab, (1, args.seq), generator=torch.Generator().manual_seed(0))
    res: dict[str, Any] = {"torch": torch.__version__, "peft": peft.__version__, "shape": vars(shape), "seq": args.seq, "rows": {}}
    keep = [k.strip().lower() for k in args.only.split(",") if k.strip()]
    for name, build in methods(shape).items():
        if name != "peft LoRA r16" and keep and not any(k in name.lower() for k in keep):
            continue
        model = build(quantized.make_model(shape, "cpu")).train()
        res["rows"][name] = peak_of_step(model, ids)
        print(f"{name}: peak {res['rows'][name]['peak_mib']:.2f} MiB", flush=True)
        del model
        gc.collect()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_probe.json").write_text(json.dumps(res, indent=1))
    (args.out / "memory_probe.md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
