"""Image classification with a timm ViT: the VTAB-style few-shot transfer recipe.

No ViT with real pretrained weights ships offline, so the backbone is pretrained by orthotune on
Fashion-MNIST (``orthotune pretrain vit``; seeded, cached) and transferred here to a different
real set, scikit-learn's handwritten digits, from a few labelled examples per class (as VTAB-1k
transfers from 1,000). The head is a cosine classifier started from the class means of the
frozen features, so the step-0 score is a nearest-class-mean baseline that fine-tuning must beat.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import check_choice
from .images import IMAGE_SETS, load_images, transfer_split
from .task import CosineClassifier, Task, accuracy, batch_indices


class ImageClassifier(CosineClassifier):
    """A timm backbone (``num_classes=0``: pooled features) with a cosine head."""

    def __init__(self, backbone: nn.Module, num_labels: int, scale: float = 20.0) -> None:
        super().__init__(backbone.num_features, num_labels, scale)
        self.backbone = backbone

    def features(self, pixel_values: Tensor) -> Tensor:
        return self.backbone(pixel_values)


def normalise(x: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1], the pretraining's input convention."""
    return x * 2 - 1


@dataclass
class ViTModelSettings:
    checkpoint: str = "pretrained:vit-fmnist"  # a folder from `orthotune pretrain vit`, or pretrained:<name>
    head_scale: float = 20.0
    head_init: str = "class_means"  # or "random"

    def validate(self) -> None:
        check_choice("model.head_init", self.head_init, ("class_means", "random"))


@dataclass
class ViTDataSettings:
    dataset: str = "digits"
    shots: int = 20  # labelled training images per class; every other image is held out
    split_seed: int = 0  # the same split for every run seed
    val_size: int = 300  # held-out images set aside for tuning (eval_split: val)
    eval_split: str = "test"  # "test": the held-out images not in val; "val": the tuning images
    eval_batch_size: int = 512

    def validate(self) -> None:
        check_choice("data.dataset", self.dataset, IMAGE_SETS)
        check_choice("data.eval_split", self.eval_split, ("val", "test"))


class ImageClassificationTask(Task):
    """Few-shot transfer of a pretrained ViT; metric: held-out accuracy."""

    name = "image_classification"
    metric = "accuracy"
    default_targets = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    default_modules_to_save = ["head"]
    ModelSettings = ViTModelSettings
    DataSettings = ViTDataSettings

    def __init__(self, model: dict[str, Any], data: dict[str, Any], seed: int, device: torch.device) -> None:
        super().__init__(model, data, seed, device)
        from .pretrain import load_pretrained

        self.pretrained = load_pretrained(self.model_settings.checkpoint, kind="vit")
        d = self.data_settings
        x, y = load_images(d.dataset, self.pretrained.config["model"]["img_size"], "all" if d.dataset == "digits" else "test")
        train_idx, held_idx = transfer_split(y, d.shots, d.val_size, d.split_seed, d.eval_split)
        self.train_x, self.train_y = normalise(x[train_idx]), y[train_idx]
        self.eval_x, self.eval_y = normalise(x[held_idx]), y[held_idx]
        self.num_labels = int(y.max()) + 1

    def _batches(self, x: Tensor, y: Tensor, batch_size: int) -> Any:
        for start in range(0, len(y), batch_size):
            yield {"pixel_values": x[start : start + batch_size].to(self.device), "labels": y[start : start + batch_size].to(self.device)}

    def build_model(self, fresh: bool = True) -> nn.Module:
        backbone = self.pretrained.build()
        backbone.reset_classifier(0)  # pooled features out; the cosine head replaces the pretraining head
        model = ImageClassifier(backbone, self.num_labels, self.model_settings.head_scale).to(self.device)
        if fresh and self.model_settings.head_init == "class_means":
            model.init_head_from_class_means(self._batches(self.train_x, self.train_y, self.data_settings.eval_batch_size))
        return model

    def train_size(self) -> int:
        return len(self.train_y)

    def train_batch(self, epoch: int, index: int, batch_size: int) -> dict[str, Tensor]:
        idx = batch_indices(len(self.train_y), batch_size, self.seed, epoch, index)
        return {"pixel_values": self.train_x[idx].to(self.device), "labels": self.train_y[idx].to(self.device)}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"accuracy": accuracy(model, self._batches(self.eval_x, self.eval_y, self.data_settings.eval_batch_size))}

    def save_merged(self, model: nn.Module, directory: Path) -> None:
        """``model.safetensors`` (the timm backbone, ``num_classes=0``), ``head.safetensors``, ``config.json``."""
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}, str(directory / "model.safetensors"))
        save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, str(directory / "head.safetensors"))
        config = {"arch": "vit", "timm": {**self.pretrained.config["model"], "num_classes": 0},
                  "logits": "head(normalize(backbone(2 * x - 1)))"}
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
