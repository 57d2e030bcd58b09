"""Mixed-adapter batches (peft's ``adapter_names``): every sample gets exactly what its adapter alone gives."""

from __future__ import annotations

import pytest
import torch

import orthotune
from orthotune.methods.registry import METHODS

from ..conftest import MODELS
from ..method_cases import CASES, Case

transformers = pytest.importorskip("transformers")

NAMES = ["default", "b", "__base__", "b", "default"]
ONE_CASE_PER_METHOD = list({c.method: c for c in reversed(CASES)}.values())[::-1]


def tiny_llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def two_adapters(case: Case, base: torch.nn.Module, targets_a: list[str], targets_b: list[str]) -> orthotune.OrthoModel:
    """``default`` and ``b`` on overlapping but different layers, both away from the identity."""
    cfg = METHODS[case.method][0]
    model = orthotune.get_model(base, cfg(target_modules=targets_a, init_identity=False, **case.kwargs))
    model.add_adapter("b", cfg(target_modules=targets_b, init_identity=False, **case.kwargs))
    return model.eval()


def per_adapter(model: orthotune.OrthoModel, names: list[str], run) -> dict[str, torch.Tensor]:
    """``run(rows)`` on each adapter's rows with only that adapter active (the base model for ``__base__``)."""
    out = {}
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        if name == "__base__":
            with model.disable_adapter():
                out[name] = run(rows)
        else:
            model.set_adapter(name)
            out[name] = run(rows)
    model.set_adapter("default")
    return out


def assemble(names: list[str], parts: dict[str, torch.Tensor]) -> torch.Tensor:
    rows = {n: iter(range(len(parts[n]))) for n in parts}
    return torch.stack([parts[n][next(rows[n])] for n in names])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@torch.no_grad()
def test_mixed_batch_equals_each_adapter_alone(case: Case) -> None:
    model = two_adapters(case, tiny_llama(), ["q_proj", "v_proj", "down_proj"], ["q_proj", "k_proj"])
    ids = torch.randint(3, 64, (len(NAMES), 6))
    mixed = model(input_ids=ids, adapter_names=NAMES).logits
    parts = per_adapter(model, NAMES, lambda rows: model(input_ids=ids[rows]).logits)
    torch.testing.assert_close(mixed, assemble(NAMES, parts), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(parts["default"][0], parts["b"][0], atol=1e-4)  # the adapters do differ
    assert model.active_adapters == ["default"] and all(layer.mixed is None for _, layer in model.adapter_layers())


@pytest.mark.parametrize("model_name", ["mlp", "conv1d", "conv2d"])
@pytest.mark.parametrize("case", ONE_CASE_PER_METHOD, ids=[c.method for c in ONE_CASE_PER_METHOD])
@torch.no_grad()
def test_mixed_batch_on_every_layer_kind(case: Case, model_name: str) -> None:
    if model_name not in case.models:
        pytest.skip(f"{case.id} does not fit {model_name}")
    cls, targets, make_x = MODELS[model_name]
    model = two_adapters(case, cls(), targets, targets[:1])
    x = torch.cat([make_x(), make_x(), make_x()])[:4]
    names = ["b", "__base__", "default", "b"]
    mixed = model(x, adapter_names=names)
    torch.testing.assert_close(mixed, assemble(names, per_adapter(model, names, lambda rows: model(x[rows]))), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ONE_CASE_PER_METHOD, ids=[c.method for c in ONE_CASE_PER_METHOD])
@torch.no_grad()
def test_generate_with_mixed_batch(case: Case) -> None:
    model = two_adapters(case, tiny_llama(), ["q_proj", "v_proj"], ["q_proj", "o_proj"])
    ids = torch.randint(3, 64, (4, 5))
    names = ["b", "default", "__base__", "b"]

    def gen(rows, **kw):
        return model.generate(ids[rows], attention_mask=torch.ones_like(ids[rows]), max_new_tokens=4, do_sample=False, **kw)

    mixed = gen(list(range(4)), adapter_names=names)
    torch.testing.assert_close(mixed, assemble(names, per_adapter(model, names, gen)))


@torch.no_grad()
def test_beam_search_repeats_each_name() -> None:
    """generate repeats each sample num_beams times: every layer repeats its name as often."""
    model = two_adapters(ONE_CASE_PER_METHOD[0], tiny_llama(), ["q_proj", "v_proj"], ["k_proj"])
    ids = torch.randint(3, 64, (3, 5))
    names = ["b", "__base__", "default"]

    def gen(rows, **kw):
        return model.generate(ids[rows], attention_mask=torch.ones_like(ids[rows]), max_new_tokens=3, num_beams=2,
                              do_sample=False, **kw)  # fmt: skip

    mixed = gen(list(range(3)), adapter_names=names)
    torch.testing.assert_close(mixed, assemble(names, per_adapter(model, names, gen)))


@torch.no_grad()
def test_modules_to_save_follow_the_sample() -> None:
    cls, targets, make_x = MODELS["mlp"]
    cfg = METHODS["lora"][0]
    model = orthotune.get_model(cls(), cfg(target_modules=targets, modules_to_save=["head"], init_identity=False, r=2))
    model.add_adapter("b", cfg(target_modules=targets[:1], modules_to_save=["head"], init_identity=False, r=2))
    for name in ("default", "b"):
        torch.nn.init.normal_(model.base_model.head.copies[name].weight)
    model.eval()
    x = make_x()[:4]
    names = ["default", "b", "__base__", "b"]
    torch.testing.assert_close(model(x, adapter_names=names), assemble(names, per_adapter(model, names, lambda r: model(x[r]))))


def test_mixed_batch_errors() -> None:
    case = ONE_CASE_PER_METHOD[0]
    model = two_adapters(case, tiny_llama(), ["q_proj"], ["v_proj"])
    ids = torch.randint(3, 64, (2, 4))
    with pytest.raises(ValueError, match=r"non-existing adapter\(s\): \['c'\]"):
        model(input_ids=ids, adapter_names=["default", "c"])
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the batch has 2 samples"):
        model(input_ids=ids, adapter_names=["default", "b", "b"])
    with pytest.raises(TypeError, match="non-empty list"):
        model(input_ids=ids, adapter_names="default")
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=ids, adapter_names=["default", "b"])
    model.eval()
    model.merge()
    with pytest.raises(ValueError, match="merged adapters"):
        model(input_ids=ids, adapter_names=["default", "b"])
    model.unmerge()
    assert all(layer.mixed is None for _, layer in model.adapter_layers())  # nothing left behind by the failures
    model(input_ids=ids, adapter_names=["default", "b"])


def test_generate_is_only_there_when_the_model_has_it() -> None:
    cls, targets, _ = MODELS["mlp"]
    model = orthotune.get_model(cls(), METHODS["lora"][0](target_modules=targets, r=2))
    assert not hasattr(model, "generate")
