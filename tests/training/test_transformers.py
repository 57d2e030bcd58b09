"""transformers integration on tiny models built from configs: generate, activation checkpointing,
torch.compile, and the Trainer checkpointing orthotune adapters (OrthoTrainer)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import orthotune
from orthotune import LoCOConfig, LoRAConfig, PiSSAConfig
from orthotune.methods.registry import METHODS

from ..method_cases import CASES

transformers = pytest.importorskip("transformers")

ONE_CASE_PER_METHOD = list({c.method: c for c in reversed(CASES)}.values())[::-1]


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, num_labels=3,
    )  # fmt: skip
    return transformers.ViTForImageClassification(cfg)


def greedy(model, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("case", ONE_CASE_PER_METHOD, ids=[c.method for c in ONE_CASE_PER_METHOD])
def test_generate_unmerged_merged_and_disabled(case) -> None:
    base = tiny_llama()
    reference = copy.deepcopy(base)
    config = METHODS[case.method][0](target_modules=["q_proj", "v_proj"], init_identity=False, **case.kwargs)
    model = orthotune.get_model(base, config)
    ids = torch.randint(3, 64, (2, 6))
    assert not torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4)
    out = greedy(model, ids)
    assert out.shape == (2, 11)
    with model.disable_adapter():
        assert torch.equal(greedy(model, ids), greedy(reference, ids))
    model.merge()
    assert torch.equal(greedy(model, ids), out)


def test_generate_gpt2_conv1d() -> None:
    base = tiny_gpt2()
    model = orthotune.get_model(copy.deepcopy(base), PiSSAConfig(target_modules=["c_attn"], r=2, init_identity=False))
    ids = torch.randint(3, 64, (1, 5))
    out = greedy(model, ids)
    assert torch.equal(greedy(model.merge_and_unload(), ids), out)


def _adapter_grads(model, loss_fn) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss_fn(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_keeps_adapter_gradients(reentrant: bool) -> None:
    """ViT's checkpointed blocks get a frozen patch embedding's output: it must be made to require grad."""
    pixels = torch.randn(2, 3, 8, 8)
    model = orthotune.get_model(tiny_vit(), LoRAConfig(target_modules=["q_proj", "v_proj"], r=2, init_identity=False))
    model.train()

    def loss(m):
        return m(pixel_values=pixels).logits.pow(2).sum()

    plain = _adapter_grads(model, loss)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.base_model.is_activation_checkpointing
    checkpointed = _adapter_grads(model, loss)
    assert plain.keys() == checkpointed.keys() and len(plain) == 8
    for n in plain:
        assert checkpointed[n].abs().sum() > 0, n
        assert torch.allclose(checkpointed[n], plain[n], atol=1e-6), n
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    assert len(model.base_model._require_grads_hooks) == 1, "enabling twice adds no second hook"

    # wrapping a model that checkpoints already installs the hook too (as peft does)
    vit = tiny_vit()
    vit.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    wrapped = orthotune.get_model(vit, LoRAConfig(target_modules=["q_proj", "v_proj"], r=2, init_identity=False))
    wrapped.train()
    assert all(g.abs().sum() > 0 for g in _adapter_grads(wrapped, loss).values())


def test_torch_compile_without_graph_breaks() -> None:
    """An additive, a principal and a rotation adapter active together compile to one graph, forward and backward.

    ``aot_eager`` traces exactly what inductor would compile, without its C++ build (minutes on CPU);
    the inductor run itself is the GPU test below.
    """
    model = orthotune.get_model(tiny_llama(), LoRAConfig(target_modules=["q_proj", "v_proj"], r=2, init_identity=False))
    model.add_adapter("principal", PiSSAConfig(target_modules=["q_proj"], r=2, init_identity=False))
    model.add_adapter("rotation", LoCOConfig(target_modules=["v_proj"], rank=2, chain_length=2, init_identity=False))
    model.set_adapter(["default", "principal", "rotation"])
    ids = torch.randint(3, 64, (2, 8))
    eager = _adapter_grads(model, lambda m: m(input_ids=ids).logits.pow(2).mean())
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
    graph = _adapter_grads(model, lambda m: compiled(input_ids=ids).logits.pow(2).mean())
    for n in eager:
        assert torch.allclose(graph[n], eager[n], atol=1e-6), n


@pytest.mark.gpu
def test_torch_compile_inductor_on_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (run with -m gpu on the GPU machine)")
    model = orthotune.get_model(tiny_llama(), LoCOConfig(target_modules=["q_proj", "v_proj"], rank=2, init_identity=False)).cuda()
    ids = torch.randint(3, 64, (2, 8), device="cuda")
    eager = _adapter_grads(model, lambda m: m(input_ids=ids).logits.pow(2).mean())
    compiled = torch.compile(model)
    graph = _adapter_grads(model, lambda m: compiled(input_ids=ids).logits.pow(2).mean())
    for n in eager:
        assert torch.allclose(graph[n], eager[n], atol=1e-5), n


# ---------------------------------------------------------------------------------------------- Trainer
class TokenData(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 64, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(model, out, **kwargs):
    from orthotune.training.trainer import OrthoTrainer

    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, logging_strategy="no", seed=0, data_seed=0, **kwargs,
    )  # fmt: skip
    return OrthoTrainer(model=model, args=args, train_dataset=TokenData(16), eval_dataset=TokenData(4))


def _adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".adapters." in k}


def test_trainer_checkpoints_hold_adapters_and_resume_exactly(tmp_path) -> None:
    config = LoRAConfig(target_modules=["q_proj", "v_proj"], r=2)
    model = orthotune.get_model(tiny_llama(), config)
    _trainer(model, tmp_path / "run").train()
    trained = _adapter_state(model)

    for step in (2, 4):
        ckpt = tmp_path / "run" / f"checkpoint-{step}"
        files = {p.name for p in ckpt.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin"}, "no full weights in a checkpoint"
        assert json.loads((ckpt / "adapter_config.json").read_text())["method"] == "lora"
    ids = torch.randint(3, 64, (2, 8))
    loaded = orthotune.load_adapter(tiny_llama(), tmp_path / "run" / "checkpoint-4")
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)

    resumed = orthotune.get_model(tiny_llama(), config)
    _trainer(resumed, tmp_path / "run").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    after = _adapter_state(resumed)
    assert after.keys() == trained.keys()
    for k in trained:
        assert torch.allclose(after[k], trained[k], atol=1e-6), k


def test_trainer_loads_best_checkpoint_at_end(tmp_path) -> None:
    model = orthotune.get_model(tiny_llama(), LoRAConfig(target_modules=["q_proj", "v_proj"], r=2))
    trainer = _trainer(
        model, tmp_path / "run", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
        metric_for_best_model="loss", greater_is_better=True,  # "best" = the first checkpoint, not the last state
    )  # fmt: skip
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2")
    reference = orthotune.load_adapter(tiny_llama(), best)
    ids = torch.randint(3, 64, (2, 8))
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_compiled_trainer_and_graphed_step_trace_checkpointed_layers_whole(tmp_path) -> None:
    """OrthoTrainer (``torch_compile``) and GraphedStep compile activation-checkpointed Llama layers without the graph
    break their attention's context variable causes under a checkpoint (the layer then runs eagerly)."""
    from torch._dynamo.utils import counters

    from orthotune.training.graphs import GraphedStep

    def checkpointed() -> torch.nn.Module:
        model = orthotune.get_model(tiny_llama(), LoRAConfig(target_modules=["q_proj", "v_proj"], r=2))
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return model.train()

    def unsafe() -> list[str]:
        return [b for b in counters["graph_break"] if "Unsafe side effect" in b]

    torch._dynamo.reset()
    counters.clear()
    trainer = _trainer(checkpointed(), tmp_path / "t", save_strategy="no", torch_compile=True, torch_compile_backend="aot_eager")
    trainer.train()
    assert not unsafe(), unsafe()
    torch._dynamo.reset()
    counters.clear()
    model = checkpointed()
    step = GraphedStep(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2),
                       backend="aot_eager", enabled=True, compile_kwargs={"mode": None})
    ids = TokenData(4).ids
    losses = [float(step({"input_ids": ids, "labels": ids})) for _ in range(3)]
    assert not unsafe(), unsafe()
    assert losses[-1] < losses[0]
