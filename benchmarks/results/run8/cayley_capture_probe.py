"""Run 8, call 2: which batched Cayley solves capture in a CUDA graph (see probes.md). Run from a carry folder."""
import subprocess, sys
code = r'''
import sys, torch
sys.path.insert(0, "src")
from orthotune.ops.cayley import cayley
backend, n, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if backend != "default":
    torch.backends.cuda.preferred_linalg_library(backend)
X = torch.randn(batch, n, n, device="cuda") * 0.1
Q = (X - X.transpose(-1, -2)).requires_grad_()
s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    for _ in range(2):
        cayley(Q).square().sum().backward()
torch.cuda.current_stream().wait_stream(s)
g = torch.cuda.CUDAGraph()
Q.grad = None
try:
    with torch.cuda.graph(g):
        out = cayley(Q).square().sum(); out.backward()
    g.replay(); torch.cuda.synchronize()
    print("OK", float(out))
except Exception as e:
    print("FAIL", type(e).__name__, str(e).splitlines()[0])
'''
for backend in ["default", "cusolver"]:
    for n, batch in [(16, 112), (16, 3584), (32, 3584), (64, 1792), (32, 8), (8, 56)]:
        r = subprocess.run([sys.executable, "-c", code, backend, str(n), str(batch)], capture_output=True, text=True)
        last = (r.stdout.strip().splitlines() or r.stderr.strip().splitlines() or ["?"])[-1]
        print(f"probe {backend} n={n} batch={batch}: {last}", flush=True)
