"""Each registered method documents a default learning rate (issue 22, item 3): a number and its source."""

from __future__ import annotations

import pytest

from orthotune import LOFTConfig
from orthotune.methods.defaults import DEFAULT_LR, LOFT_LR, default_lr, default_lr_source
from orthotune.methods.loft.rotation import SUPPORTS
from orthotune.methods.registry import METHODS


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_has_a_default_lr_with_its_source(name: str) -> None:
    table = LOFT_LR if name == "loft" else {name: DEFAULT_LR[name]}
    for lr, source in table.values():
        assert 1e-5 < lr < 1e-1 and source


def test_loft_default_follows_the_support() -> None:
    assert set(LOFT_LR) == set(SUPPORTS)
    grad, rand = (LOFTConfig(support=s, r=8) for s in ("gradient", "random"))
    assert grad.default_learning_rate() == 2e-3 and rand.default_learning_rate() == 6e-3  # grid3's dev choices
    assert "standard loop" in default_lr_source(grad)


def test_the_measured_defaults_are_the_standard_loop_grid_choices() -> None:
    assert {m: METHODS[m][0]().default_learning_rate() for m in ("lora", "oft", "loco")} == {"lora": 2e-3, "oft": 2e-3, "loco": 3e-3}


def test_a_method_without_a_default_says_so() -> None:
    class Unknown:
        method = "nope"

    with pytest.raises(ValueError, match="has no default learning rate; set train.lr"):
        default_lr(Unknown())
