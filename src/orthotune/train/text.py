"""Text classification on a sentence encoder: model, batching, training and evaluation.

``SentenceClassifier`` mean-pools a pretrained encoder (as sentence-transformers does for
all-MiniLM-L6-v2) and classifies with a cosine head, which can start from the class means of the
frozen embeddings: a zero-training baseline that fine-tuning must beat.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .assets import TextDataset


class SentenceClassifier(nn.Module):
    """``logits = head(normalise(mean_pool(encoder(x))))``; returns peft/Trainer-style outputs."""

    def __init__(self, encoder: nn.Module, num_labels: int, scale: float = 20.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)
        self.scale = scale

    def embed(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * mask).sum(1) / mask.sum(1).clamp_min(1.0), dim=-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None, **kwargs: Any) -> dict[str, Tensor]:
        logits = self.head(self.embed(input_ids, attention_mask, **kwargs))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out

    @torch.no_grad()
    def init_head_from_class_means(self, batches: Iterator[dict[str, Tensor]]) -> None:
        """Nearest-class-mean head on the frozen embeddings (cosine, scaled)."""
        num_labels, dim = self.head.weight.shape
        sums = torch.zeros(num_labels, dim)
        for batch in batches:
            emb = self.embed(batch["input_ids"], batch["attention_mask"]).float()
            sums.index_add_(0, batch["labels"], emb)
        self.head.weight.copy_(F.normalize(sums, dim=-1) * self.scale)
        self.head.bias.zero_()


def batches(
    data: TextDataset, tokenizer: Any, batch_size: int, *, shuffle: bool, seed: int = 0, max_length: int = 64
) -> Iterator[dict[str, Tensor]]:
    """Tokenised batches; shuffled with a seed for training, length-sorted (less padding) otherwise."""
    order = list(range(len(data)))
    if shuffle:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    else:
        order.sort(key=lambda i: len(data.texts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer([data.texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor([data.labels[i] for i in idx])}


@torch.no_grad()
def evaluate(model: nn.Module, data: TextDataset, tokenizer: Any, batch_size: int = 128, desc: str = "eval") -> float:
    """Accuracy on ``data``."""
    was_training = model.training
    model.eval()
    correct = 0
    for batch in tqdm(batches(data, tokenizer, batch_size, shuffle=False), total=math.ceil(len(data) / batch_size), desc=desc, leave=False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["logits"]
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    model.train(was_training)
    return correct / len(data)


def train(
    model: nn.Module,
    data: TextDataset,
    tokenizer: Any,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 3e-3,
    warmup: float = 0.1,
    seed: int = 0,
) -> list[float]:
    """AdamW with one-cycle schedule over the trainable parameters; returns the per-step losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: did get_model() match any module?")
    steps = epochs * math.ceil(len(data) / batch_size)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=warmup)
    losses: list[float] = []
    model.train()
    with tqdm(total=steps, desc="fine-tune") as bar:
        for epoch in range(epochs):
            for batch in batches(data, tokenizer, batch_size, shuffle=True, seed=seed + epoch):
                loss = model(**batch)["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update()
    model.eval()
    return losses
