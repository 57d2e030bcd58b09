"""nn.Embedding, nn.Conv1d, grouped nn.Conv2d and nn.Conv3d for every method: identity at init, merged ==
unmerged, save/load, gradcheck, and peft's numbers where peft has the method on that kind (LoRA on
Embedding / Conv1d / Conv3d, OFT on Embedding)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn
from torch.func import functional_call

import orthotune
from orthotune.layer.adapter_layer import AdapterLayer

from ..method_cases import CASES, Case
from ..methods.test_contract import train_steps

TARGETS = ["emb", "conv1", "gconv", "conv3"]


class KindsNet(nn.Module):
    """One layer of each kind, fed from one embedding lookup: every d_in is 16 or 32."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 16, padding_idx=0)
        self.conv1 = nn.Conv1d(16, 8, 2, padding=1)  # d_in 32
        self.gconv = nn.Conv2d(8, 8, 2, groups=2, padding=1)  # d_in 4 * 2 * 2 = 16
        self.conv3 = nn.Conv3d(8, 8, (1, 2, 2))  # d_in 32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (B, 8, 16)
        b = h.shape[0]
        c1 = self.conv1(h.transpose(1, 2))
        g = self.gconv(torch.tanh(h).reshape(b, 8, 4, 4))
        c3 = self.conv3(h.reshape(b, 8, 2, 2, 4))
        return torch.cat([h.mean(1), c1.mean(-1), g.mean((-1, -2)), c3.mean((-1, -2, -3))], -1)


def ids(low: int = 0) -> torch.Tensor:
    return torch.randint(low, 12, (3, 8))


def build(case: Case, **overrides) -> orthotune.OrthoModel:
    config = orthotune.methods.registry.METHODS[case.method][0](target_modules=TARGETS, **{**case.kwargs, **overrides})
    return orthotune.get_model(KindsNet(), config)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_identity_merge_save_load(case: Case, tmp_path) -> None:
    x = ids()
    base = KindsNet()
    model = orthotune.get_model(copy.deepcopy(base), orthotune.methods.registry.METHODS[case.method][0](target_modules=TARGETS, **case.kwargs))
    assert sorted(n for n, _ in model.adapter_layers()) == sorted(TARGETS)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-6)

    config = orthotune.methods.registry.METHODS[case.method][0](target_modules=TARGETS, **case.kwargs, init_identity=False)
    model = orthotune.get_model(copy.deepcopy(base), config)
    train_steps(model, x)
    out = model(x)
    model.save_adapter(tmp_path / "a")
    again = orthotune.load_adapter(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(again(x), out, rtol=0, atol=0)

    model.merge()
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)
    model.unmerge()
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(plain(x), out, rtol=1e-5, atol=1e-5)


GRADCHECK = [c for c in CASES if c.method in ("lora", "pissa", "fourierft", "loca", "loco", "oft", "hra", "boft")][::2]


@pytest.mark.parametrize("case", GRADCHECK, ids=[c.id for c in GRADCHECK])
def test_gradcheck(case: Case) -> None:
    model = build(case, init_identity=False).double()
    x = ids(low=1)  # the padding row, as in peft, passes no gradient to what produced it
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def f(*params: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(names, params)), (x,))

    params = tuple(p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad)
    assert torch.autograd.gradcheck(f, params, fast_mode=True)


def test_embedding_rotation_turns_each_row() -> None:
    """The orthogonal family on an embedding rotates the embedding dimension: e = W[i] R."""
    model = orthotune.get_model(KindsNet(), orthotune.LoCOConfig(target_modules=["emb"], rank=2, init_identity=False))
    layer = model.base_model.emb
    R = layer.adapters["default"].rotation()
    x = ids()
    torch.testing.assert_close(layer(x), layer.base_layer(x) @ R, rtol=1e-5, atol=1e-6)
    assert layer.num_embeddings == 12 and layer.padding_idx == 0  # the wrapped layer's attributes read through


def perturbed_peft(model: nn.Module, config: peft.PeftConfig) -> nn.Module:
    theirs = peft.get_peft_model(model, config)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad and "modules_to_save" not in n:
                p.normal_(std=0.2)
    return theirs


@pytest.mark.parametrize(
    "config,targets",
    [
        (peft.LoraConfig(r=4, lora_alpha=6), ["emb", "conv1", "conv3"]),
        (peft.LoraConfig(r=2, lora_alpha=2, use_rslora=True, rank_pattern={"emb": 3}), ["emb", "conv1"]),
        (peft.OFTConfig(oft_block_size=4, use_cayley_neumann=False), ["emb"]),
        (peft.OFTConfig(r=4, oft_block_size=0, use_cayley_neumann=True), ["emb"]),
    ],
    ids=["lora", "lora-rslora-pattern", "oft", "oft-neumann"],
)
def test_equal_to_peft_both_ways(config: peft.PeftConfig, targets: list[str], tmp_path) -> None:
    base = KindsNet().eval()
    config.target_modules = targets
    theirs = perturbed_peft(copy.deepcopy(base), config)
    theirs.save_pretrained(tmp_path / "peft")
    x = ids()
    with torch.no_grad():
        ref = theirs(x)
    ours = orthotune.from_peft(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(ours(x), ref, rtol=1e-5, atol=1e-5)
    train_steps(ours, x)
    ours.export_peft(tmp_path / "back")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back.merge_and_unload()(x), ours.merge_and_unload()(x), rtol=1e-5, atol=1e-5)


def test_grouped_conv_lora_is_not_peft_and_says_why(tmp_path) -> None:
    model = orthotune.get_model(KindsNet(), orthotune.LoRAConfig(target_modules=["gconv"], r=2))
    with pytest.raises(ValueError, match=r"grouped convolution \(groups=2\): peft's LoRA there adds a full"):
        model.export_peft(tmp_path / "p")
    theirs = peft.get_peft_model(KindsNet(), peft.LoraConfig(target_modules=["gconv"], r=2))
    theirs.save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match="grouped convolution"):
        orthotune.from_peft(KindsNet(), tmp_path / "q")


def test_embedding_with_max_norm_is_refused() -> None:
    net = KindsNet()
    net.emb.max_norm = 1.0
    with pytest.raises(ValueError, match="max_norm=1.0, which renormalises rows"):
        orthotune.get_model(net, orthotune.LoRAConfig(target_modules=["emb"], r=2))


def test_merging_a_tied_embedding_warns() -> None:
    import transformers

    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = orthotune.get_model(transformers.GPT2LMHeadModel(cfg).eval(), orthotune.LoRAConfig(target_modules=["wte"], r=2))
    with pytest.warns(UserWarning, match=r"merging into 'transformer.wte' also changes \['lm_head.weight'\]"):
        model.merge()
