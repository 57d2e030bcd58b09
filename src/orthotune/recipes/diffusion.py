"""Diffusion-transformer fine-tuning: the DiT recipe, scored by held-out denoising loss and a sample grid.

DDPM noise prediction (Ho et al. 2020; 1,000 steps, linear betas 1e-4..0.02, as DiT uses) on a
compact DiT (:mod:`orthotune.recipes.dit`) pretrained on Fashion-MNIST and fine-tuned here on a
different real set (scikit-learn's handwritten digits): the transfer setting. The held-out loss
averages the noise-prediction error over held-out images at a fixed grid of timesteps with fixed
noise, so every run and every method is scored on exactly the same draws.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..methods.config import check_choice
from .ddpm import DDPM
from .images import IMAGE_SETS, load_images, to_signed, transfer_split
from .plots import image_grid
from .pretrain import load_pretrained
from .task import Task, batch_indices


@dataclass
class DiTModelSettings:
    checkpoint: str = "pretrained:dit-fmnist"  # a folder from `orthotune pretrain dit`, or pretrained:<name>


@dataclass
class DiTDataSettings:
    dataset: str = "digits"
    shots: int = 100  # training images per class; the rest are held out
    split_seed: int = 0
    label_dropout: float = 0.1  # classifier-free guidance: the null label this often
    val_size: int = 200  # held-out images set aside for tuning (eval_split: val)
    eval_split: str = "test"  # "test": the held-out images not in val; "val": the tuning images
    eval_size: int | None = None  # score only this many of the chosen split (default: all)
    eval_timesteps: int = 10  # timesteps t = T/2n, 3T/2n, ... per held-out image
    eval_batch_size: int = 500
    sample_steps: int = 50
    samples_per_class: int = 8
    guidance: float = 2.0

    def validate(self) -> None:
        check_choice("data.dataset", self.dataset, IMAGE_SETS)
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"data.label_dropout must be in [0, 1), got {self.label_dropout!r}")
        check_choice("data.eval_split", self.eval_split, ("val", "test"))


class DiffusionTask(Task):
    """Class-conditional DiT fine-tuning; metric: held-out denoising loss (lower is better)."""

    name = "diffusion"
    metric = "denoising_loss"
    higher_is_better = False
    default_targets = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    default_modules_to_save = ["y_embedder"]
    ModelSettings = DiTModelSettings
    DataSettings = DiTDataSettings

    def __init__(self, model: dict[str, Any], data: dict[str, Any], seed: int, device: torch.device) -> None:
        super().__init__(model, data, seed, device)
        self.pretrained = load_pretrained(self.model_settings.checkpoint, kind="dit")
        cfg = self.pretrained.config["model"]
        d = self.data_settings
        x, y = load_images(d.dataset, cfg["input_size"], "all" if d.dataset == "digits" else "train")
        train_idx, held_idx = transfer_split(y, d.shots, d.val_size, d.split_seed, d.eval_split)
        held_idx = held_idx[: d.eval_size]
        self.train_x, self.train_y = to_signed(x[train_idx]), y[train_idx]
        self.eval_x, self.eval_y = to_signed(x[held_idx]), y[held_idx]
        self.num_classes = int(y.max()) + 1
        if self.num_classes > cfg["num_classes"]:
            raise ValueError(f"{d.dataset} has {self.num_classes} classes, the DiT's label table {cfg['num_classes']}")
        self.null_label = cfg["num_classes"]
        self.ddpm = DDPM()

    def build_model(self, fresh: bool = True) -> nn.Module:
        return self.pretrained.build().to(self.device)

    def train_size(self) -> int:
        return len(self.train_y)

    def train_batch(self, epoch: int, index: int, batch_size: int) -> dict[str, Tensor]:
        idx = batch_indices(len(self.train_y), batch_size, self.seed, epoch, index)
        return {"x": self.train_x[idx].to(self.device), "y": self.train_y[idx].to(self.device)}

    def loss(self, model: nn.Module, batch: dict[str, Tensor], step: int) -> Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % 2**63)
        return self.ddpm.loss(model, batch["x"], batch["y"], g, self.data_settings.label_dropout, self.null_label)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        d = self.data_settings
        n, k = len(self.eval_y), d.eval_timesteps
        g = torch.Generator().manual_seed(12345)
        noise = torch.randn((k,) + tuple(self.eval_x.shape), generator=g)
        ts = ((torch.arange(k) + 0.5) * self.ddpm.steps / k).long()
        total = 0.0
        for j, t in enumerate(ts.tolist()):
            for start in range(0, n, d.eval_batch_size):
                x0 = self.eval_x[start : start + d.eval_batch_size].to(self.device)
                eps = noise[j, start : start + len(x0)].to(self.device)
                tt = torch.full((len(x0),), t, device=self.device, dtype=torch.long)
                pred = model(self.ddpm.add_noise(x0, eps, tt), tt, self.eval_y[start : start + len(x0)].to(self.device))
                total += float(F.mse_loss(pred.float(), eps, reduction="sum"))
        model.train(was_training)
        return {"denoising_loss": total / (n * k * self.eval_x[0].numel())}

    @torch.no_grad()
    def samples(self, model: nn.Module) -> Tensor:
        """``samples_per_class`` images of every class with fixed noise, in [0, 1], class-major."""
        d = self.data_settings
        y = torch.arange(self.num_classes).repeat_interleave(d.samples_per_class).to(self.device)
        shape = (len(y),) + tuple(self.train_x.shape[1:])
        x = self.ddpm.sample(model.eval(), y, shape, torch.Generator().manual_seed(777), d.sample_steps, d.guidance, self.null_label)
        return (x + 1) / 2

    def artifacts(self, model: nn.Module, out_dir: Path) -> list[str]:
        images = self.samples(model)[:, 0].float().cpu().numpy()
        real = ((self.eval_x[: self.data_settings.samples_per_class, 0] + 1) / 2).numpy()
        grid = np.concatenate([images, real])
        labels = [str(c) for c in range(self.num_classes)] + ["real"]
        return [str(image_grid(grid, out_dir / "samples.png", rows=self.num_classes + 1, row_labels=labels,
                               title=f"DDIM {self.data_settings.sample_steps} steps, guidance {self.data_settings.guidance}"))]

    def save_merged(self, model: nn.Module, directory: Path) -> None:
        """``model.safetensors`` + ``config.json``: ``CompactDiT(**config["model"])`` loads it strictly."""
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps({"arch": "dit", "model": model.config}, indent=2) + "\n")
