"""Shared fixtures: small models with every supported layer kind, seeded."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Under pytest-xdist (README's test command: one worker per core) each worker computes on one thread, so the
# workers do not oversubscribe the cores; a plain run keeps up to two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (v2 or v1)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for path, period_path in (("/sys/fs/cgroup/cpu.max", None),
                              ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            with open(path) as f:
                fields = f.read().split()
            if period_path is not None:
                with open(period_path) as f:
                    fields.append(f.read().strip())
            quota, period = fields[0], fields[-1]
            if quota not in ("max", "-1"):
                n = min(n, max(1, int(quota) // int(period)))
        except (OSError, ValueError, IndexError):
            continue
    return max(1, n)


@pytest.hookimpl(optionalhook=True)  # xdist's hook: a run without pytest-xdist ignores it
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (README's test command): one worker per usable core. xdist's own count asks psutil for the
    host's physical cores, which in a container limited to 2 cores can be dozens of workers, each importing
    torch and transformers, on 2 cores and 24 GiB. ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still overrides it."""
    env = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS")
    return int(env) if env and env.isdigit() else usable_cores()


class MLP(nn.Module):
    """Linear layers of different widths, a bias-free one, and a head."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.lin0 = nn.Linear(d, 24)
        self.lin1 = nn.Linear(24, 24, bias=False)
        self.lin2 = nn.Linear(24, 12)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin2(torch.tanh(self.lin1(torch.tanh(self.lin0(x)))))))


class GPT2Block(nn.Module):
    """transformers' transposed Conv1D layers, as in GPT-2."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_attn = Conv1D(3 * d, d)
        self.c_proj = Conv1D(d, 3 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.tanh(self.c_attn(x)))


class ConvNet(nn.Module):
    """A 3x3 and a 1x1 convolution (flattened patches are the rotated input side)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(torch.tanh(self.conv0(x)))


MODELS = {
    "mlp": (MLP, ["lin0", "lin1", "lin2"], lambda: torch.randn(6, 16)),
    "conv1d": (GPT2Block, ["c_attn", "c_proj"], lambda: torch.randn(2, 5, 16)),
    "conv2d": (ConvNet, ["conv0", "conv1"], lambda: torch.randn(2, 4, 6, 6)),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def boft_factors(monkeypatch: pytest.MonkeyPatch) -> None:
    """peft builds BOFT with several butterfly factors only through its CUDA block-diagonal
    extension; on CPU it silently uses one factor. Stand the extension in with torch.block_diag so
    peft's own code path (dense permutations, factor products) runs here."""
    from peft.tuners.boft import layer as boft_layer

    class FakeFBD:
        @staticmethod
        def forward(blocks):
            return [torch.stack([torch.block_diag(*f) for f in blocks])]

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", FakeFBD)
    monkeypatch.setattr(boft_layer.FastBlockDiag, "apply", staticmethod(lambda t: FakeFBD.forward(t)[0]))


def eager_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, max_grad_norm: float | None = None) -> torch.Tensor:
    """One plain training step (zero_grad, ``model(**batch).loss``, backward, optional clipping, step): the
    reference ``orthotune.GraphedStep`` is checked against."""
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    return loss.detach()


SLOW_REPORT_S = 200.0  # the slowest test takes about 130 s on 2 CPU cores
_CONFIG: pytest.Config | None = None  # the session's config, for its terminal reporter


def pytest_configure(config: pytest.Config) -> None:
    global _CONFIG
    _CONFIG = config


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Name any test phase slower than ``SLOW_REPORT_S`` as it ends (on the xdist controller too), so that a run
    cut off by CI's time limit still shows in its log what took the time."""
    if report.duration > SLOW_REPORT_S and _CONFIG is not None:
        reporter = _CONFIG.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"\n[slow] {report.nodeid} ({report.when}): {report.duration:.0f} s")
