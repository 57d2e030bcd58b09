"""The fused DCT-rows kernel (:mod:`orthotune.ops.fused_rows`) against the plain PyTorch form, bit for bit.

On the CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, read when the kernel is defined,
so in a fresh process); on a GPU ``tests/training/test_gpu.py`` runs it natively and under ``torch.compile``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

CODE = """
import torch
from orthotune.ops import fused_rows, spectral
torch.manual_seed(0)
# widths: odd, a model width, and one past 2 n^2 >= 2^31 (the kernel's int64 products)
for n, m, dtype in ((7, 5, torch.float32), (96, 40, torch.bfloat16), (1000, 9, torch.float16), (33000, 2, torch.bfloat16)):
    table = spectral.cos_table(n, dtype)
    index = torch.cat([torch.tensor([0, n - 1]), torch.randint(0, n, (m,))])
    got = fused_rows.cos_rows(table, index)
    want = table[spectral._dct_phase(n, index)]
    assert got.dtype == dtype and got.shape == (m + 2, n), (got.dtype, got.shape)
    assert torch.equal(got, want), n
    assert torch.equal(got.double(), spectral.cos_rows(n, index, torch.float64).to(dtype).double()), n
print("ok")
"""


def test_fused_rows_equal_the_plain_gather_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
