"""The six model kinds the port runs on, built offline and seeded: peft's toy models and tiny transformers.

``MLP`` and ``Conv2d`` are peft's ``MLP`` and ``ModelConv2D`` unchanged. ``EmbConv1D`` is peft's
``ModelEmbConv1D`` with a wider GPT-2 ``Conv1D`` (8 -> 4 instead of 5 -> 1), since a 1-output layer
with 5 inputs has no room for block rotations or rank-2 updates. The transformers models come from
configs with tiny sizes (one layer); dropout is off so that train-mode forwards are deterministic, as in eval.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import nn


class MLP(nn.Module):
    """peft's ``MLP``: Linear 10 -> 20, ReLU, Dropout(0.5), Linear 20 -> 2, LogSoftmax."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype)
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X)))))


class ModelEmbConv1D(nn.Module):
    """peft's ``ModelEmbConv1D`` (Embedding, GPT-2 Conv1D, Linear head), Conv1D widened to 8 -> 4."""

    def __init__(self, emb_size: int = 100) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(emb_size, 8)
        self.conv1d = Conv1D(4, 8)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(40, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(X))))))


class ModelConv2D(nn.Module):
    """peft's ``ModelConv2D``: a 5 -> 10 channel 3x3 convolution on 3x3 inputs, Linear head."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3, bias=bias)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype).reshape(-1, 5, 3, 3)
        return self.sm(self.lin0(self.flat(self.relu(self.conv2d(X)))))


def _tiny_llama() -> nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _tiny_gpt2() -> nn.Module:
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def _tiny_bert() -> nn.Module:
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        initializer_range=0.2,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg)


def _custom_inputs() -> dict[str, torch.Tensor]:
    return {"X": torch.arange(90).view(9, 10)}  # peft's prepare_inputs_for_testing for custom models


def _token_inputs() -> dict[str, torch.Tensor]:
    # peft's decoder inputs, with a third row so that per-sample checks see more than two samples
    ids = torch.tensor([[1, 1, 1, 5], [1, 2, 1, 7], [3, 4, 9, 11]])
    return {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 1]])}


@dataclass(frozen=True)
class Kind:
    """One model kind: how to build it, its inputs, default targets, and a module to train in full."""

    make: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    targets: list[str]
    save: str  # a module outside the targets, for modules_to_save cases
    transformers: bool = False
    generates: bool = False


KINDS: dict[str, Kind] = {
    "MLP": Kind(MLP, _custom_inputs, ["lin0"], "lin1"),
    "EmbConv1D": Kind(ModelEmbConv1D, _custom_inputs, ["conv1d"], "lin0"),
    "Conv2d": Kind(ModelConv2D, _custom_inputs, ["conv2d"], "lin0"),
    "llama": Kind(_tiny_llama, _token_inputs, ["q_proj", "v_proj"], "lm_head", transformers=True, generates=True),
    "gpt2": Kind(_tiny_gpt2, _token_inputs, ["c_attn"], "lm_head", transformers=True, generates=True),
    "bert": Kind(_tiny_bert, _token_inputs, ["query", "value"], "classifier", transformers=True),
}


@cache
def _prototype(kind: str) -> nn.Module:
    """Built under a forked RNG: whether a test builds it or finds it cached must not change the random state its
    adapters are then drawn from (test order under xdist would decide, e.g., LoCA's cells)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return KINDS[kind].make().eval()


def base_model(kind: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A fresh copy of the kind's seeded model (peft's ``from_pretrained`` always returns the same weights)."""
    model = copy.deepcopy(_prototype(kind))
    if dtype == torch.float32:
        return model
    if not KINDS[kind].transformers:
        model.dtype = dtype  # peft's toy models cast their float input to this attribute
    return model.to(dtype)


def inputs(kind: str) -> dict[str, torch.Tensor]:
    """The kind's test inputs (peft's ``prepare_inputs_for_testing``)."""
    return KINDS[kind].inputs()


def output(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """peft's ``model(**X)[0]`` for transformers models (the logits), the tensor itself for custom models."""
    out = model(**batch)
    return out if isinstance(out, torch.Tensor) else out[0]
