"""Where orthotune refuses what peft accepts, the refusal is a clear error (``cases.BY_DESIGN``)."""

from __future__ import annotations

import pytest

import orthotune

from .models import base_model

TOO_WIDE = [
    (orthotune.PiSSAConfig, {"r": 8}, "r=8 exceeds min\\(d_in, d_out\\)=2 of 'lin1'"),
    (orthotune.PSOFTConfig, {"r": 8}, "'lin1'"),
    (orthotune.LOFTConfig, {"r": 8}, "LOFT principal support r=8 exceeds min\\(d_in, d_out\\)=2 of 'lin1'.*use r <= 2"),
]


@pytest.mark.parametrize(("config_cls", "kwargs", "message"), TOO_WIDE, ids=[c[0].method for c in TOO_WIDE])
def test_rank_above_layer_width_refused(config_cls, kwargs, message) -> None:  # LoRA accepts it, as peft
    """peft's "LoRA Different" puts r=8 on the 20 -> 2 ``lin1``; orthotune refuses, naming the layer, and
    changes nothing."""
    model = base_model("MLP")
    with pytest.raises(ValueError, match=message):
        orthotune.get_model(model, config_cls(target_modules=["lin1"], **kwargs))
    assert all(p.requires_grad for p in model.parameters())
