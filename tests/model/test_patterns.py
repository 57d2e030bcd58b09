"""layers_to_transform / layers_pattern and the per-module size patterns (rank_pattern, ...): the modules
peft selects and the sizes it gives them, on tiny GPT-2, Llama and BERT models; saved and reloaded;
peft folders with patterns both ways."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers
from torch import nn

import orthotune
from orthotune import FourierFTConfig, LoCOConfig, LoRAConfig, PiSSAConfig
from orthotune.methods.config import pattern_key


def tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=32)
    return transformers.BertForSequenceClassification(cfg).eval()


# (model, peft/orthotune LoRA kwargs): each row is selected and sized by peft and by orthotune
SPECS = [
    ("gpt2", dict(target_modules=["c_attn"], layers_to_transform=[0, 2])),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"], layers_to_transform=1, layers_pattern="h")),
    ("gpt2", dict(target_modules=["c_attn", "mlp.c_proj"], rank_pattern={"h.1.attn.c_attn": 4}, alpha_pattern={"c_proj": 2})),
    ("gpt2", dict(target_modules=["transformer.h.0.attn.c_attn", "c_fc"], layers_to_transform=[2])),
    ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers")),
    ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 1], layers_pattern=["blocks", "layers"])),
    ("llama", dict(target_modules=["q_proj", "k_proj", "o_proj"], rank_pattern={r"layers\.[02]\..*": 1, "k_proj": 6})),
    ("llama", dict(target_modules=r".*\.(q|v)_proj", rank_pattern={"^model.layers.1.self_attn.v_proj": 3}, alpha_pattern={"q_proj": 16})),
    ("bert", dict(target_modules=["query", "value", "dense"], layers_to_transform=[0, 2], layers_pattern="layer")),
    ("bert", dict(target_modules=["query", "value"], rank_pattern={"layer.2.attention.self.query": 5}, alpha_pattern={"value": 1})),
]  # fmt: skip


def peft_sizes(model: nn.Module, config: peft.PeftConfig, size: str) -> dict[str, tuple]:
    """{module name: (its size, scaling)} of the layers peft adapts."""
    injected = peft.inject_adapter_in_model(config, copy.deepcopy(model))
    out = {}
    for name, module in injected.named_modules():
        if isinstance(module, peft.tuners.tuners_utils.BaseTunerLayer):
            out[name] = (getattr(module, size)["default"], getattr(module, "scaling", {}).get("default"))
    return out


@pytest.mark.parametrize("model_kind,kwargs", SPECS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(SPECS)])
def test_same_modules_and_ranks_as_peft(model_kind: str, kwargs: dict) -> None:
    model = tiny(model_kind)
    theirs = peft_sizes(model, peft.LoraConfig(r=2, lora_alpha=8, **kwargs), "r")
    ours = orthotune.get_model(model, LoRAConfig(r=2, lora_alpha=8, **kwargs))
    got = {n: (layer.adapters["default"].config.r, layer.adapters["default"].scaling) for n, layer in ours.adapter_layers()}
    assert got == theirs
    assert len(got) >= 2


def test_fourierft_n_frequency_pattern_like_peft() -> None:
    model = tiny("llama")
    kwargs = dict(target_modules=["q_proj", "v_proj"], n_frequency=6, n_frequency_pattern={"layers.1.self_attn.v_proj": 9})
    theirs = peft_sizes(model, peft.FourierFTConfig(**kwargs), "fourierft_n_frequency")
    ours = orthotune.get_model(model, FourierFTConfig(**kwargs))
    got = {n: layer.adapters["default"].spectrum.numel() for n, layer in ours.adapter_layers()}
    assert got == {n: size for n, (size, _) in theirs.items()}
    assert sorted(set(got.values())) == [6, 9]


def test_pattern_key_is_peft_rule() -> None:
    from peft.utils.other import get_pattern_key

    table = {r"layers\.\d\.mlp\..*": 1, "q_proj": 2, "^model.layers.0.self_attn.q_proj": 3, "o": 4}
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.3.mlp.up_proj", "proj", "o", "model.o", "q_proj.o.x"]:
        mine = pattern_key(table, name)
        assert (mine if mine is not None else name) == get_pattern_key(list(table), name)


def test_all_linear_with_layers_to_transform_keeps_those_layers() -> None:
    # peft 0.21 expands 'all-linear' into full names and so ignores layers_to_transform; orthotune applies it
    ours = orthotune.get_model(tiny("llama"), LoRAConfig(target_modules="all-linear", layers_to_transform=[2], r=2))
    names = [n for n, _ in ours.adapter_layers()]
    assert len(names) == 7 and all(n.startswith("model.layers.2.") for n in names)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(target_modules=r".*q_proj", layers_to_transform=[0]), "cannot be used when target_modules is a regex"),
        (dict(target_modules=["q_proj"], layers_pattern="layers"), "set layers_to_transform too"),
        (dict(target_modules=["q_proj"], layers_to_transform=[-1]), "layer indices >= 0"),
        (dict(target_modules=["q_proj"], rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]=0 is not a valid r"),
        (dict(target_modules=["q_proj"], rank_pattern={"(": 2}), "rank_pattern key '\\(' is not a valid regex"),
        (dict(target_modules=["q_proj"], layers_to_transform=[7]), "matched no adaptable layer"),
    ],
)
def test_bad_selection_fails_clearly(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        orthotune.get_model(tiny("llama"), LoRAConfig(r=2, **kwargs))


def test_pattern_too_large_for_one_layer_names_it() -> None:
    with pytest.raises(ValueError, match=r"rank=9 is too large for 'model.layers.1.self_attn.v_proj'"):
        orthotune.get_model(tiny("llama"), LoCOConfig(target_modules=["v_proj"], rank=1, rank_pattern={"layers.1.self_attn.v_proj": 9}))


@pytest.mark.parametrize(
    "config",
    [
        LoRAConfig(target_modules=["q_proj", "v_proj"], r=2, rank_pattern={"v_proj": 4}, alpha_pattern={"layers.0.*": 3.0},
                   layers_to_transform=[0, 2], layers_pattern="layers", init_identity=False),
        LoCOConfig(target_modules=["q_proj", "o_proj"], rank=1, chain_length=2, rank_pattern={"o_proj": 2},
                   chain_length_pattern={"layers.1.self_attn.q_proj": 3}, init_identity=False),
        FourierFTConfig(target_modules=["q_proj"], n_frequency=5, n_frequency_pattern={"layers.2.*": 11}, init_identity=False),
    ],
    ids=["lora", "loco", "fourierft"],
)
def test_save_and_reload_keeps_selection_and_sizes(config, tmp_path) -> None:
    model = orthotune.get_model(tiny("llama"), config)
    ids = torch.randint(0, 50, (2, 5))
    ref = model(ids).logits
    model.save_adapter(tmp_path / "a")
    again = orthotune.load_adapter(tiny("llama"), tmp_path / "a")
    assert again.configs["default"] == config
    shapes = lambda m: {n: {k: v.shape for k, v in layer.adapters["default"].state_dict().items()} for n, layer in m.adapter_layers()}  # noqa: E731
    assert shapes(again) == shapes(model)
    assert len({str(s) for s in shapes(model).values()}) > 1  # the patterns made sizes differ
    torch.testing.assert_close(again(ids).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_peft_lora_folder_with_patterns_both_ways(method: str, tmp_path) -> None:
    model = tiny("llama")
    kwargs = dict(target_modules=["q_proj", "v_proj", "up_proj"], r=2, lora_alpha=4, layers_to_transform=[0, 1],
                  rank_pattern={"v_proj": 4, "layers.1.mlp.up_proj": 3}, alpha_pattern={"q_proj": 6})
    init = "pissa" if method == "pissa" else False
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(init_lora_weights=init, **kwargs))
    if method == "lora":
        with torch.no_grad():
            for n, p in theirs.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.1)
    theirs.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        ref = theirs(ids).logits
    ours = orthotune.from_peft(copy.deepcopy(model), tmp_path / "peft")
    torch.testing.assert_close(ours(ids).logits, ref, rtol=1e-5, atol=1e-5)
    assert ours.configs["default"].rank_pattern == kwargs["rank_pattern"]

    ours.export_peft(tmp_path / "back")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref, rtol=1e-5, atol=1e-5)
    ranks = {n: m.r["default"] for n, m in back.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    factor = 2 if method == "pissa" else 1  # a PiSSA adapter exports as a LoRA of twice the rank
    assert sorted(set(ranks.values())) == sorted({factor * r for r in (2, 3, 4)})


def test_fourierft_folder_with_pattern_both_ways(tmp_path) -> None:
    model = tiny("gpt2")
    config = peft.FourierFTConfig(target_modules=["c_attn"], n_frequency=8, n_frequency_pattern={"h.1.attn.c_attn": 12},
                                  init_weights=False)
    peft.get_peft_model(copy.deepcopy(model), config).save_pretrained(tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "peft")
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        ref = theirs(ids).logits
    ours = orthotune.from_peft(copy.deepcopy(model), tmp_path / "peft")
    torch.testing.assert_close(ours(ids).logits, ref, rtol=1e-5, atol=1e-5)
    ours.export_peft(tmp_path / "back")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_pattern_without_peft_counterpart_is_not_exported(tmp_path) -> None:
    model = orthotune.get_model(tiny("llama"), orthotune.HRAConfig(target_modules=["q_proj"], r=2, rank_pattern={"layers.0.*": 4}))
    assert model.base_model.model.layers[0].self_attn.q_proj.adapters["default"].transform.u.shape[-1] == 4
    with pytest.raises(ValueError, match="peft's HRA has no rank_pattern"):
        model.export_peft(tmp_path / "x")
    assert not (tmp_path / "x").exists()


PATTERNED = [
    ("lora", dict(r=2), "rank_pattern", 4),
    ("lora", dict(r=2), "alpha_pattern", 5.0),
    ("pissa", dict(r=2), "rank_pattern", 3),
    ("pissa", dict(r=2), "alpha_pattern", 1.0),
    ("fourierft", dict(n_frequency=8), "n_frequency_pattern", 12),
    ("loca", dict(n_frequency=8), "n_frequency_pattern", 12),
    ("loco", dict(rank=1, chain_length=2), "rank_pattern", 3),
    ("loco", dict(rank=1, chain_length=2), "chain_length_pattern", 3),
    ("loft", dict(r=4), "rank_pattern", 8),
    ("hra", dict(r=2), "rank_pattern", 4),
]


def test_every_pattern_is_tested() -> None:
    from orthotune.methods.registry import METHODS

    declared = {(m, p) for m, (cfg, _) in METHODS.items() for p in cfg.patterns}
    assert declared == {(m, p) for m, _, p, _ in PATTERNED}


@pytest.mark.parametrize("method,kwargs,pfield,value", PATTERNED, ids=[f"{m}-{p}" for m, _, p, _ in PATTERNED])
def test_pattern_sets_its_field_on_matching_layers_only(method: str, kwargs: dict, pfield: str, value) -> None:
    from orthotune.methods.registry import METHODS

    from ..conftest import MLP

    config = METHODS[method][0](target_modules=["lin0", "lin1"], **kwargs, **{pfield: {"lin1": value}})
    model = orthotune.get_model(MLP(), config)
    target = type(config).patterns[pfield]
    got = {n: getattr(layer.adapters["default"].config, target) for n, layer in model.adapter_layers()}
    assert got == {"lin0": getattr(config, target), "lin1": value}
    if pfield != "alpha_pattern":  # a size: the layer has more parameters than without the pattern
        plain = orthotune.get_model(MLP(), config.replace(**{pfield: {}}))
        count = lambda m: sum(p.numel() for p in m.base_model.lin1.adapters.parameters())  # noqa: E731
        assert count(model) > count(plain)
