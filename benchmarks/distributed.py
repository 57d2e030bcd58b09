"""Multi-GPU scaling of LoCO training: DDP and FSDP2 on N GPUs against one GPU.

    python benchmarks/distributed.py --gpus 2 --out benchmarks/results     # a 2-GPU machine (~3 min)
    python benchmarks/distributed.py --small --gpus 2 --out /tmp/dist      # CPU check of the harness (gloo)

Model: the efficiency benchmark's (``benchmarks/efficiency.py``: a randomly initialised Llama-style
causal LM, hidden 2048, intermediate 5632, 8 layers, vocab 32000, bf16 base), LoCO k4 r4 (exact,
parallel) on all 7 projections, AdamW. Weak scaling: every GPU trains ``batch x seq`` tokens per
step, so N GPUs train N times the tokens of one. Per run: median step time over the timed steps
(the slowest rank's, host clock after a device sync), tokens/s of the whole run, scaling efficiency
``tokens/s(N) / (N * tokens/s(1))`` and peak allocated memory of every rank (model included).

Each run is a separate ``torchrun`` launch of this script (``--worker``), so runs share no memory.
NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``, ...), as the device machines require. Writes
``distributed.json`` and ``distributed.md`` under ``--out`` and prints the markdown table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficiency import TARGETS, Shape, make_model  # noqa: E402  (the same model as the efficiency benchmark)

import orthotune  # noqa: E402
from orthotune.training import distributed  # noqa: E402

SMALL = Shape(hidden=64, intermediate=176, layers=2, heads=4, vocab=256, batch=2, seq=32)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def worker(args: argparse.Namespace) -> None:
    """One rank of one run: train, time, and (rank 0) write the run's row to ``--part``."""
    cuda = torch.cuda.is_available() and not args.small
    distributed.init("cuda" if cuda else "cpu")
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    shape = SMALL if args.small else Shape()
    model = make_model(shape, device)
    model = orthotune.get_model(model, orthotune.LoCOConfig(target_modules=TARGETS, chain_length=4, rank=4))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    wrapped = distributed.wrap(model, args.strategy)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1 + distributed.rank())  # each rank its own tokens
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen).to(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step() -> float:
        t0 = time.perf_counter()
        loss = wrapped(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t = torch.tensor([step()], dtype=torch.float64)
        if distributed.world_size() > 1:  # a step lasts until its slowest rank is done
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        times.append(float(t))
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")], dtype=torch.float64)
    peaks = [torch.zeros_like(peak) for _ in range(distributed.world_size())]
    if distributed.world_size() > 1:
        torch.distributed.all_gather(peaks, peak)
    else:
        peaks = [peak]
    if distributed.is_main_process():
        median = statistics.median(times)
        world = distributed.world_size()
        row = {
            "strategy": args.strategy, "gpus": world, "step_ms": 1e3 * median,
            "tokens_per_step": world * shape.batch * shape.seq, "tokens_per_s": world * shape.batch * shape.seq / median,
            "peak_gib_per_rank": [float(p) for p in peaks], "trainable": trainable,
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        }
        Path(args.part).write_text(json.dumps(row) + "\n")
    distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, strategy: str, n: int, part: Path) -> dict[str, Any] | None:
    """One run under torchrun; its row, or None (with the error printed) if it failed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(_free_port()),
           __file__, "--worker", "--strategy", strategy, "--part", str(part),
           "--warmup", str(args.warmup), "--steps", str(args.steps)] + (["--small"] if args.small else [])
    env = {**os.environ, **NO_MULTICAST, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    src = Path(__file__).resolve().parents[1] / "src"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not part.is_file():
        print(f"{strategy} on {n}: failed\n{proc.stderr[-4000:]}", file=sys.stderr)
        return None
    return json.loads(part.read_text())


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# LoCO multi-GPU scaling ({meta['model']})", "",
        f"{meta['date']}; {meta['device']}; torch {meta['torch']}; orthotune {meta['orthotune']}; "
        f"{meta['per_gpu_tokens']} tokens per GPU per step (weak scaling); median of {meta['steps']} steps after "
        f"{meta['warmup']} warm-up steps.", "",
        "| run | processes (GPUs) | step (ms) | tokens/s | scaling efficiency | peak memory per GPU (GiB) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        eff = f"{100 * r['efficiency']:.1f}%" if r.get("efficiency") is not None else "-"
        mem = ", ".join(f"{p:.2f}" for p in r["peak_gib_per_rank"]) if not meta["small"] else "- (CPU)"
        lines.append(f"| {r['strategy']} | {r['gpus']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {eff} | {mem} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2, help="processes of the multi-GPU runs")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--small", action="store_true", help="a tiny model on the CPU (gloo): checks the harness")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strategies", default="ddp,fsdp")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if not args.small and torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"{args.gpus} GPUs requested, {torch.cuda.device_count()} visible; use --small for a CPU check")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [("none", 1)] + [(s, args.gpus) for s in args.strategies.split(",")]
    rows = []
    for strategy, n in runs:
        row = launch(args, strategy, n, out / f".distributed-{strategy}-{n}.json")
        (out / f".distributed-{strategy}-{n}.json").unlink(missing_ok=True)
        if row is not None:
            rows.append(row)
    single = next((r for r in rows if r["gpus"] == 1), None)
    for r in rows:
        r["efficiency"] = r["tokens_per_s"] / (r["gpus"] * single["tokens_per_s"]) if single else None
    shape = SMALL if args.small else Shape()
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": rows[0]["device"] if rows else "?", "torch": torch.__version__, "orthotune": orthotune.__version__,
        "model": f"Llama-style hidden {shape.hidden}, {shape.layers} layers, bf16; LoCO k4 r4 on {len(TARGETS)} projections",
        "per_gpu_tokens": shape.batch * shape.seq, "steps": args.steps, "warmup": args.warmup, "small": args.small,
    }
    (out / "distributed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = markdown(rows, meta)
    (out / "distributed.md").write_text(table)
    print(table)
    if len(rows) != len(runs):
        raise SystemExit("some runs failed (see above)")


if __name__ == "__main__":
    main()
