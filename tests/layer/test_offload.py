"""Adapters on accelerate-dispatched models (disk and CPU offload, meta tensors): outputs equal the
non-offloaded adapted model, one training step gives the same gradients, and merging writes each merged
weight back to the offload, one layer at a time, never to the user's checkpoint."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
import transformers
from safetensors.torch import save_file
from torch import nn

import orthotune
from orthotune import LoCOConfig, LoRAConfig, OFTConfig, PiSSAConfig
from orthotune.layer.offload import offload_hook

accelerate = pytest.importorskip("accelerate")

DEVICE_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
              "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
CONFIGS = [
    LoRAConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=2, init_identity=False),
    PiSSAConfig(target_modules=["q_proj", "up_proj"], r=2, init_identity=False),
    LoCOConfig(target_modules=["q_proj", "o_proj", "gate_proj"], rank=2, chain_length=2, init_identity=False),
    OFTConfig(target_modules=["k_proj", "down_proj"], oft_block_size=4, init_identity=False),
]


def llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def offloaded_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if offload_hook(m) is not None]


def dispatched(base: nn.Module, tmp_path) -> nn.Module:
    model = accelerate.dispatch_model(copy.deepcopy(base), DEVICE_MAP, offload_dir=str(tmp_path / "offload"))
    assert offloaded_layers(model) and all(m.weight.device.type == "meta" for m in offloaded_layers(model))
    return model


def step(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.method for c in CONFIGS])
def test_disk_offload_outputs_training_and_merge(config, tmp_path) -> None:
    base, ids = llama(), torch.randint(0, 40, (2, 7))
    ref = orthotune.get_model(copy.deepcopy(base), config)
    ref.save_adapter(tmp_path / "a")

    fresh = orthotune.get_model(dispatched(base, tmp_path / "x"), config.replace(init_identity=True))
    assert all(p.device.type == "cpu" for p in fresh.parameters() if p.requires_grad)  # not meta
    torch.testing.assert_close(fresh(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-6)

    model = orthotune.load_adapter(dispatched(base, tmp_path), tmp_path / "a")
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-6)
    grads, want = step(model, ids), step(ref, ids)
    assert grads.keys() == want.keys() and grads
    for n in want:
        torch.testing.assert_close(grads[n], want[n], rtol=1e-4, atol=1e-6)

    model.eval(), ref.eval()
    out = ref(ids).logits
    plain = model.merge_and_unload()
    layers = offloaded_layers(plain)
    assert all(m.weight.device.type == "meta" for m in layers)  # merged layer by layer, back to the offload
    torch.testing.assert_close(plain(ids).logits, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain(ids).logits, ref.merge_and_unload()(ids).logits, rtol=1e-5, atol=1e-5)


def test_cpu_offload_merge_and_unmerge(tmp_path) -> None:
    base, ids = llama(), torch.randint(0, 40, (2, 7))
    config = LoRAConfig(target_modules=["q_proj", "down_proj"], r=2, init_identity=False)
    ref = orthotune.get_model(copy.deepcopy(base), config)
    ref.save_adapter(tmp_path / "a")
    model = orthotune.load_adapter(accelerate.cpu_offload(copy.deepcopy(base), execution_device="cpu"), tmp_path / "a")
    assert offloaded_layers(model)
    out = model(ids).logits
    torch.testing.assert_close(out, ref(ids).logits, rtol=1e-5, atol=1e-6)
    model.merge()
    torch.testing.assert_close(model(ids).logits, out, rtol=1e-5, atol=1e-5)
    model.unmerge()
    with model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)


def test_empty_weights_checkpoint_dispatch_leaves_checkpoint_untouched(tmp_path) -> None:
    base, ids = llama(), torch.randint(0, 40, (2, 7))
    checkpoint = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(checkpoint))
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    with accelerate.init_empty_weights():
        empty = transformers.LlamaForCausalLM(base.config)
    model = accelerate.load_checkpoint_and_dispatch(empty, str(checkpoint), device_map=DEVICE_MAP,
                                                    offload_folder=str(tmp_path / "offload"))
    config = LoCOConfig(target_modules=["q_proj", "down_proj"], rank=2, init_identity=False)
    ref = orthotune.get_model(copy.deepcopy(base), config)
    ref.save_adapter(tmp_path / "a")
    ours = orthotune.load_adapter(model.eval(), tmp_path / "a")
    torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-6)
    plain = ours.merge_and_unload()
    torch.testing.assert_close(plain(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == digest


def test_meta_weights_without_hook_are_refused() -> None:
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="meta device and no accelerate hook that loads it"):
        orthotune.get_model(net, LoRAConfig(target_modules=["0"], r=2))


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS[::2], ids=[c.method for c in CONFIGS[::2]])
def test_gpu_execution_with_cpu_and_disk_offload(config, tmp_path) -> None:
    """On a GPU: layers 0 offloaded to CPU memory and 1 to disk, computed on cuda:0; adapters live on cuda:0."""
    base, ids = llama(), torch.randint(0, 40, (2, 7))
    device_map = {k: (0 if v == "cpu" else v) for k, v in DEVICE_MAP.items()} | {"model.layers.0": "cpu"}
    ref = orthotune.get_model(copy.deepcopy(base).cuda(), config)
    ref.save_adapter(tmp_path / "a")
    model = accelerate.dispatch_model(copy.deepcopy(base), device_map, offload_dir=str(tmp_path / "offload"))
    model = orthotune.load_adapter(model, tmp_path / "a")
    assert all(p.device.type == "cuda" for p in model.parameters() if p.requires_grad)
    ids = ids.cuda()
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)
    grads, want = step(model, ids), step(ref, ids)
    for n in want:
        torch.testing.assert_close(grads[n], want[n], rtol=1e-3, atol=1e-5)
    model.eval(), ref.eval()
    plain = model.merge_and_unload()
    assert all(m.weight.device.type == "meta" for m in offloaded_layers(plain))
    torch.testing.assert_close(plain(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
