"""Pretraining of the backbones no package ships weights for: a small timm ViT and a compact DiT.

Both are trained from scratch on Fashion-MNIST (60,000 training images) with the shared loop
(:func:`orthotune.recipes.loop.fit`, every parameter trainable), seeded, then fine-tuned by the
recipes on a *different* real set (the transfer setting). ``orthotune pretrain vit|dit`` writes a
checkpoint folder (``model.safetensors`` + ``config.json`` with the architecture, the pretraining
spec and its Fashion-MNIST test score); recipes name it ``pretrained:<spec>``, which loads the
cached folder or pretrains it first. The same spec on the same software and device gives the same
weights; other devices or thread counts give equally good but not bit-equal ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..model.io import staging_folder
from .assets import cache_dir, install_dir
from .compat import import_timm
from .ddpm import DDPM
from .dit import CompactDiT
from .images import load_images, to_signed
from .loop import fit, resolve_device, seed_everything
from .settings import TrainSettings
from .task import Task, accuracy, batch_indices


@dataclass(frozen=True)
class PretrainSpec:
    """Architecture and training of one pretrained backbone."""

    kind: str  # "vit" (timm VisionTransformer kwargs) or "dit" (CompactDiT kwargs)
    model: dict[str, Any]
    steps: int
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.05
    seed: int = 0
    dataset: str = "fashion_mnist"
    label_dropout: float = 0.1  # dit: classifier-free guidance training
    extra: dict[str, Any] = field(default_factory=dict)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:10]


SPECS: dict[str, PretrainSpec] = {
    "vit-fmnist": PretrainSpec(
        kind="vit",
        model=dict(img_size=16, patch_size=2, in_chans=1, num_classes=10, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0),
        steps=2000,
    ),
    "dit-fmnist": PretrainSpec(
        kind="dit",
        model=dict(input_size=16, patch_size=2, in_channels=1, hidden_size=128, depth=4, num_heads=4, mlp_ratio=4.0, num_classes=10),
        steps=4000,
        weight_decay=0.0,
    ),
    # a CPU-sized DiT (16 tokens, width 64): for experiments on two cores
    "dit-fmnist-small": PretrainSpec(
        kind="dit",
        model=dict(input_size=16, patch_size=4, in_channels=1, hidden_size=64, depth=3, num_heads=4, mlp_ratio=4.0, num_classes=10),
        steps=1500,
        weight_decay=0.0,
    ),
    # a CPU-sized ViT (17 tokens, 137k parameters): pretrains in minutes on two cores
    "vit-fmnist-small": PretrainSpec(
        kind="vit",
        model=dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0),
        steps=800,
    ),
}


def build_backbone(kind: str, model: dict[str, Any]) -> nn.Module:
    """A fresh ViT (timm) or CompactDiT from architecture kwargs."""
    if kind == "vit":
        return import_timm().models.vision_transformer.VisionTransformer(**model)
    if kind == "dit":
        return CompactDiT(**model)
    raise ValueError(f"unknown backbone kind {kind!r}; choose 'vit' or 'dit'")


@dataclass
class Pretrained:
    """A pretrained checkpoint folder's config and weights."""

    config: dict[str, Any]
    state: dict[str, Tensor]

    def build(self) -> nn.Module:
        model = build_backbone(self.config["kind"], self.config["model"])
        model.load_state_dict(self.state, strict=True)
        return model


def load_pretrained(ref: str, kind: str) -> Pretrained:
    """``pretrained:<spec name>`` (cached, pretrained on first use) or a checkpoint folder."""
    from safetensors.torch import load_file

    folder = ensure_pretrained(ref.split(":", 1)[1]) if ref.startswith("pretrained:") else Path(ref)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ValueError(f"{folder} is not a pretrained checkpoint folder (config.json + model.safetensors); see `orthotune pretrain`")
    config = json.loads((folder / "config.json").read_text())
    if config.get("kind") != kind:
        raise ValueError(f"{folder} holds a {config.get('kind')!r} backbone, this recipe needs a {kind!r} one")
    return Pretrained(config, load_file(str(folder / "model.safetensors")))


