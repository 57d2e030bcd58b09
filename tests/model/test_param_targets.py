"""peft's target_parameters: per-expert adapters on stacked MoE weights (orthotune.model.param_targets)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import orthotune
from orthotune.interop.peft_params import load_peft_target_parameters
from orthotune.model.param_targets import (
    add_param_adapter,
    load_param_adapter,
    merge_param_adapters,
    param_adapters,
    save_param_adapter,
    set_param_adapters_enabled,
    unload_param_adapters,
    unmerge_param_adapters,
)

peft = pytest.importorskip("peft")
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def _moe() -> nn.Module:
    import transformers

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
        head_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


class Transposed(nn.Module):
    """Experts stored (E, in, out) with ``is_transposed`` (GPT-OSS's layout): y = x W[e] for every expert, summed."""

    is_transposed = True

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 6, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,eio->bo", x, self.weight)


X = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])


@torch.no_grad()
def test_peft_folder_loads_with_peft_outputs_and_merge(tmp_path) -> None:
    torch.manual_seed(1)
    config = peft.LoraConfig(target_modules=[], target_parameters=TARGETS, r=2, lora_alpha=4, init_lora_weights=False)
    theirs = peft.get_peft_model(_moe(), config).eval()
    theirs.save_pretrained(tmp_path)
    ours = _moe()
    assert load_peft_target_parameters(ours, tmp_path) == [f"model.layers.0.mlp.{t}" for t in TARGETS]
    expected = theirs(X).logits
    assert not torch.allclose(expected, _moe()(X).logits, atol=1e-3)
    assert torch.allclose(ours(X).logits, expected, atol=1e-6, rtol=1e-6)
    plain, peft_plain = unload_param_adapters(ours, merge=True), theirs.merge_and_unload()
    for name, p in peft_plain.named_parameters():
        assert torch.allclose(dict(plain.named_parameters())[name], p, atol=1e-6), name
    assert torch.allclose(plain(X).logits, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_transposed_layout_matches_peft(tmp_path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(Transposed())  # peft cannot target a parameter of the top-level module
    config = peft.LoraConfig(target_modules=[], target_parameters=["0.weight"], r=2, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    load_peft_target_parameters(ours, tmp_path)
    x = torch.randn(4, 6)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "config",
    [orthotune.LoRAConfig(r=2, init_identity=False), orthotune.OFTConfig(r=2, oft_block_size=0, init_identity=False),
     orthotune.HRAConfig(r=2, init_identity=False), orthotune.GOFTConfig(init_identity=False)],
    ids=["lora", "oft", "hra", "goft"],
)
def test_every_expert_gets_its_own_adapter(config, tmp_path) -> None:
    model = _moe()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_param_adapter(model, config, TARGETS)
    for full, adapters in param_adapters(model):
        owner, attr = full.rpartition(".")[0], full.rpartition(".")[2]
        W0 = before[full]
        with torch.no_grad():
            W = getattr(model.get_submodule(owner), attr)
            for e, method in enumerate(adapters.experts):  # (E, out, in): each slice is merged_weight of its own
                assert torch.allclose(W[e], method.merged_weight(W0[e]), atol=1e-6)
                if method.multiplicative:  # a rotation of the input side keeps each expert's singular values
                    assert torch.allclose(torch.linalg.svdvals(W[e]), torch.linalg.svdvals(W0[e]), atol=1e-5)
            assert not torch.allclose(W, W0, atol=1e-4)
    out = model(X).logits
    out.pow(2).mean().backward()
    trainable = [p for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.endswith(".original"))
    with torch.no_grad():
        merge_param_adapters(model)
        assert torch.allclose(model(X).logits, out, atol=1e-6)
        unmerge_param_adapters(model)
        assert all(torch.allclose(p, before[n.replace(".parametrizations.", ".").removesuffix(".original")], atol=1e-6)
                   for n, p in model.named_parameters() if n.endswith(".original"))
        set_param_adapters_enabled(model, False)
        assert torch.allclose(model(X).logits, _moe()(X).logits, atol=1e-6)
        set_param_adapters_enabled(model, True)
        save_param_adapter(model, tmp_path)
        reloaded = _moe()
        load_param_adapter(reloaded, tmp_path)
        assert torch.allclose(reloaded(X).logits, out, atol=1e-6)  # (model holds its weights after a merge round trip)
        base = unload_param_adapters(model, merge=False)
        assert all(torch.allclose(p, before[n], atol=1e-6) for n, p in base.named_parameters())


def test_clear_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="'experts.nope' matches no parameter"):
        add_param_adapter(_moe(), orthotune.LoRAConfig(r=2), ["experts.nope"])
    with pytest.raises(ValueError, match="exceeds"):  # a method that cannot fit a slice says so, naming it
        add_param_adapter(_moe(), orthotune.PiSSAConfig(r=12), ["experts.down_proj"])
    config = peft.LoraConfig(target_modules=["q_proj"], target_parameters=TARGETS, r=2, init_lora_weights=False)
    peft.get_peft_model(_moe(), config).save_pretrained(tmp_path)
    model = _moe()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="also holds tensors of target_modules"):
        load_peft_target_parameters(model, tmp_path)
    assert model.state_dict().keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@torch.no_grad()
def test_peft_nesting_follows_registration_order(tmp_path) -> None:
    """peft nests a module's ParamWrappers in parameter registration order, whatever the target list's order."""
    torch.manual_seed(1)
    config = peft.LoraConfig(target_modules=[], target_parameters=TARGETS[::-1], r=2, lora_alpha=4, init_lora_weights=False)
    theirs = peft.get_peft_model(_moe(), config).eval()
    theirs.save_pretrained(tmp_path)
    ours = _moe()
    load_peft_target_parameters(ours, tmp_path)
    assert torch.allclose(ours(X).logits, theirs(X).logits, atol=1e-6, rtol=1e-6)


def test_from_peft_points_to_the_parameter_loader(tmp_path) -> None:
    config = peft.LoraConfig(target_modules=[], target_parameters=TARGETS, r=2, init_lora_weights=False)
    peft.get_peft_model(_moe(), config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"load it with orthotune.interop.peft_params.load_peft_target_parameters"):
        orthotune.from_peft(_moe(), tmp_path)
