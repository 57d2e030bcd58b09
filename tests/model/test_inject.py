"""Target matching like peft, and clear errors that leave the model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import orthotune
from orthotune import LoCOConfig, LoRAConfig
from orthotune.layer.adapter_layer import AdapterLayer

from ..conftest import MLP


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8)}) for _ in range(3))
        self.lm_head = nn.Linear(8, 10)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for b in self.blocks:
            h = h + b["v_proj"](torch.tanh(b["q_proj"](h)))
        return self.lm_head(h)


def adapted(model: orthotune.OrthoModel) -> list[str]:
    return sorted(n for n, _ in model.adapter_layers())


def test_list_matches_names_and_suffixes() -> None:
    m = orthotune.get_model(Tower(), LoCOConfig(target_modules=["q_proj", "blocks.2.v_proj"], rank=1))
    assert adapted(m) == ["blocks.0.q_proj", "blocks.1.q_proj", "blocks.2.q_proj", "blocks.2.v_proj"]


def test_regex_fullmatch() -> None:
    m = orthotune.get_model(Tower(), LoCOConfig(target_modules=r"blocks\.[01]\.v_proj", rank=1))
    assert adapted(m) == ["blocks.0.v_proj", "blocks.1.v_proj"]


def test_all_linear_skips_output_head_and_exclude() -> None:
    m = orthotune.get_model(Tower(), LoCOConfig(target_modules="all-linear", exclude_modules=["blocks.0.q_proj"], rank=1))
    assert "lm_head" not in adapted(m)
    assert len(adapted(m)) == 5


def test_frozen_base_and_summary(capsys) -> None:
    m = orthotune.get_model(Tower(), LoRAConfig(target_modules=["q_proj"], r=2))
    assert all(not p.requires_grad for n, p in m.named_parameters() if "adapters." not in n)
    m.print_trainable_parameters()
    assert "trainable params: 96 " in capsys.readouterr().out  # 3 layers x 2 x (8 + 8)


@pytest.mark.parametrize(
    "targets,match",
    [
        (["qproj"], r"'qproj' matches no module.*did you mean \['q_proj'"),
        (["blocks.0"], r"target 'blocks.0' is a ModuleDict, not a layer orthotune adapts"),
        (r"nothing\d+", "matched no adaptable layer"),
        ("blocks(", "not a valid regex"),
    ],
)
def test_bad_targets_fail_clearly_and_change_nothing(targets, match) -> None:
    model = Tower()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        orthotune.get_model(model, LoCOConfig(target_modules=targets, rank=1))
    assert not any(isinstance(x, AdapterLayer) for x in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_no_targets_without_default_asks_for_them() -> None:
    with pytest.raises(ValueError, match="target_modules is not set"):
        orthotune.get_model(MLP(), LoCOConfig(rank=1))


def test_wrong_config_type_and_duplicate_names() -> None:
    m = orthotune.get_model(MLP(), LoCOConfig(target_modules=["lin1"], rank=1))
    with pytest.raises(ValueError, match="AdapterConfig"):
        m.add_adapter("x", {"rank": 1})
    with pytest.raises(ValueError, match="exists already"):
        m.add_adapter("default", LoCOConfig(target_modules=["lin1"], rank=1))
    with pytest.raises(ValueError, match="already carries orthotune adapters"):
        orthotune.get_model(m, LoCOConfig(target_modules=["lin1"]))
    with pytest.raises(ValueError, match="unknown adapter"):
        m.set_adapter("nope")


def test_modules_to_save_trains_a_copy_and_rejects_overlap() -> None:
    model = MLP()
    head = copy.deepcopy(model.head.state_dict())
    m = orthotune.get_model(model, LoCOConfig(target_modules=["lin1"], rank=1, modules_to_save=["head"]))
    x = torch.randn(3, 16)
    m(x).sum().backward()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    assert all(torch.equal(v, m.base_model.head.original.state_dict()[k]) for k, v in head.items())
    assert not torch.equal(m.base_model.head.copies["default"].weight, head["weight"])
    with pytest.raises(ValueError, match="inside modules_to_save"):
        orthotune.get_model(MLP(), LoCOConfig(target_modules=["head"], modules_to_save=["head"], rank=1))


def test_gpt2_conv1d_is_adapted_with_transposed_weight() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    base = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    m = orthotune.get_model(base, LoCOConfig(target_modules="all-linear", rank=2, init_identity=False))
    assert "lm_head" not in adapted(m)
    assert {n.split(".")[-1] for n in adapted(m)} == {"c_attn", "c_proj", "c_fc"}
    y = m(input_ids=ids).logits
    m.merge()
    assert torch.allclose(m(input_ids=ids).logits, y, atol=1e-4)


def test_default_targets_follow_the_architecture() -> None:
    from transformers import ViTConfig, ViTModel

    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8))
    m = orthotune.get_model(vit, LoCOConfig(rank=2))
    assert {n.rsplit(".", 1)[1] for n in adapted(m)} in ({"q_proj", "v_proj"}, {"query", "value"})
    assert len(adapted(m)) == 4
