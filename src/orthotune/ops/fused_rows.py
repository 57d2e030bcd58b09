"""One GPU kernel for the DCT-II rows at given frequencies: ``table[(2j + 1) k mod 4n]`` (:func:`orthotune.ops.spectral.cos_rows_of`).

The plain PyTorch form takes three passes over the (len(index) x n) result: the integer phase product, its
remainder (in place) and the gather, about 18 bytes an entry in eager code. LoCA makes these rows in every
forward (twice a step under activation checkpointing), so on an 8B-shaped model they cost more than its
rank-n GEMMs. This Triton kernel computes each phase in registers and writes only the rows (2 bytes an entry
in bf16): the same integers index the same table, so the result is bit for bit the plain form's.

Registered as ``torch.ops.orthotune.cos_rows`` (``torch.library.triton_op``), so a compiler can trace it; the
caller uses it in eager code only (inductor fuses the plain form itself, and that measured 0.5-1% faster on an
H200). Available where Triton is importable; :func:`available` says whether a tensor can use it (CUDA tensors; the
caller falls back to the plain form elsewhere).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs without Triton
    triton = None

BLOCK = 1024


def available(table: Tensor) -> bool:
    """Whether :func:`cos_rows` runs for ``table`` (a CUDA tensor, Triton importable)."""
    return triton is not None and table.is_cuda


if triton is not None:

    @triton.jit
    def _cos_rows_kernel(table_ptr, index_ptr, out_ptr, n, four_n, BLOCK: tl.constexpr, WIDE: tl.constexpr):
        row = tl.program_id(0)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = j < n
        k = tl.load(index_ptr + row)
        if WIDE:  # (2j + 1) k >= 2^31 for some entries: int64 products
            phase = (k.to(tl.int64) * (2 * j.to(tl.int64) + 1)) % four_n
        else:
            phase = (k.to(tl.int32) * (2 * j + 1)) % four_n
        values = tl.load(table_ptr + phase, mask=mask)
        tl.store(out_ptr + row.to(tl.int64) * n + j, values, mask=mask)

    @torch.library.triton_op("orthotune::cos_rows", mutates_args={})
    def cos_rows(table: Tensor, index: Tensor) -> Tensor:
        """``table[(2j + 1) k mod 4n]`` (len(index) x n, table's dtype) for k in ``index``, n = ``len(table) / 4``."""
        n = table.shape[0] // 4
        index = index.contiguous()
        out = torch.empty(index.shape[0], n, dtype=table.dtype, device=table.device)
        grid = (index.shape[0], triton.cdiv(n, BLOCK))
        torch.library.wrap_triton(_cos_rows_kernel)[grid](
            table, index, out, n, 4 * n, BLOCK=BLOCK, WIDE=2 * n * n >= 2**31
        )
        return out
