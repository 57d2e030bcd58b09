"""Long low-precision training keeps exact rotations orthogonal: 2,000 Adam steps at lr 5e-2 per case.

Every case with ``orthogonal=True`` (tests/method_cases.py) trains one 24x24 layer in bfloat16 and
one in float16 with its adapter parameters stored in that low precision (``autocast_adapter_dtype
=False``: the hard case; the default keeps them in float32), towards a random rotation it cannot
reach, so the optimizer keeps pushing for every step. Afterwards the rotation each method
applies (its core is computed in float32) must be orthogonal within 1e-3 in the spectral norm and
within 1e-3 of the float64 reference: the same trained parameters evaluated in float64.

Each rotation is recomputed from its parameters at every step (nothing accumulates across steps),
so what long training can break is the parameters it reaches: an Adam step moves a parameter by at
most about lr, and 2,000 steps at 5e-2 allow the same travel (100 per entry) as the 10,000 steps at
1e-2 this test ran before, in a fifth of the time.

All layers of all cases train in one model (one loss, one backward, one step per optimizer), split
over up to 4 worker processes; the time goes into the methods' per-layer cores.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import orthotune
from orthotune.methods.registry import METHODS

from ..method_cases import CASES, run

STEPS = 2_000
LR = 5e-2  # STEPS x LR = 100: the parameter travel of 10,000 steps at 1e-2
WIDTH = 24  # the contract MLP's lin1: every case that runs on "mlp" fits it
TOLERANCE = 1e-3
ROWS = 4  # activation rows per step: the rotation is what is tested, not the batch
#: variant -> (dtype, Adam eps). float16 needs eps >= ~1e-4: 1e-8 underflows to 0 in float16 and
#: Adam divides by it (a NaN that orthotune.guard_finite reports by layer name).
VARIANTS = {"bf16": (torch.bfloat16, 1e-8), "fp16": (torch.float16, 1e-4)}
ORTHOGONAL = [i for i, c in enumerate(CASES) if c.orthogonal and "mlp" in c.models]


def _identity(z: torch.Tensor) -> torch.Tensor:
    return z


def spectral_error(R: torch.Tensor) -> float:
    R = R.detach().double()
    return float(torch.linalg.matrix_norm(R.T @ R - torch.eye(R.shape[0], dtype=torch.float64), ord=2))


def train_cases(indices: list[int], steps: int, lr: float = LR) -> list[dict]:
    """Train one layer per (case, variant) for ``steps`` steps; per layer, the orthogonality report."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    names = [f"c{i}_{v}" for i in indices for v in VARIANTS]
    layers = nn.ModuleDict({n: nn.Linear(WIDTH, WIDTH, bias=False).to(VARIANTS[n.split("_")[1]][0]) for n in names})
    model = orthotune.OrthoModel(layers)
    for n in names:
        case = CASES[int(n[1:].split("_")[0])]
        config = METHODS[case.method][0](target_modules=[n], init_identity=False, autocast_adapter_dtype=False, **case.kwargs)
        model.add_adapter(n, config)
    model.set_adapter(names)
    x = {n: torch.randn(ROWS, WIDTH).to(layers[n].weight.dtype) for n in names}
    target = {n: x[n].float() @ torch.linalg.qr(torch.randn(WIDTH, WIDTH))[0].T for n in names}
    adapters = {n: layers[n].adapters[n] for n in names}
    optimizers = []
    for v, (dtype, eps) in VARIANTS.items():
        params = [p for n in names if n.endswith(v) for p in layers[n].adapters[n].parameters()]
        optimizers.append(torch.optim.Adam(params, lr=lr, eps=eps))
        orthotune.guard_finite(optimizers[-1], model, every=500)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        # the rotation alone (an identity base): the frozen low-precision matmul would only add time
        loss = sum((run(adapters[n], x[n], _identity).float() - target[n]).pow(2).mean() for n in names)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    orthotune.check_finite(model, loss)
    report = []
    with torch.no_grad():
        for n in names:
            adapter = layers[n].adapters[n]
            R = adapter.rotation()
            R64 = copy.deepcopy(adapter).double().rotation()
            report.append({
                "layer": n,
                "case": CASES[int(n[1:].split("_")[0])].id,
                "orthogonality": spectral_error(R),
                "vs_float64": float(torch.linalg.matrix_norm(R.double() - R64, ord=2)),
                "float64_orthogonality": spectral_error(R64),
                "param_norm": max(float(p.float().norm()) for p in adapter.parameters()),
                "seconds": seconds,
                "cpu_ms_per_layer_step": 1e3 * cpu / (steps * len(names)),
            })
    return report


