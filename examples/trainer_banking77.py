"""Fine-tune with the HF ``Trainer`` and an orthotune adapter, save, reload: all-MiniLM-L6-v2 on BANKING77.

The model is the text recipe's ``AutoModelForSequenceClassification`` (its ``classifier`` started
from the class means); orthotune adds LoCO rotations to the attention's query and value layers and
keeps the classifier trainable (``modules_to_save``); the tokenised ``datasets.Dataset`` is padded
per batch by transformers' ``DataCollatorWithPadding``. ``OrthoTrainer`` is ``transformers.Trainer`` with
checkpoints and the final save holding the adapter only (``adapter_config.json`` +
``adapter_model.safetensors``). The saved adapter is then loaded into a fresh model, whose
logits must equal the trained model's.

    python examples/trainer_banking77.py                         # about 2 minutes on 2 CPU cores
    python examples/trainer_banking77.py --train-size 400 --steps 10 --out /tmp/trainer-demo
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import DataCollatorWithPadding, TrainingArguments

import orthotune
from orthotune import OrthoTrainer
from orthotune.recipes.assets import offline
from orthotune.recipes.task import accuracy
from orthotune.recipes.text import TextClassificationTask, batches


def run(out: str | Path, train_size: int = 3000, test_size: int = 1000, steps: int = 150, lr: float = 5e-3, seed: int = 0) -> dict[str, float]:
    """Train, save, reload; returns accuracy before/after and the reload difference (0.0 expected)."""
    offline()
    out = Path(out)
    task = TextClassificationTask({}, {"train_size": train_size, "eval_size": test_size}, seed, torch.device("cpu"))
    torch.manual_seed(seed)
    config = orthotune.LoCOConfig(target_modules=["query", "value"], rank=4, chain_length=2, modules_to_save=["classifier"])
    model = orthotune.get_model(task.build_model(), config)  # the head starts from the class means
    model.print_trainable_parameters()

    def score(m: torch.nn.Module) -> float:
        return accuracy(m, batches(task.eval_set, task.tokenizer, 128))

    before = score(model)
    args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=steps, per_device_train_batch_size=32, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10), save_strategy="no", logging_steps=max(1, steps // 5),
        report_to=[], use_cpu=True, seed=seed, data_seed=seed, remove_unused_columns=False,
    )  # fmt: skip
    train = task.train_set.remove_columns("length")  # tokenised rows (input_ids, masks, labels), padded per batch
    OrthoTrainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(task.tokenizer)).train()
    model.eval()
    after = score(model)

    model.save_adapter(out / "adapter")
    fresh = orthotune.load_adapter(task.build_model(fresh=False), out / "adapter").eval()
    probe = next(batches(task.eval_set, task.tokenizer, 64))
    probe.pop("labels")
    with torch.no_grad():
        diff = float((fresh(**probe)["logits"] - model(**probe)["logits"]).abs().max())
    return {"accuracy_before": before, "accuracy_after": after, "reload_max_abs_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/trainer_banking77")
    parser.add_argument("--train-size", type=int, default=3000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = run(args.out, args.train_size, args.test_size, args.steps, args.lr, args.seed)
    print(f"BANKING77 test accuracy {result['accuracy_before']:.4f} -> {result['accuracy_after']:.4f}; "
          f"adapter saved to {args.out}/adapter; reloaded into a fresh model: max |diff| {result['reload_max_abs_diff']:.1e}")


if __name__ == "__main__":
    main()
