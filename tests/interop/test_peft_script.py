"""examples/peft_script.py: a peft script that runs on orthotune with only the import and the config class renamed."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

import orthotune

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "peft_script.py"


def load(source: str, name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = str(SCRIPT)
    sys.modules[name] = module  # dataclasses/typing resolve annotations through sys.modules
    try:
        exec(compile(source, str(SCRIPT), "exec"), module.__dict__)
    finally:
        del sys.modules[name]
    return module


def check(report: dict, second: str) -> None:
    assert report["last_loss"] < report["first_loss"]
    assert report["saved"] == sorted(["README.md", "a", second])  # peft's layout: one card, a folder per adapter
    assert report["reload_gap"] < 1e-5 and report["trainable_after_load"] == 0
    assert report["active_after_delete"] == "a"


def test_the_script_is_a_peft_script(tmp_path) -> None:
    """Swapped back to peft (two words), it runs on peft 0.21: the reference for what orthotune must do."""
    pytest.importorskip("peft")
    source = SCRIPT.read_text().replace("orthotune", "peft").replace("LoRAConfig", "LoraConfig")
    report = load(source, "peft_script_on_peft").main(tmp_path)
    check(report, "ab")
    assert report["mixed_gap"] < 1e-5


def test_the_script_runs_on_orthotune(tmp_path) -> None:
    report = load(SCRIPT.read_text(), "peft_script_on_orthotune").main(tmp_path)
    check(report, "ab")
    assert report["mixed_gap"] < 1e-5
