"""A newcomer's path: imports in any order, CLI flags that replace the recipe's, inspect on a run folder, live progress."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import orthotune
from orthotune.cli import _recipe, build_parser, main
from orthotune.recipes.runconfig import load_run_config
from orthotune.recipes.settings import TrainSettings

ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT / "recipes" / "text_banking77.yaml"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------- imports
def test_peft_and_transformers_imported_before_orthotune() -> None:
    """README's test environment needs no orthotune shim: peft, transformers (and timm) first, then orthotune."""
    pytest.importorskip("peft")
    proc = _python("""
        import peft, transformers
        import timm, torchvision
        import torch, orthotune
        from transformers import BertConfig, BertModel
        model = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
        wrapped = orthotune.get_model(model, orthotune.LoCOConfig(target_modules=["query", "value"], rank=2))
        ref = peft.get_peft_model(BertModel(model.config), peft.LoraConfig(target_modules=["query"], r=2))
        x = torch.tensor([[1, 2, 3]])
        wrapped(input_ids=x); ref(input_ids=x)
        print("ok", torchvision.__version__)
    """)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_import_orthotune_leaves_torchvision_alone() -> None:
    """``import orthotune`` loads no torchvision library and declares none of its operators; torchvision works after it."""
    pytest.importorskip("torchvision")
    proc = _python("""
        import sys, torch
        libraries = set(torch.ops.loaded_libraries)
        import orthotune
        assert set(torch.ops.loaded_libraries) == libraries, set(torch.ops.loaded_libraries) - libraries
        assert not [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm")]
        try:
            torch.ops.torchvision.nms
            raise AssertionError("import orthotune declared torchvision::nms")
        except (AttributeError, RuntimeError):
            pass
        import torchvision
        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.1], [2.0, 2.0, 3.0, 3.0]])
        assert torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]
        print("ok")
    """)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_import_timm_names_a_torchvision_mismatch(tmp_path, monkeypatch) -> None:
    """A torchvision built for another torch is named, with the matching pair to install."""
    from orthotune.recipes.compat import import_timm

    fake = tmp_path / "timm"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r"torchvision does not match torch .*pip install torch==2\.14\.1 torchvision==0\.29\.1"):
        import_timm()


# --------------------------------------------------------------------------- CLI flags replace their recipe counterparts
def test_epochs_flag_replaces_the_recipes_steps() -> None:
    args = build_parser().parse_args(["finetune", "--config", str(TEXT), "--epochs", "1"])
    config = _recipe(args)
    assert (config.train.epochs, config.train.steps) == (1, None)
    assert load_run_config(TEXT, ["train.epochs=2"]).train.epochs == 2  # --set too
    with pytest.raises(ValueError, match="exactly one of train.steps and train.epochs"):  # both given: ambiguous
        _recipe(build_parser().parse_args(["finetune", "--config", str(TEXT), "--epochs", "1", "--steps", "5"]))


def test_steps_flag_replaces_a_recipes_epochs(tmp_path) -> None:
    recipe = tmp_path / "epochs.yaml"
    recipe.write_text(TEXT.read_text().replace("steps: 200", "epochs: 1"))
    assert load_run_config(recipe).train.epochs == 1
    config = _recipe(build_parser().parse_args(["finetune", "--config", str(recipe), "--steps", "5"]))
    assert (config.train.steps, config.train.epochs) == (5, None)


# --------------------------------------------------------------------------- inspect on a run folder
class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)


def test_inspect_accepts_the_run_folder_and_the_adapter_folder(tmp_path, capsys) -> None:
    model = orthotune.get_model(_MLP(), orthotune.OFTConfig(target_modules=["lin0"], r=0, oft_block_size=4))
    model.save_adapter(tmp_path / "run" / "adapter")
    main(["inspect", str(tmp_path / "run")])
    by_run = capsys.readouterr().out
    assert "method: oft" in by_run and (tmp_path / "run" / "adapter-inspect" / "inspect.json").is_file()
    main(["inspect", str(tmp_path / "run" / "adapter"), "--out", str(tmp_path / "direct")])
    assert capsys.readouterr().out.split("wrote")[0] == by_run.split("wrote")[0]
    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path / "nowhere")])
    assert "nowhere" in capsys.readouterr().err


# --------------------------------------------------------------------------- live progress
class _CountingTask:
    """A one-weight regression task whose metric names the evaluation it came from."""

    name, metric = "count", "accuracy"

    def __init__(self) -> None:
        self.evaluations = 0

    def batches_per_epoch(self, batch_size: int) -> int:
        return 4

    def train_batch(self, epoch: int, index: int, batch_size: int) -> torch.Tensor:
        return torch.full((batch_size, 1), float(index + 1))

    def loss(self, model: nn.Module, batch: torch.Tensor, step: int) -> torch.Tensor:
        return (model(batch) - 2 * batch).pow(2).mean()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        self.evaluations += 1
        return {"accuracy": self.evaluations / 10}


def test_progress_bar_shows_the_steps_loss_and_the_latest_eval_with_its_step(tmp_path, monkeypatch) -> None:
    from orthotune.recipes import loop

    shown = []

    class Recorder(loop.tqdm):
        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
            shown.append(dict(ordered_dict))
            super().set_postfix(ordered_dict, refresh, **kwargs)

    monkeypatch.setattr(loop, "tqdm", Recorder)
    settings = TrainSettings(steps=6, batch_size=2, lr=0.05, warmup=0, eval_every=4)
    settings.validate()
    result = loop.fit(nn.Linear(1, 1), _CountingTask(), settings, tmp_path)
    losses = [f"{loss:.4f}" for _, loss, _ in result.history["train"]]
    assert [s["loss"] for s in shown] == losses and len(set(losses)) == 6
    expected = [{"accuracy@0": "0.1000"}] * 3 + [{"accuracy@4": "0.2000"}] * 2 + [{"accuracy@6": "0.3000"}]
    assert [{k: v for k, v in s.items() if k != "loss"} for s in shown] == expected


def test_demo_says_what_the_approximation_gap_means() -> None:
    from orthotune.recipes.demo import gap_line

    line = gap_line(0.786, 1.643, "exact")
    assert "\n" not in line and "0.79" in line and "1.64" in line
    assert "mode 'approx'" in line and "exact chain" in line and "costs it nothing" in line and "at most 2" in line
    assert "costs it nothing" not in gap_line(0.786, 1.643, "approx")


@pytest.mark.parametrize("task", ["text_classification", "causal_lm"])
@pytest.mark.parametrize("kind", ["missing", "no config"])
def test_a_model_path_that_is_no_model_folder_is_named_with_the_fix(tmp_path, task, kind) -> None:
    """A wrong ``model.path`` is refused before anything loads, by name and with the fix (transformers' own
    error speaks of hub repo ids), and leaves no run folder behind."""
    from orthotune.recipes.finetune import finetune
    from orthotune.recipes.runconfig import RunConfig

    path = tmp_path / "Meta-Llama-3-8B"
    if kind == "no config":
        path.mkdir()
    cfg = RunConfig.from_dict({"task": task, "method": "lora", "model": {"path": str(path)}, "output_dir": str(tmp_path / "run"), "train": {"steps": 1},
                               "device": "cpu"})
    what = "does not exist" if kind == "missing" else "has no config.json"
    with pytest.raises(FileNotFoundError, match=f"model.path=.*{what}: give a local transformers model folder"):
        finetune(cfg, progress=False)
    assert not (tmp_path / "run").exists()
