"""The user's own images: a folder per class (torchvision ``ImageFolder`` layout) or a table of path,label.

Every image is checked before training: an empty class folder, a missing column, an empty cell,
a path that is no readable image and a label the training images lack are each reported with the
file, the column, the offending values and a count of rows (or dropped and recorded, with
``data.drop_invalid_rows=true``; see :mod:`orthotune.recipes.userdata`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .userdata import RowAudit, empty_cells, label_values, read_table, require_columns, sorted_labels, unknown_labels

SPLIT_FILES = {"train": "train_file", "val": "validation_file", "test": "test_file"}


@dataclass
class ImageFiles:
    """Images (n, c, s, s) in [0, 1] and label ids of every split given, with what the run records."""

    label_names: list[str]
    splits: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    dropped: list[dict[str, Any]] = field(default_factory=list)


def listing(path: str, setting: str, d: Any) -> tuple[Any, str, str]:
    """(rows with an image path and a label, the column of each) of a class-folder tree or a table."""
    import datasets

    root = Path(path).expanduser()
    if root.is_dir() and not (root / "state.json").is_file():  # a save_to_disk folder holds state.json
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        try:
            classes, index = find_classes(str(root))
        except FileNotFoundError as err:
            raise ValueError(f"{setting} {root}: {err}; put each class's images in a subfolder named after it") from None
        samples = make_dataset(str(root), index, extensions=IMG_EXTENSIONS, allow_empty=True)
        empty = sorted(set(classes) - {classes[i] for _, i in samples})
        if empty:
            raise ValueError(f"{setting} {root}: class folder(s) {empty} hold no image ({', '.join(IMG_EXTENSIONS)})")
        rows = datasets.Dataset.from_dict({"path": [p for p, _ in samples], "label": [classes[i] for _, i in samples]})
        return rows, "path", "label"
    rows = read_table(root, setting)
    require_columns(rows, str(root), "data.image_column", [d.image_column])
    require_columns(rows, str(root), "data.label_column", [d.label_column])
    base = root.parent
    absolute = [str(p if Path(p).is_absolute() else base / p) for p in (str(v) for v in rows[d.image_column])]
    rows = rows.remove_columns(d.image_column).add_column(d.image_column, absolute)
    return rows, d.image_column, d.label_column


def read_image(path: str, size: int, channels: int) -> np.ndarray | None:
    """One image as (channels, size, size) floats in [0, 1], or None if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
    except (OSError, UnidentifiedImageError):
        return None
    array = np.asarray(image, dtype=np.float32) / 255.0
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def load_image_files(d: Any, size: int, channels: int) -> ImageFiles:
    """Every split given in the data settings ``d``, checked, as tensors resized to ``size``."""
    out: ImageFiles | None = None
    for split, setting in SPLIT_FILES.items():
        path = getattr(d, setting)
        if path is None:
            continue
        rows, image_column, label_column = listing(path, f"data.{setting}", d)
        audit = RowAudit(d.drop_invalid_rows)
        for column in (image_column, label_column):
            rows = audit.flag(rows, str(path), column, empty_cells(rows, column), "are empty")
        keys = label_values(rows, label_column)
        names = out.label_names if out is not None else d.labels or sorted_labels(set(keys))
        bad, examples = unknown_labels(keys, names)
        rows = audit.flag(rows, str(path), label_column, bad, "have a label the training labels lack", examples)
        images = [read_image(p, size, channels) for p in rows[image_column]]
        unreadable = np.array([im is None for im in images], dtype=bool)
        shown = [p for p, im in zip(rows[image_column], images) if im is None]
        rows = audit.flag(rows, str(path), image_column, unreadable, "name no readable image file", shown)
        audit.finish()
        if out is None:
            if len(names) < 2:
                raise ValueError(f"{path}: a single label {names}; classification needs two or more")
            out = ImageFiles(names)
        kept = [im for im in images if im is not None] if d.drop_invalid_rows else images
        if not kept:
            raise ValueError(f"{path}: no usable images left")
        index = {n: i for i, n in enumerate(names)}
        out.splits[split] = (torch.from_numpy(np.stack(kept)), torch.tensor([index[k] for k in label_values(rows, label_column)]))
        out.paths[setting] = str(Path(path).expanduser().resolve())
        out.rows[split] = len(kept)
        out.dropped += audit.record()
    assert out is not None  # train_file is required by the settings' validation
    return out