def checkpoint_dir(name: str, spec: PretrainSpec | None = None) -> Path:
    """The cache folder of spec ``name`` (or of a variant ``spec`` of it: its own digest)."""
    if name not in SPECS:
        raise ValueError(f"unknown pretrained backbone {name!r}; choose one of {sorted(SPECS)}")
    return cache_dir() / "pretrained" / f"{name}-{(spec or SPECS[name]).digest()}"


def ensure_pretrained(name: str, progress: bool = True, spec: PretrainSpec | None = None) -> Path:
    """The cached checkpoint of spec ``name`` (or its variant ``spec``), pretraining it first if it is missing."""
    folder = checkpoint_dir(name, spec)
    if not (folder / "model.safetensors").is_file():
        pretrain(spec or SPECS[name], folder, progress=progress)
    return folder


class _PretrainTask(Task):
    """Fashion-MNIST training data and test metric for a backbone trained from scratch."""

    def __init__(self, spec: PretrainSpec, device: torch.device) -> None:  # a spec, not recipe settings
        self.spec, self.seed, self.device = spec, spec.seed, device
        size = spec.model["img_size"] if spec.kind == "vit" else spec.model["input_size"]
        x, self.train_y = load_images(spec.dataset, size, "train")
        tx, self.test_y = load_images(spec.dataset, size, "test")
        self.train_x, self.test_x = to_signed(x), to_signed(tx)

    def train_size(self) -> int:
        return len(self.train_y)

    def train_batch(self, epoch: int, index: int, batch_size: int) -> dict[str, Tensor]:
        idx = batch_indices(len(self.train_y), batch_size, self.seed, epoch, index)
        return {"x": self.train_x[idx].to(self.device), "y": self.train_y[idx].to(self.device)}


class ViTPretrainTask(_PretrainTask):
    name, metric = "pretrain_vit", "accuracy"

    def loss(self, model: nn.Module, batch: dict[str, Tensor], step: int) -> Tensor:
        return nn.functional.cross_entropy(model(batch["x"]).float(), batch["y"])

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        class Logits(nn.Module):  # the accuracy helper's {"logits"} convention
            def forward(self, x: Tensor) -> dict[str, Tensor]:
                return {"logits": model(x)}

        batches = ({"x": self.test_x[i : i + 1000].to(self.device), "labels": self.test_y[i : i + 1000].to(self.device)}
                   for i in range(0, len(self.test_y), 1000))
        return {"accuracy": accuracy(Logits(), batches)}


class DiTPretrainTask(_PretrainTask):
    name, metric, higher_is_better = "pretrain_dit", "denoising_loss", False

    def __init__(self, spec: PretrainSpec, device: torch.device) -> None:
        super().__init__(spec, device)
        self.ddpm = DDPM()

    def loss(self, model: nn.Module, batch: dict[str, Tensor], step: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return self.ddpm.loss(model, batch["x"], batch["y"], g, self.spec.label_dropout, self.spec.model["num_classes"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        g = torch.Generator().manual_seed(12345)
        x0, y = self.test_x[:2000].to(self.device), self.test_y[:2000].to(self.device)
        return {"denoising_loss": float(self.ddpm.loss(model.eval(), x0, y, g))}


def pretrain(spec: PretrainSpec, out: Path, progress: bool = True, device: str | None = None) -> Path:
    """Train ``spec`` from scratch and write its checkpoint folder ``out`` atomically."""
    from safetensors.torch import save_file

    seed_everything(spec.seed)
    dev = resolve_device(device or "auto")
    task = (ViTPretrainTask if spec.kind == "vit" else DiTPretrainTask)(spec, dev)
    model = build_backbone(spec.kind, spec.model).to(dev)
    settings = TrainSettings(steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr, weight_decay=spec.weight_decay,
                             warmup=spec.warmup, eval_before=False)
    settings.validate()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_folder(out)
    try:
        result = fit(model, task, settings, tmp, progress=progress)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        metrics = result.history["eval"][-1][1]
        config = {"kind": spec.kind, "model": spec.model, "pretraining": {**dataclasses.asdict(spec), "test": metrics,
                  "seconds": result.train_seconds, "device": str(dev), "torch": torch.__version__}}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if progress:
            print(f"pretrained {spec.kind} on {spec.dataset}: test {metrics} in {result.train_seconds:.0f} s -> {out}")
        return install_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
