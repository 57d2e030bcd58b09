"""Issue 21, tenth session: LoCO's per-step cores recomputed in the backward (the step keeps only its parameters,
main's code) against the same cores keeping their float32 intermediates all step (the code before), beside peft
LoRA r16 and orthotune LoRA r16: 8-layer 8B shape, NF4, checkpointing, both batch shapes, eager and per-layer
compiled. Run from the repository root with bitsandbytes importable; writes OUT/quantized.{json,md}."""
import json
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, "benchmarks")
import quantized as q  # noqa: E402
import torch  # noqa: E402

from orthotune.methods import base, lora, loco  # noqa: E402


def stacked_lora_cores(cls, modules, dtype=None):  # LoRA's cores before a95292d: stacked copies, always
    A = torch.stack([m.lora_A for m in modules])
    B = torch.stack([m.lora_B for m in modules])
    return base.split((A, modules[0].scaling * B), dtype)

out = Path(os.environ.get("OUT", "."))
deadline = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
device = "cuda" if torch.cuda.is_available() else "cpu"
shape = replace(q.SIZES["8B"], layers=8) if device == "cuda" else q.SMALL  # the CPU: a smoke test of this script
ms = q.methods(shape)
name = next(k for k in ms if k.startswith("LoCO"))
runs = [("peft LoRA r16", False), ("LoRA r16", False), ("LoRA r16", True), (name, False), (name, True)]
res = {"env": q.environment(device), "args": {"script": __doc__.split("\n")[0], "deadline": deadline}, "rows": []}
start, recomputed, lora_cores = time.perf_counter(), loco.recomputed, lora.LoRA.__dict__["cores"]
for compiled in (False, True) if device == "cuda" else (False,):
    for batch, seq in ((1, 2048), (4, 1024)) if device == "cuda" else ((1, 64),):
        for label, keep in runs:
            shown = label + ((" stacked cores (before)" if label.startswith("LoRA") else " keeping its intermediates (before)") if keep else "")
            if deadline and time.perf_counter() - start > deadline:
                print(f"deadline: skipped {shown} {batch}x{seq} compiled={compiled}", flush=True)
                continue
            loco.recomputed = (lambda fn, *tensors: fn(*tensors)) if keep and label == name else recomputed
            lora.LoRA.cores = classmethod(stacked_lora_cores) if keep and label == "LoRA r16" else lora_cores
            try:
                row = q.run(shape, shown, ms[label], batch, seq, device, compiled, 2, 3)
            except Exception as e:  # a failed run is a result too
                traceback.print_exc()
                row = {"shape": shape.name, "layers": shape.layers, "method": shown, "batch": f"{batch}x{seq}",
                       "mode": q.mode_label(compiled, False), "error": f"{type(e).__name__}: {str(e)[:300]}"}
            finally:
                loco.recomputed, lora.LoRA.cores = recomputed, lora_cores
            row["section"] = "main"
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            (out / "quantized.json").write_text(json.dumps(res, indent=1))
(out / "quantized.md").write_text(q.markdown(res))
print(q.markdown(res))
