"""Issue 21, twelfth session: two A/Bs in one process, 8-layer 8B shape, NF4, 1 x 2048. (1) eager LoCO, its training
rotation as one autograd node (main, ``loco._RotateRows``) against the plain ops of the (K, U, V) core (call10's
code: ``A`` built and applied by ten recorded ops); (2) compiled LoCA, its rows from the Triton kernel (main,
``ops.fused_rows``) against the three-op gather inductor compiles itself. Labels carry the variant; every
variant's ratio is against the peft LoRA r16 row of its mode. Run from the repository root with bitsandbytes
importable; writes OUT/quantized.{json,md}."""
import contextlib
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, "benchmarks")
import quantized as q  # noqa: E402
import torch  # noqa: E402

from orthotune.methods import loco  # noqa: E402
from orthotune.ops import fused_rows  # noqa: E402


@contextlib.contextmanager
def plain_rotation():  # call10's forward: the rotation as plain ops (the autocast branch of LoCO.forward)
    own = loco.LoCO.forward

    def forward(self, x, base, core):
        A, K = self.rotation_factors(core)
        return base(loco.lowrank.apply_rows(x, A, K, A))

    loco.LoCO.forward = forward
    try:
        yield
    finally:
        loco.LoCO.forward = own


@contextlib.contextmanager
def plain_rows():
    own = fused_rows.available
    fused_rows.available = lambda table: False
    try:
        yield
    finally:
        fused_rows.available = own


out = Path(os.environ.get("OUT", "."))
device = "cuda" if torch.cuda.is_available() else "cpu"
shape = replace(q.SIZES["8B"], layers=8) if device == "cuda" else q.SMALL
batch, seq = (1, 2048) if device == "cuda" else (1, 64)
ms = q.methods(shape)
loco_label = next(k for k in ms if k.startswith("LoCO"))
res = {"env": q.environment(device), "args": {"script": __doc__.split("\n")[0]}, "rows": []}
plan = [
    ("peft LoRA r16", "", contextlib.nullcontext, False),
    (loco_label, "", contextlib.nullcontext, False),
    (loco_label, " plain ops", plain_rotation, False),
    ("LoCA n1000", "", contextlib.nullcontext, False),
    ("peft LoRA r16", "", contextlib.nullcontext, False),
    (loco_label, "", contextlib.nullcontext, False),
    (loco_label, " plain ops", plain_rotation, False),
    ("peft LoRA r16", "", contextlib.nullcontext, True),
    ("LoCA n1000", "", contextlib.nullcontext, True),
    ("LoCA n1000", " plain rows", plain_rows, True),
    (loco_label, "", contextlib.nullcontext, True),
    ("peft LoRA r16", "", contextlib.nullcontext, True),
    ("LoCA n1000", "", contextlib.nullcontext, True),
    ("LoCA n1000", " plain rows", plain_rows, True),
]
for label, variant, context, compiled in plan:
    with context():
        row = q.run(shape, label, ms[label], batch, seq, device, compiled, 2, 5)
    row["method"] += variant
    row["section"] = "main"
    res["rows"].append(row)
    print(json.dumps(row), flush=True)
    (out / "quantized.json").write_text(json.dumps(res, indent=1))
(out / "quantized.md").write_text(q.markdown(res))
print(q.markdown(res))
