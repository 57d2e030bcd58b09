"""peft's dtype tests: ``test_forward_{float16,bfloat16}[_no_autocast]`` and ``test_adapter_dtype_autocast``.

peft's ``autocast_adapter_dtype`` keyword of ``get_peft_model`` is orthotune's config field of that name.
"""

from __future__ import annotations

import pytest
import torch

from orthotune import load_adapter

from .cases import CASES, params
from .harness import batch, config, make, requires_api
from .models import base_model, output

pytestmark = pytest.mark.parametrize("case", params(CASES))
HALF = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no_autocast"])
@pytest.mark.parametrize("dtype", HALF)
@torch.no_grad()
def test_forward_half(case, dtype: torch.dtype, autocast: bool) -> None:
    """Forward, merge, unmerge, safe merge and merge_and_unload run on a half-precision base."""
    model = make(case, dtype=dtype, autocast_adapter_dtype=autocast).eval()
    x = batch(case)
    assert output(model, x).dtype == dtype
    model.merge(safe_merge=False)
    output(model, x)
    model.unmerge()
    output(model, x)
    model.merge(safe_merge=True)
    output(model, x)
    model.unmerge()
    output(model, x)
    assert torch.isfinite(output(model.merge_and_unload(), x)).all()


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no_autocast"])
def test_adapter_dtype_autocast(case, autocast: bool, tmp_path) -> None:
    """Adapters are float32 with autocast, else in the base dtype: after get_model, add_adapter and loading
    (peft's float32 base is left out: there both settings give float32)."""

    def dtypes(model) -> set[torch.dtype]:
        return {p.dtype for n, p in model.named_parameters() if ".adapters." in n}

    for dtype in (torch.float16, torch.bfloat16):
        expected = torch.float32 if autocast else dtype
        model = make(case, dtype=dtype, autocast_adapter_dtype=autocast)
        model.add_adapter("other", config(case, autocast_adapter_dtype=autocast))
        assert dtypes(model) == {expected}
    model.save_pretrained(tmp_path)  # the bfloat16 one
    loaded = load_adapter(base_model(case.kind, torch.bfloat16), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    assert set(loaded.configs) == {"default", "other"} and dtypes(loaded) == {expected}


@requires_api("load_adapter", keyword="low_cpu_mem_usage")
def test_load_model_low_cpu_mem_usage(case, tmp_path) -> None:
    model = make(case)
    model.save_pretrained(tmp_path)
    loaded = load_adapter(base_model(case.kind), tmp_path)
    loaded.load_adapter(tmp_path, "other", low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
