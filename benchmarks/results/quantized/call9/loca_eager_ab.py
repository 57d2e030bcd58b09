"""Issue 21, eleventh session: where eager LoCA's excess over peft LoRA goes. 8-layer 8B shape, NF4, 1 x 2048,
eager: peft LoRA r16, LoCA n1000 (main) and LoCA with its update added in place to the base output (one pass over
the float32 output instead of a cast and an add). Run from the repository root with bitsandbytes importable;
writes OUT/quantized.{json,md}."""
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, "benchmarks")
import quantized as q  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from orthotune.methods import spectral as sp  # noqa: E402
from orthotune.ops import spectral  # noqa: E402

main_forward = sp.SparseSpectrum.forward


def inplace_forward(self, x, base, core):  # main's forward, its last line an in-place add
    P, Q, c = self.rows(core)
    W = base.weight if isinstance(self.dropout, nn.Identity) or not self.training else None
    tokens = x.numel() // max(x.shape[-1], 1)
    dense = spectral.prefers_dense(tokens, c.shape[0], self.d_in, self.d_out, torch.is_grad_enabled() and c.requires_grad, merged=W is not None)
    if dense and W is not None:
        return F.linear(x, spectral.add_sparse_delta(W, P, Q, c))
    path = self.core_dtype(x.dtype, base)
    update = spectral.sparse_apply(self.dropout(x).to(path), P.to(path), Q.to(path), c.to(path), compute="dense" if dense else "lowrank")
    return base(x).add_(update)


out = Path(os.environ.get("OUT", "."))
device = "cuda" if torch.cuda.is_available() else "cpu"
shape = replace(q.SIZES["8B"], layers=8) if device == "cuda" else q.SMALL
batch, seq = (1, 2048) if device == "cuda" else (1, 64)
ms = q.methods(shape)
res = {"env": q.environment(device), "args": {"script": __doc__.split("\n")[0]}, "rows": []}
for label, forward in (("peft LoRA r16", main_forward), ("LoCA n1000", main_forward), ("LoCA n1000 in-place add", inplace_forward),
                       ("peft LoRA r16", main_forward), ("LoCA n1000", main_forward)):
    sp.SparseSpectrum.forward = forward
    try:
        row = q.run(shape, label, ms[label.replace(" in-place add", "")], batch, seq, device, False, 2, 5)
    finally:
        sp.SparseSpectrum.forward = main_forward
    row["section"] = "main"
    res["rows"].append(row)
    print(json.dumps(row), flush=True)
    (out / "quantized.json").write_text(json.dumps(res, indent=1))
(out / "quantized.md").write_text(q.markdown(res))
print(q.markdown(res))
