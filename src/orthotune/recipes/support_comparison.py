"""Gradient-informed against random LOFT supports on a real model and real data.

all-MiniLM-L6-v2 (:func:`orthotune.recipes.assets.minilm_path`) embeds BANKING77 utterances
(:func:`orthotune.recipes.assets.load_intents`); a frozen nearest-class-mean head (cosine to the mean
embedding of each intent, from a disjoint set of training utterances) turns embeddings into
logits, so only the adapters learn and the loss measures what the rotation alone buys. Both
adapters rotate the same layers inside supports of the same size (the same trainable parameters),
start at the identity, see the same batches in the same order, and differ only in the support:
random orthonormal, or the dominant directions of ``Skew(W0^T G)`` (:func:`orthotune.select_supports`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import LOFTConfig, get_model, select_supports
from .assets import TextDataset, load_intents, minilm_path, offline


class PrototypeClassifier(nn.Module):
    """Mean-pooled, normalised sentence embeddings scored by cosine against fixed class prototypes."""

    def __init__(self, encoder: nn.Module, prototypes: Tensor, scale: float = 20.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("prototypes", F.normalize(prototypes, dim=-1))
        self.scale = scale

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0), dim=-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        logits = self.scale * self.embed(input_ids, attention_mask) @ self.prototypes.T
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


@dataclass
class Setting:
    """Sizes of one comparison; the defaults are the example script's, tests pass smaller ones."""

    r: int = 8
    targets: list[str] = field(default_factory=lambda: ["query", "key", "value", "attention.output.dense"])
    transform: str = "cayley"
    n_prototype: int = 616  # utterances that define the class means (8 per intent on average)
    n_train: int = 1024
    n_eval: int = 500
    max_length: int = 32
    batch_size: int = 32
    steps: int = 60
    selection_batches: int = 8
    lr: float = 2e-3  # gradient supports lie in high-curvature directions: 1e-2 already overshoots there
    optimizer: str = "adam"  # or "sgd"
    seed: int = 0


def _take(data: TextDataset, indices: list[int]) -> TextDataset:
    return TextDataset([data.texts[i] for i in indices], [data.labels[i] for i in indices], data.label_names)


def _encode(tokenizer, data: TextDataset, max_length: int) -> dict[str, Tensor]:
    enc = tokenizer(data.texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor(data.labels)}


def _batches(data: dict[str, Tensor], batch_size: int, seed: int) -> Iterator[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    n = len(data["labels"])
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield {k: v[idx] for k, v in data.items()}


@torch.no_grad()
def mean_loss(model: nn.Module, data: dict[str, Tensor], chunk: int = 128) -> float:
    """Mean cross-entropy over ``data`` in eval mode."""
    model.eval()
    n = len(data["labels"])
    total = 0.0
    for i in range(0, n, chunk):
        part = {k: v[i : i + chunk] for k, v in data.items()}
        total += float(F.cross_entropy(model(**part)["logits"], part["labels"], reduction="sum"))
    return total / n


def compare_supports(
    setting: Setting, supports: tuple[str, ...] = ("gradient", "random"), progress: bool = False
) -> dict[str, dict[str, float]]:
    """Train one LOFT adapter per support for ``setting.steps`` steps; report held-out losses.

    Returns ``{support: {"eval_loss", "train_loss" (mean of the last 5 steps), "trainable",
    "captured_fraction" (gradient only)}}`` and ``"base"`` with the loss before training.
    """
    from transformers import AutoModel, AutoTokenizer

    offline()
    path = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path).eval()
    train = load_intents("banking", "train")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(setting.seed)).tolist()
    proto_set = _take(train, order[: setting.n_prototype])  # disjoint from the training utterances
    train_set = _take(train, order[setting.n_prototype : setting.n_prototype + setting.n_train])
    train_data = _encode(tokenizer, train_set, setting.max_length)
    eval_set = load_intents("banking", "dev").subset(setting.n_eval, seed=setting.seed)
    eval_data = _encode(tokenizer, eval_set, setting.max_length)

    with torch.no_grad():
        probe = PrototypeClassifier(encoder, torch.eye(len(train.label_names), encoder.config.hidden_size))
        protos = _encode(tokenizer, proto_set, setting.max_length)
        emb = probe.embed(protos["input_ids"], protos["attention_mask"])
        prototypes = torch.zeros_like(probe.prototypes).index_add_(0, protos["labels"], emb)

    base_loss = mean_loss(PrototypeClassifier(encoder, prototypes), eval_data)
    report: dict[str, dict[str, float]] = {"base": {"eval_loss": base_loss}}
    for support in supports:
        torch.manual_seed(setting.seed)
        model = get_model(
            PrototypeClassifier(copy.deepcopy(encoder), prototypes),
            LOFTConfig(target_modules=setting.targets, support=support, r=setting.r, transform=setting.transform),
        )
        row: dict[str, float] = {"trainable": float(model.trainable_parameters()["trainable"])}
        if support in ("gradient", "gradient_coordinate"):
            data = _batches(train_data, setting.batch_size, setting.seed + 2)
            chosen = select_supports(model, data, num_batches=setting.selection_batches, progress=progress)
            row["captured_fraction"] = sum(v["captured_fraction"] for v in chosen.values()) / len(chosen)
        params = [p for p in model.parameters() if p.requires_grad]
        optim = torch.optim.SGD(params, lr=setting.lr) if setting.optimizer == "sgd" else torch.optim.Adam(params, lr=setting.lr)
        batches = _batches(train_data, setting.batch_size, setting.seed + 3)
        model.eval()  # no dropout: the two runs differ only in their supports
        losses = []
        for _ in range(setting.steps):
            loss = model(**next(batches))["loss"]
            optim.zero_grad()
            loss.backward()
            optim.step()
            losses.append(loss.item())
        row["train_loss"] = sum(losses[-5:]) / len(losses[-5:])
        row["eval_loss"] = mean_loss(model, eval_data)
        report[support] = row
    return report
