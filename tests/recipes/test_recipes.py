"""Recipes, the shared training loop and the CLI on real weights and data (tiny runs, CPU).

Text classification runs all-MiniLM-L6-v2 on BANKING77 subsets: the metric must improve over the
class-mean baseline, an interrupted run must resume bit-identically (optimiser, schedule, RNG,
data position and LoCA's location learner included), the merged folder must load with plain
transformers (AutoModelForSequenceClassification) and give the adapted model's outputs, and ``inspect``
must report known rotations.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import orthotune
from orthotune.cli import main
from orthotune.recipes.assets import load_intents
from orthotune.recipes.finetune import finetune, load_trained, run
from orthotune.recipes.runconfig import RunConfig, apply_overrides, load_run_config

transformers = pytest.importorskip("transformers")
RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
TEXT = RECIPES[0].parent / "text_banking77.yaml"


def text_config(tmp_path: Path, name: str, **changes) -> RunConfig:
    """A tiny BANKING77 run (real MiniLM, real data) with dotted-key changes."""
    base = {
        "task": "text_classification", "method": "lora", "adapter": {"r": 4, "lora_alpha": 8},
        "model": {"max_length": 32}, "data": {"train_size": 48, "eval_size": 40, "eval_split": "dev"},
        "train": {"steps": 6, "batch_size": 8, "lr": 5e-3, "warmup": 0.0, "eval_before": False},
        "seed": 3, "output_dir": str(tmp_path / name), "device": "cpu",
    }
    return RunConfig.from_dict(apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in changes.items()]))


# --------------------------------------------------------------------------- recipes and config
@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_is_a_valid_run(path: Path) -> None:
    config = load_run_config(path)
    assert config.adapter_config().target_modules
    assert RunConfig.from_dict(config.to_dict()) == config  # round trip through the YAML form


def test_overrides_and_clear_errors() -> None:
    config = load_run_config(TEXT, ["method=lora", "adapter={r: 8}", "train.lr=1e-3", "seed=5"])
    assert (config.method, config.adapter_config().r, config.train.lr, config.seed) == ("lora", 8, 1e-3, 5)
    with pytest.raises(ValueError, match="unknown recipe keys \\['bogus'\\]"):
        RunConfig.from_dict({"task": "text_classification", "method": "lora", "bogus": 1})
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        load_run_config(TEXT, ["method=nope"])
    with pytest.raises(ValueError, match="unknown LoCOConfig fields \\['r'\\]"):
        load_run_config(TEXT, ["method=loco", "adapter={r: 8}"])
    with pytest.raises(ValueError, match="takes no adapter settings"):
        load_run_config(TEXT, ["method=full"])
    with pytest.raises(ValueError, match="exactly one of train.steps and train.epochs"):
        load_run_config(TEXT, ["train.epochs=1", "train.steps=5"])
    with pytest.raises(ValueError, match="unknown data settings \\['shots'\\]"):
        load_run_config(TEXT, ["data.shots=3"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        load_run_config(TEXT, ["train.lr"])


# --------------------------------------------------------------------------- text recipe end to end
def test_text_recipe_learns_and_writes_its_outputs(tmp_path) -> None:
    # a random head (step-0 accuracy ~1/77) makes the gain visible in a few dozen CPU steps (0.00 -> 0.19 seen);
    # the demo test checks the gain over the class-mean baseline on more data
    config = text_config(tmp_path, "loco", method="loco", adapter={"rank": 2, "chain_length": 2},
                         **{"model.head_init": "random", "data.train_size": 160, "data.eval_size": 100, "train.steps": 30,
                            "train.batch_size": 16, "train.lr": 3e-2, "train.eval_before": True, "train.eval_every": 15})
    outcome = run(config, progress=False)
    results = outcome.results
    before, after = results["before"]["accuracy"], results["final"]["accuracy"]
    assert after >= before + 0.1, (before, after)
    losses = [loss for _, loss, _ in results["history"]["train"]]
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.75, losses
    # the frozen encoder really was adapted: its LoCO rotations moved away from the identity
    with torch.no_grad():
        moved = [float((layer.adapters["default"].rotation() - torch.eye(384)).norm()) for _, layer in outcome.model.adapter_layers()]
    assert min(moved) > 1e-3
    assert [s for s, _ in results["history"]["eval"]] == [0, 15, 30]
    assert results["parameters"]["adapter"] == 12 * 2 * 2 * 2 * 384  # 2 k r d per layer, 12 layers
    run_dir = Path(config.output_dir)
    for name in ("adapter/adapter_config.json", "config.yaml", "curves.png", "results.json"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "checkpoints").exists()  # removed once the run finished
    assert json.loads((run_dir / "results.json").read_text())["final"] == results["final"]


@pytest.mark.parametrize(
    "method, adapter",
    [
        # LoCA with dropout: the global RNG must be restored, and the run is interrupted inside a location
        # phase (steps 1-2 and 4-5 of the 3-step cycle), so the learner's positions and Adam state must be too
        ("loca", {"n_frequency": 64, "dropout": 0.2, "coefficient_steps": 1, "location_steps": 2, "location_learning_steps": 5,
                  "location_lr": 0.05}),
        # LOFT with gradient-informed supports: chosen from data before step 0, restored (not re-chosen) on resume
        ("loft", {"support": "gradient", "transform": "cayley", "r": 8}),
    ],
    ids=["loca", "loft-gradient"],
)
def test_resume_is_bit_identical(tmp_path, method, adapter) -> None:
    straight = finetune(text_config(tmp_path, "straight", method=method, adapter=adapter), progress=False)
    config = text_config(tmp_path, "resumed", method=method, adapter=adapter, **{"train.save_every": 2})
    partial = finetune(config, progress=False, stop_after=4)
    assert partial["interrupted"] and partial["steps"] == 4
    state = torch.load(Path(config.output_dir) / "checkpoints" / "step-000004" / "trainer_state.pt", weights_only=False)
    assert (state["epoch"], state["batch_index"]) == (0, 4)  # 48 examples / 8 per batch: 6 batches an epoch
    if method == "loca":
        assert state["learner"]["positions"]  # saved mid location phase
    else:
        assert len(straight["selection"]) == 12 and all(0 < v["captured_fraction"] <= 1 for v in straight["selection"].values())
    assert sorted(p.name for p in (Path(config.output_dir) / "checkpoints").glob("step-*")) == ["step-000002", "step-000004"]
    step = Path(config.output_dir) / "checkpoints" / "step-000004"
    assert step.stat().st_mode & 0o777 == (step / "adapter").stat().st_mode & 0o777 == 0o755  # shareable, as the run folder
    resumed = finetune(config, resume=True, progress=False)
    assert resumed["history"]["train"] == straight["history"]["train"]  # every loss and lr, bit for bit
    a = load_file(str(Path(straight["config"]["output_dir"]) / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(Path(config.output_dir) / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # coefficients, cells and head
    assert resumed["final"] == straight["final"]
    assert resumed["selection"] == straight["selection"]


def test_recipes_choose_the_gradient_supports_statistic(tmp_path) -> None:
    from orthotune.recipes.finetune import build, select
    from orthotune.training.support_selection import select_supports

    adapter = {"support": "gradient", "transform": "cayley", "r": 8}
    bases = {}
    for statistic in ("mean", "whitened"):
        config = text_config(tmp_path, statistic, method="loft", adapter=adapter,
                             **{"train.selection_statistic": statistic, "train.selection_batches": 2})
        task, model = build(config)
        select(model, task, config, False)
        bases[statistic] = [layer.adapters["default"].support.P.clone() for _, layer in model.adapter_layers()]
    # the recipe's choice is select_supports' statistic: the same batches give the same whitened bases directly
    task, model = build(config)
    bs = config.train.batch_size
    select_supports(model, (task.train_batch(0, i, bs) for i in range(2)), num_batches=2, loss_fn=lambda m, b: task.loss(m, b, -1),
                    progress=False, statistic="whitened")
    assert all(torch.equal(a, layer.adapters["default"].support.P) for a, (_, layer) in zip(bases["whitened"], model.adapter_layers()))
    # and it differs from the mean statistic's: the option reaches the selection
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(bases["mean"], bases["whitened"]))
    with pytest.raises(ValueError, match="train.selection_statistic"):
        text_config(tmp_path, "bad", **{"train.selection_statistic": "median"})


def test_loca_locations_move_in_the_loop(tmp_path) -> None:
    from orthotune.recipes.finetune import build

    config = text_config(tmp_path, "loca", method="loca", adapter={"n_frequency": 64, "coefficient_steps": 1, "location_steps": 2,
                                                                   "location_learning_steps": 5, "location_lr": 0.05})
    _, fresh = build(config)
    start = {n: layer.adapters["default"].locations.clone() for n, layer in fresh.adapter_layers()}
    model = run(config, progress=False).model
    moved = sum(int((layer.adapters["default"].locations != start[n]).any(0).sum()) for n, layer in model.adapter_layers())
    assert moved > 0
    assert all(layer.adapters["default"].spectrum.requires_grad for _, layer in model.adapter_layers())  # learner finished


def test_resume_refuses_a_changed_recipe(tmp_path) -> None:
    config = text_config(tmp_path, "run", **{"train.save_every": 2})
    finetune(config, progress=False, stop_after=2)
    with pytest.raises(ValueError, match="differs from this recipe"):
        finetune(config.with_overrides(["train.lr=1e-3"]), resume=True, progress=False)


# --------------------------------------------------------------------------- CLI: finetune, eval, merge, inspect, methods
def test_cli_finetune_eval_merge_inspect(tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    main(["finetune", "--config", str(TEXT), "--quiet", "--device", "cpu",
          "--output-dir", str(out), "--steps", "4", "--lr", "5e-3", "--seed", "1",
          "--set", "data.train_size=48", "--set", "data.eval_size=40", "--set", "train.batch_size=8",
          "--set", "train.eval_every=0", "--set", "train.save_every=0", "--set", "model.max_length=32"])
    text = capsys.readouterr().out
    assert "text_classification / loco (seed 1): accuracy" in text
    results = json.loads((out / "results.json").read_text())

    main(["eval", str(out)])
    assert json.loads(capsys.readouterr().out) == results["final"]  # the saved adapter scores what training reported

    merged = tmp_path / "merged"
    main(["merge", str(out), "--out", str(merged)])
    capsys.readouterr()
    task, adapted = load_trained(RunConfig.from_dict(results["config"]), out / "adapter")
    texts = load_intents("banking", "dev").texts[:16]
    enc = task.tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(merged).eval()  # plain transformers, no orthotune
    with torch.no_grad():
        logits = plain(**enc).logits
        reference = adapted(**enc)["logits"]
    assert float((logits - reference).norm() / reference.norm()) < 1e-5
    assert plain.config.id2label[1] == task.label_names[1] and (out / "data.json").is_file()
    with pytest.raises(SystemExit):  # an existing folder is never overwritten
        main(["merge", str(out), "--out", str(merged)])

    main(["inspect", str(out / "adapter"), "--out", str(tmp_path / "inspect")])
    text = capsys.readouterr().out
    assert "method: loco" in text and "orth. err" in text
    report = json.loads((tmp_path / "inspect" / "inspect.json").read_text())
    assert report["parameters"]["adapter"] == results["parameters"]["adapter"]
    assert all(layer["orthogonality_error"] < 1e-5 for layer in report["layers"])
    assert (tmp_path / "inspect" / "inspect.png").stat().st_size > 1000

    main(["methods", "loco"])
    assert "adapter.chain_length" in capsys.readouterr().out


def test_cli_reports_bad_input_in_one_line(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["finetune", "--config", str(TEXT), "--set", "adapter.rank=0"])
    assert "error: rank must be a positive integer" in capsys.readouterr().err


# --------------------------------------------------------------------------- inspect: known answers
def _adapter(tmp_path: Path, config: orthotune.AdapterConfig, set_weights) -> Path:
    from tests.conftest import MLP

    model = orthotune.get_model(MLP(), config)
    layer = dict(model.adapter_layers())["lin0"].adapters["default"]
    with torch.no_grad():
        set_weights(layer)
    model.save_adapter(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_inspect_reports_a_known_rotation(tmp_path) -> None:
    from orthotune.recipes.inspection import inspect_adapter, write_report

    theta = 0.7

    def plane_rotation(m):  # S = theta (e0 e1^T - e1 e0^T): a rotation by theta in the (e0, e1) plane
        m.U.zero_()
        m.V.zero_()
        m.U[0, 0, 0] = theta
        m.V[0, 1, 0] = 1.0

    path = _adapter(tmp_path, orthotune.LoCOConfig(target_modules=["lin0"], rank=1, chain_length=1), plane_rotation)
    report = inspect_adapter(path)
    (layer,) = report["layers"]
    assert layer["shape"] == [24, 16] and layer["parameters"] == 2 * 16
    assert layer["rotated_dims"] == 2 and layer["angles"][:2] == pytest.approx([theta, theta], abs=1e-6)
    assert max(layer["angles"][2:]) < 1e-6
    assert layer["orthogonality_error"] < 1e-6
    assert layer["distance_from_identity"] == pytest.approx(2 * math.sqrt(2) * math.sin(theta / 2), abs=1e-6)
    files = write_report(report, tmp_path / "out")
    assert all(f.is_file() and f.stat().st_size > 0 for f in files)


def test_inspect_reports_a_known_update_spectrum(tmp_path) -> None:
    from orthotune.recipes.inspection import inspect_adapter

    def two_directions(m):  # dW = s B A with orthonormal rows of A: singular values 3 s and 0.5 s
        m.lora_A.zero_()
        m.lora_B.zero_()
        m.lora_A[0, 0] = m.lora_A[1, 1] = 1.0
        m.lora_B[0, 0], m.lora_B[1, 1] = 3.0, 0.5

    path = _adapter(tmp_path, orthotune.LoRAConfig(target_modules=["lin0"], r=2, lora_alpha=4), two_directions)
    (layer,) = inspect_adapter(path)["layers"]
    assert layer["parameters"] == 2 * (16 + 24) and layer["update_rank"] == 2
    assert layer["singular_values"][:2] == pytest.approx([6.0, 1.0], abs=1e-6)  # s = 4 / 2


# --------------------------------------------------------------------------- HF Trainer example
def test_trainer_example_trains_saves_and_reloads(tmp_path) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "examples" / "trainer_banking77.py"
    spec = importlib.util.spec_from_file_location("trainer_banking77", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.run(tmp_path, train_size=160, test_size=80, steps=4)
    assert result["reload_max_abs_diff"] == 0.0  # the reloaded fresh model is the trained one, exactly
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    us = [v for k, v in saved.items() if k.endswith(".U")]  # LoCO's U starts at zero: nonzero means the Trainer trained it
    assert len(us) == 12 and all(float(u.norm()) > 0 for u in us)
    assert any("classifier" in k for k in saved)  # modules_to_save travels with the adapter
