"""Call 10: compiled autocast steps at 1 x 2048 on the 8-layer NF4 model: peft LoRA, orthotune LoRA with and
without its per-step plan, LoCO without it (run from the repository root; prints one JSON line per run)."""
import json, sys
from dataclasses import replace
sys.path.insert(0, "benchmarks")
import quantized as q
shape = replace(q.SIZES["8B"], layers=8)
ms = q.methods(shape)
def noplan(build):
    def b(m):
        model = build(m)
        model.plan.detach()
        return model
    return b
loco = [k for k in ms if k.startswith("LoCO")][0]
runs = [("peft LoRA r16", ms["peft LoRA r16"]), ("LoRA r16 plan", ms["LoRA r16"]), ("LoRA r16 no plan", noplan(ms["LoRA r16"])),
        ("LoCO no plan", noplan(ms[loco]))]
for label, build in runs:
    r = q.run(shape, label, build, 1, 2048, "cuda", True, 2, 3, autocast=True)
    print(json.dumps({k: r[k] for k in ("method", "step_ms", "peak_gib", "graphs", "graph_breaks", "recompiles")}), flush=True)
