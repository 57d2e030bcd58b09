"""The image recipes on CPU: a tiny ViT / DiT pretrained in-test on Fashion-MNIST, transferred to digits.

The same code path as the full recipes (``orthotune pretrain`` then ``orthotune finetune``) at a
size that trains in seconds: the metric must improve over the step-0 model, and the merged
folder must reload into a plain timm ViT (``timm.create_model("local-dir:...")``) / CompactDiT that
gives the adapted model's outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orthotune.recipes.assets import FASHION_MNIST_DIR
from orthotune.recipes.finetune import finetune, load_trained, merge_adapter
from orthotune.recipes.pretrain import SPECS, PretrainSpec, build_backbone, load_pretrained, pretrain
from orthotune.recipes.runconfig import RunConfig

pytestmark = [
    pytest.mark.skipif(
        not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
        reason="Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist (.ci/run does it as root)",
    ),
    pytest.mark.xdist_group("recipes_images"),  # one xdist worker pretrains the module's ViT and DiT once
]


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Path:
    pytest.importorskip("timm")
    spec = PretrainSpec(kind="vit", model=dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=48, depth=2,
                                               num_heads=3, mlp_ratio=2.0), steps=120, batch_size=128, lr=3e-3)
    return pretrain(spec, tmp_path_factory.mktemp("ck") / "vit", progress=False)


@pytest.fixture(scope="module")
def dit(tmp_path_factory) -> Path:
    spec = PretrainSpec(kind="dit", model=dict(input_size=16, patch_size=4, in_channels=1, hidden_size=48, depth=2, num_heads=3,
                                               mlp_ratio=2.0, num_classes=10), steps=40, batch_size=128, lr=3e-3, weight_decay=0.0)
    return pretrain(spec, tmp_path_factory.mktemp("ck") / "dit", progress=False)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_named_backbone_builds_and_runs(name) -> None:
    """``orthotune pretrain``'s specs (and the CPU-sized ``*-small`` ones the benchmarks use) build a working model."""
    spec = SPECS[name]
    if spec.kind == "vit":
        pytest.importorskip("timm")
    model = build_backbone(spec.kind, spec.model)
    x = torch.randn(2, 1, 16, 16)
    out = model(x) if spec.kind == "vit" else model(x, torch.tensor([1, 500]), torch.tensor([0, 9]))
    assert out.shape == ((2, 10) if spec.kind == "vit" else x.shape) and torch.isfinite(out).all()


def test_pretraining_is_seeded_and_learns(vit) -> None:
    meta = json.loads((vit / "config.json").read_text())
    assert meta["kind"] == "vit" and meta["pretraining"]["test"]["accuracy"] > 0.5  # 10 Fashion-MNIST classes
    with pytest.raises(ValueError, match="holds a 'vit' backbone"):
        load_pretrained(str(vit), kind="dit")


def test_vit_few_shot_transfer_improves_and_merges(vit, tmp_path) -> None:
    config = RunConfig.from_dict({
        "task": "image_classification", "method": "loco", "adapter": {"rank": 2, "chain_length": 2},
        "model": {"checkpoint": str(vit)}, "data": {"shots": 10, "val_size": 200, "eval_split": "val"},
        "train": {"steps": 30, "batch_size": 25, "lr": 1e-2}, "output_dir": str(tmp_path / "run"), "device": "cpu",
    })
    results = finetune(config, progress=False)
    before, after = results["before"]["accuracy"], results["final"]["accuracy"]
    assert before > 0.3  # the class-mean head on pretrained features already transfers
    assert after >= before + 0.03, (before, after)

    task, adapted = load_trained(config, tmp_path / "run" / "adapter")
    merged = merge_adapter(config, tmp_path / "run" / "adapter", tmp_path / "merged")
    timm = pytest.importorskip("timm")
    plain = timm.create_model(f"local-dir:{merged}", pretrained=True).eval()  # a plain timm model from the folder alone
    x = task.eval_x[:32]
    with torch.no_grad():
        reference = adapted(pixel_values=x)["logits"]
        assert float((plain(x) - reference).norm() / reference.norm()) < 1e-5


def test_dit_transfer_lowers_the_denoising_loss_and_samples(dit, tmp_path) -> None:
    config = RunConfig.from_dict({
        "task": "diffusion", "method": "lora", "adapter": {"r": 4, "lora_alpha": 8},
        "model": {"checkpoint": str(dit)},
        "data": {"shots": 60, "val_size": 150, "eval_split": "val", "eval_timesteps": 4, "sample_steps": 4, "samples_per_class": 2},
        "train": {"steps": 40, "batch_size": 60, "lr": 1e-2}, "output_dir": str(tmp_path / "run"), "device": "cpu",
    })
    results = finetune(config, progress=False)
    before, after = results["before"]["denoising_loss"], results["final"]["denoising_loss"]
    assert after < 0.95 * before, (before, after)
    assert "samples.png" in results["files"] and (tmp_path / "run" / "samples.png").stat().st_size > 1000

    task, adapted = load_trained(config, tmp_path / "run" / "adapter")
    merged = merge_adapter(config, tmp_path / "run" / "adapter", tmp_path / "merged")
    plain = build_backbone("dit", json.loads((merged / "config.json").read_text())["model"])
    plain.load_state_dict(load_file(str(merged / "model.safetensors")))
    x, t, y = task.eval_x[:16], torch.arange(16) * 60, task.eval_y[:16]
    with torch.no_grad():
        reference = adapted(x, t, y)
        assert float((plain.eval()(x, t, y) - reference).norm() / reference.norm()) < 1e-5