def _run_workers(groups: list[list[int]]) -> list[dict]:
    root = Path(__file__).resolve().parent.parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", f"import json; from tests.methods.test_numerics import train_cases; print(json.dumps(train_cases({g}, {STEPS})))"],
            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for g in groups
    ]
    report = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        report += json.loads(out.strip().splitlines()[-1])
    return report


@pytest.mark.slow
def test_orthogonality_survives_long_low_precision_training() -> None:
    cores = len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # xdist's other workers run too
    workers = max(1, min(4, cores, len(ORTHOGONAL)))
    groups = [ORTHOGONAL[i::workers] for i in range(workers)]
    start = time.perf_counter()
    report = _run_workers(groups)
    print(f"\n{STEPS} steps at lr {LR}, {len(report)} layers in {workers} processes: {time.perf_counter() - start:.0f} s")
    print(f"{'case':48} {'dtype':5} {'|R^T R - I|_2':>14} {'|R - R64|_2':>12} {'param norm':>10} {'CPU ms/layer-step':>18}")
    for r in report:
        print(
            f"{r['case']:48} {r['layer'].split('_')[1]:5} {r['orthogonality']:14.2e} {r['vs_float64']:12.2e} "
            f"{r['param_norm']:10.2f} {r['cpu_ms_per_layer_step']:18.2f}"
        )
    assert len(report) == 2 * len(ORTHOGONAL)
    bad = [r for r in report if not (r["orthogonality"] < TOLERANCE and r["vs_float64"] < TOLERANCE)]
    assert not bad, bad


@pytest.mark.parametrize("case", [CASES[i] for i in ORTHOGONAL], ids=[CASES[i].id for i in ORTHOGONAL])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotations_with_low_precision_parameters_are_orthogonal_from_the_start(case, dtype) -> None:
    """The fast check behind the long one: fixed bases (LOFT/PSOFT supports) stay float32."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(WIDTH, WIDTH)).to(dtype)
    config = METHODS[case.method][0](target_modules=["0"], init_identity=False, autocast_adapter_dtype=False, **case.kwargs)
    orthotune.get_model(base, config)
    assert spectral_error(base[0].adapters["default"].rotation()) < 1e-5


MERGE_CASES = [c for c in CASES if "mlp" in c.models]


@pytest.mark.parametrize("case", MERGE_CASES, ids=[c.id for c in MERGE_CASES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merging_into_a_low_precision_base_rounds_once(case, dtype) -> None:
    """The merged weight is the float64 reference rounded once: off by at most half a unit in the
    last place (plus float32's own error), where merging in low precision would be off by more."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(WIDTH, WIDTH)).to(dtype)
    W0 = base[0].weight.detach().double().clone()
    config = METHODS[case.method][0](target_modules=["0"], init_identity=False, **case.kwargs)
    model = orthotune.get_model(base, config)
    adapter = base[0].adapters["default"]
    reference = copy.deepcopy(adapter).double().merged_weight(W0)
    model.merge()
    merged = base[0].weight.detach().double()
    tiny = torch.finfo(dtype).tiny
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(reference.abs().clamp_min(tiny))))
    err = (merged - reference).abs()
    assert (err <= ulp / 2 + 1e-5 * reference.abs() + 1e-7).all(), float((err / ulp).max())
