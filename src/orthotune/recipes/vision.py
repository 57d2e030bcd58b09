"""Image classification with a timm ViT: the VTAB-style few-shot transfer recipe.

No ViT with real pretrained weights ships offline, so the backbone is pretrained by orthotune on
Fashion-MNIST (``orthotune pretrain vit``; seeded, cached) and transferred here to a different
real set, scikit-learn's handwritten digits, from a few labelled examples per class (as VTAB-1k
transfers from 1,000), or to the user's own images (:mod:`orthotune.recipes.imagefiles`). The model
is a plain timm classifier whose standard ``head`` starts from the class means of the frozen
features (so the step-0 score is a nearest-class-mean baseline that fine-tuning must beat); a merged
run is a timm folder that ``timm.create_model("local-dir:FOLDER", pretrained=True)`` loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..methods.config import check_choice
from .imagefiles import load_image_files
from .images import IMAGE_SETS, load_images, to_signed, transfer_split
from .pretrain import load_pretrained
from .task import Task, accuracy, batch_indices, init_head_from_class_means
from .userdata import label_key

TIMM_ARCH = "vit_tiny_patch16_224"  # the registered timm name a merged folder is rebuilt from (its model_args override every size)


class ImageClassifier(nn.Module):
    """A timm classifier returning ``{"logits", "loss"}`` for the shared training loop."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        logits = self.model(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.float(), labels)
        return out


@dataclass
class ViTModelSettings:
    checkpoint: str = "pretrained:vit-fmnist"  # a folder from `orthotune pretrain vit`, or pretrained:<name>
    head_scale: float = 20.0
    head_init: str = "class_means"  # or "random"

    def validate(self) -> None:
        check_choice("model.head_init", self.head_init, ("class_means", "random"))


@dataclass
class ViTDataSettings:
    dataset: str = "digits"  # a bundled set, used when no train_file is given
    train_file: str | None = None  # a folder per class (ImageFolder layout) or a CSV/TSV/JSON lines of path,label
    validation_file: str | None = None  # scored with eval_split: val
    test_file: str | None = None  # scored with eval_split: test
    image_column: str = "path"  # table files: image paths, relative to the table's folder or absolute
    label_column: str = "label"
    labels: list[str] | None = None  # the label list (id = position); default: the training file's, sorted
    drop_invalid_rows: bool = False  # drop (and record) unusable rows instead of stopping
    shots: int = 20  # bundled set: labelled training images per class; every other image is held out
    split_seed: int = 0  # the same split for every run seed
    val_size: int = 300  # bundled set: held-out images set aside for tuning (eval_split: val)
    eval_split: str = "test"  # "test": the held-out images not in val (or test_file); "val": the tuning images
    eval_batch_size: int = 512

    def validate(self) -> None:
        check_choice("data.dataset", self.dataset, IMAGE_SETS)
        check_choice("data.eval_split", self.eval_split, ("val", "test"))
        wanted = "validation_file" if self.eval_split == "val" else "test_file"
        if self.train_file is not None and getattr(self, wanted) is None:
            raise ValueError(f"data.eval_split is {self.eval_split!r} but data.{wanted} is not set")
        if self.train_file is None and (self.validation_file or self.test_file):
            raise ValueError("data.validation_file / data.test_file need data.train_file (the labels come from it)")
        if self.labels is not None:
            self.labels = [label_key(v) for v in self.labels]


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
        self.pretrained = load_pretrained(self.model_settings.checkpoint, kind="vit")
        self.arch = self.pretrained.config["model"]
        d = self.data_settings
        if d.train_file is not None:
            files = load_image_files(d, self.arch["img_size"], self.arch["in_chans"])
            self.label_names, self.files = files.label_names, files
            (self.train_x, self.train_y), (self.eval_x, self.eval_y) = files.splits["train"], files.splits[d.eval_split]
        else:
            self.files = None
            x, y = load_images(d.dataset, self.arch["img_size"], "all" if d.dataset == "digits" else "test")
            train_idx, held_idx = transfer_split(y, d.shots, d.val_size, d.split_seed, d.eval_split)
            self.train_x, self.train_y = x[train_idx], y[train_idx]
            self.eval_x, self.eval_y = x[held_idx], y[held_idx]
            self.label_names = [str(i) for i in range(int(y.max()) + 1)]
        self.train_x, self.eval_x = to_signed(self.train_x), to_signed(self.eval_x)

    def check_data(self) -> dict[str, Any]:
        d = self.data_settings
        record: dict[str, Any] = {"settings": {"labels": self.label_names},
                                  "label2id": {n: i for i, n in enumerate(self.label_names)},
                                  "used": {"train": len(self.train_y), d.eval_split: len(self.eval_y)}}
        if self.files is not None:
            record["settings"].update(self.files.paths)
            record.update(source="files", rows=self.files.rows, dropped=self.files.dropped)
        else:
            record["source"] = f"bundled:{d.dataset}"
        return record

    def _batches(self, x: Tensor, y: Tensor, batch_size: int) -> Any:
        for start in range(0, len(y), batch_size):
            yield {"pixel_values": x[start : start + batch_size].to(self.device), "labels": y[start : start + batch_size].to(self.device)}

    def build_model(self, fresh: bool = True) -> nn.Module:
        backbone = self.pretrained.build()
        backbone.reset_classifier(len(self.label_names))  # timm's standard head, sized for this data
        backbone.pretrained_cfg = self.timm_cfg()
        model = ImageClassifier(backbone).to(self.device)
        if fresh and self.model_settings.head_init == "class_means":
            init_head_from_class_means(model, backbone.head, self._batches(self.train_x, self.train_y, self.data_settings.eval_batch_size),
                                       self.model_settings.head_scale)
        return model

    def timm_cfg(self) -> dict[str, Any]:
        """timm's pretrained_cfg of the model: input size and the [-1, 1] normalisation (mean = std = 0.5)."""
        c, s = self.arch["in_chans"], self.arch["img_size"]
        return {"architecture": TIMM_ARCH, "input_size": (c, s, s), "mean": (0.5,) * c, "std": (0.5,) * c, "crop_pct": 1.0,
                "interpolation": "bilinear", "num_classes": len(self.label_names), "classifier": "head",
                "first_conv": "patch_embed.proj", "label_names": self.label_names}

    def train_size(self) -> int:
        return len(self.train_y)

    def train_batch(self, epoch: int, index: int, batch_size: int) -> dict[str, Tensor]:
        idx = batch_indices(len(self.train_y), batch_size, self.seed, epoch, index)
        return {"pixel_values": self.train_x[idx].to(self.device), "labels": self.train_y[idx].to(self.device)}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"accuracy": accuracy(model, self._batches(self.eval_x, self.eval_y, self.data_settings.eval_batch_size))}

    def save_merged(self, model: nn.Module, directory: Path) -> None:
        """A timm folder (``config.json`` + ``model.safetensors``): ``timm.create_model("local-dir:DIR", pretrained=True)``."""
        from timm.models import save_for_hf

        timm_model = model.model
        timm_model.pretrained_cfg = self.timm_cfg()
        args = {**self.arch, "num_classes": len(self.label_names)}
        save_for_hf(timm_model, str(directory), model_args=args, safe_serialization=True)
        config = json.loads((directory / "config.json").read_text())
        config["label_names"] = self.label_names
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
