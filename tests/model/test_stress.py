"""Scale and concurrency: 1,000-layer models, 10,000 adapted modules, loading in threads.

Timings and memory are printed (run with ``-s`` to see them) and bounded generously: the bounds
catch quadratic behaviour (a scan of every module per adapted layer costs minutes at 10,000
layers), not a slow machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import orthotune
from orthotune.methods.registry import METHODS

from ..method_cases import CASES

WIDTH = 24  # the width of the contract MLP's lin1: every case that runs on "mlp" fits it


class Deep(nn.Module):
    """``n`` blocks of two linear layers (named like attention projections)."""

    def __init__(self, blocks: int, width: int = WIDTH) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(width, width), "v": nn.Linear(width, width)}) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = torch.tanh(b["v"](b["q"](x)))
        return x


def deep(blocks: int, width: int = WIDTH, seed: int = 0) -> Deep:
    torch.manual_seed(seed)
    return Deep(blocks, width)


FIRST_CASES = {c.method: c for c in reversed(CASES) if "mlp" in c.models}  # one case per method


@pytest.mark.parametrize("method", sorted(FIRST_CASES))
def test_get_model_on_1000_layers(method: str) -> None:
    case = FIRST_CASES[method]
    model = deep(500)
    config = METHODS[method][0](target_modules=["q", "v"], **case.kwargs)
    start = time.perf_counter()
    wrapped = orthotune.get_model(model, config)
    seconds = time.perf_counter() - start
    layers = sum(1 for _ in wrapped.adapter_layers())
    print(f"\nget_model {case.id} on {layers} layers: {seconds:.2f} s ({1e3 * seconds / layers:.2f} ms per layer)")
    assert layers == 1000
    assert seconds < 30, f"get_model took {seconds:.1f} s for 1,000 layers"


def stress_10k(blocks: int) -> dict[str, float]:
    """Adapt 2 * blocks layers (an explicit list of every name), save, load; timings and peak memory."""
    import resource

    torch.set_num_threads(1)
    names = [f"blocks.{i}.{p}" for i in range(blocks) for p in ("q", "v")]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out: dict[str, float] = {}
    model = deep(blocks, width=8)
    t = time.perf_counter()
    wrapped = orthotune.get_model(model, orthotune.LoRAConfig(target_modules=names, r=2, init_identity=False))
    out["get_model_s"] = time.perf_counter() - t
    x = torch.randn(2, 8)
    with torch.no_grad():
        y = wrapped(x)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        wrapped.save_adapter(Path(tmp) / "a")
        out["save_s"] = time.perf_counter() - t
        out["file_mib"] = (Path(tmp) / "a" / "adapter_model.safetensors").stat().st_size / 2**20
        t = time.perf_counter()
        loaded = orthotune.load_adapter(deep(blocks, width=8), Path(tmp) / "a")
        out["load_s"] = time.perf_counter() - t
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    t = time.perf_counter()
    loaded.merge()
    loaded.unmerge()
    out["merge_unmerge_s"] = time.perf_counter() - t
    out["modules"] = sum(1 for _ in loaded.adapter_layers())
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["rss_growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return out


def run_stress(blocks: int) -> dict[str, float]:
    """``stress_10k`` in a fresh process, so its peak memory is its own."""
    code = f"import json; from tests.model.test_stress import stress_10k; print(json.dumps(stress_10k({blocks})))"
    root = Path(__file__).resolve().parent.parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_save_and_load_10000_adapted_modules() -> None:
    # the small run before and after the big one: under xdist the other worker's load comes and goes,
    # and a ratio against one quiet small run made this fail on a loaded machine (10.9x measured idle)
    before, big, after = run_stress(500), run_stress(5000), run_stress(500)
    small = {k: max(before[k], after[k]) for k in before}
    for r in (small, big):
        print(
            f"\n{r['modules']:.0f} LoRA modules (explicit target list): get_model {r['get_model_s']:.2f} s, save "
            f"{r['save_s']:.2f} s ({r['file_mib']:.1f} MiB), load {r['load_s']:.2f} s, merge+unmerge "
            f"{r['merge_unmerge_s']:.2f} s; peak RSS {r['peak_rss_mib']:.0f} MiB (+{r['rss_growth_mib']:.0f} MiB)"
        )
    assert big["modules"] == 10000
    for key in ("get_model_s", "save_s", "load_s", "merge_unmerge_s"):
        assert big[key] < 60, (key, big[key])
        # 10x the modules: linear work costs ~10x; a scan of all modules per module would cost ~100x
        assert big[key] < 30 * max(small[key], 0.05), (key, small[key], big[key])
    assert big["rss_growth_mib"] < 2048


def test_loading_two_adapters_into_two_models_in_threads(tmp_path) -> None:
    """Shared state (the wrapper-class cache) stays safe under threads."""
    specs = {"loca": dict(n_frequency=64), "fourierft": dict(n_frequency=64), "loco": dict(rank=2, chain_length=2)}
    folders = {}
    for method, kwargs in specs.items():
        model = orthotune.get_model(deep(4, seed=1), METHODS[method][0](target_modules=["q", "v"], init_identity=False, **kwargs))
        folders[method] = tmp_path / method
        model.save_adapter(folders[method])
    x = torch.randn(3, WIDTH)

    def load(method: str, base: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return orthotune.load_adapter(base, folders[method])(x)

    expected = {m: load(m, deep(4, seed=1)) for m in specs}
    pairs = [("loca", "fourierft"), ("loca", "loco"), ("fourierft", "loco"), ("loca", "loca")] * 3
    for a, b in pairs:
        barrier = threading.Barrier(2)
        results: dict[int, torch.Tensor | BaseException] = {}

        bases = [deep(4, seed=1), deep(4, seed=1)]  # built here: the global RNG is not for threads

        def work(slot: int, method: str) -> None:
            try:
                barrier.wait()
                results[slot] = load(method, bases[slot])
            except BaseException as err:  # surfaced below with the method's name
                results[slot] = err

        threads = [threading.Thread(target=work, args=(i, m)) for i, m in enumerate((a, b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for slot, method in enumerate((a, b)):
            got = results[slot]
            assert not isinstance(got, BaseException), (method, got)
            assert torch.equal(got, expected[method]), method


def test_models_of_new_classes_wrapped_in_threads_share_one_wrapper_class() -> None:
    classes = [type(f"Net{i}", (Deep,), {}) for i in range(8)]
    barrier = threading.Barrier(4)
    seen: list[type] = []

    def wrap(model: nn.Module) -> None:
        barrier.wait()
        seen.append(type(orthotune.get_model(model, orthotune.LoRAConfig(target_modules=["q"], r=1))))

    for cls in classes:
        threads = [threading.Thread(target=wrap, args=(cls(1),)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(seen) == 32 and len(set(seen)) == 8
