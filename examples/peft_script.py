"""A script written for peft, run on orthotune.

The peft original differs in two words: ``from peft import LoraConfig, PeftModel, get_peft_model``
(and ``LoraConfig`` where ``LoRAConfig`` is used below). ``tests/interop/test_peft_script.py`` runs this
file as it is, and again with those two words swapped back on peft itself.

The workflow: get a model, add two adapters, train one, run a mixed-adapter batch, merge the two
into a weighted adapter, save selected adapters, load them for inference (``is_trainable=False``)
and delete the active one. The base is a tiny Llama saved to a folder, standing in for a Hub id.

    python examples/peft_script.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from orthotune import LoRAConfig, PeftModel, get_peft_model


def make_base(folder: Path) -> str:
    """A tiny Llama saved as ``from_pretrained`` expects; returns its path (the "model id")."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def train(model: torch.nn.Module, ids: torch.Tensor, steps: int = 20) -> tuple[float, float]:
    """A few AdamW steps on the active adapter; (first loss, last loss)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses[0], losses[-1]


def mixed_batch(model: PeftModel, ids: torch.Tensor) -> float:
    """One adapter per sample; returns the largest gap to running each sample's adapter alone."""
    names = ["a", "b", "__base__"]
    with torch.no_grad():
        mixed = model(input_ids=ids[:3], adapter_names=names).logits
        gap = 0.0
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=ids[i : i + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=ids[i : i + 1]).logits
            gap = max(gap, (mixed[i] - alone[0]).abs().max().item())
    model.set_adapter("a")
    return gap


def weighted_merge(model: PeftModel) -> str:
    """A new adapter ``ab`` = 0.7 a + 0.3 b (peft's linear combination), made active."""
    model.add_weighted_adapter(["a", "b"], [0.7, 0.3], adapter_name="ab", combination_type="linear")
    model.set_adapter("ab")
    return "ab"


def main(workdir: str | Path) -> dict[str, object]:
    """Run the workflow in ``workdir``; the numbers a test or a reader checks."""
    workdir = Path(workdir)
    model_id = make_base(workdir / "base")
    ids = torch.randint(1, 64, (4, 12), generator=torch.Generator().manual_seed(0))

    base = AutoModelForCausalLM.from_pretrained(model_id)
    config = LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base, config, adapter_name="a")
    model.add_adapter("b", LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.print_trainable_parameters()
    first, last = train(model, ids)
    print(f"adapter a: loss {first:.3f} -> {last:.3f}")

    report: dict[str, object] = {"first_loss": first, "last_loss": last}
    report["mixed_gap"] = mixed_batch(model, ids)
    print(f"mixed batch: largest gap to one adapter at a time {report['mixed_gap']:.2e}")
    second = weighted_merge(model)
    model.set_adapter(second)
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    model.save_pretrained(workdir / "adapters", selected_adapters=["a", second])
    report["saved"] = sorted(p.name for p in (workdir / "adapters").iterdir())

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_id), workdir / "adapters" / "a", adapter_name="a")
    loaded.load_adapter(workdir / "adapters" / second, adapter_name=second)
    loaded.set_adapter(second, inference_mode=True)  # without inference_mode, set_adapter makes it trainable
    with torch.no_grad():
        report["reload_gap"] = (loaded(input_ids=ids).logits - expected).abs().max().item()
    report["trainable_after_load"] = sum(p.numel() for p in loaded.parameters() if p.requires_grad)
    print(f"reloaded for inference: gap {report['reload_gap']:.2e}, trainable parameters {report['trainable_after_load']}")

    loaded.delete_adapter(second)  # the active one: peft falls back to the remaining adapter
    report["active_after_delete"] = loaded.active_adapter
    print(f"deleted {second!r}; active adapter now {loaded.active_adapter!r}")
    return report


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        main(tmp)
