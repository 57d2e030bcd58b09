"""One fine-tuning run as data: a YAML/JSON recipe plus command-line overrides.

    task: text_classification          # a name in orthotune.recipes.tasks.TASKS
    model: {...}                       # the task's model settings
    data: {...}                        # the task's data settings
    method: loco                       # any name in orthotune.METHODS, or "full" (full fine-tuning)
    adapter: {rank: 4, chain_length: 2, target_modules: [query, value]}   # the method's config fields
    train: {steps: 300, batch_size: 32, lr: 3.0e-3, schedule: cosine, eval_every: 100, save_every: 100}
    seed: 0
    output_dir: runs/banking77-loco

``adapter`` holds the method's own config fields, validated by its config class, so a newly
registered method needs no change here. Overrides are ``dotted.key=value`` with YAML values
(``adapter.rank=8``, ``train.lr=1e-3``, ``adapter.target_modules=[query,value]``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..methods.config import AdapterConfig
from ..methods.registry import METHODS
from .settings import TrainSettings
from .tasks import TASKS

FULL = "full"  # full fine-tuning: every parameter trains, no adapter


@dataclass
class RunConfig:
    """Everything that defines a run; ``to_dict`` / ``from_dict`` round-trip through YAML or JSON."""

    task: str
    method: str
    adapter: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    train: TrainSettings = field(default_factory=TrainSettings)
    seed: int = 0
    output_dir: str = "runs/run"
    device: str = "auto"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        data = copy.deepcopy(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown recipe keys {unknown}; known keys are {sorted(known)}")
        missing = [k for k in ("task", "method") if k not in data]
        if missing:
            raise ValueError(f"the recipe does not set {missing}")
        train = data.pop("train", None) or {}
        train_known = {f.name for f in dataclasses.fields(TrainSettings)}
        bad = sorted(set(train) - train_known)
        if bad:
            raise ValueError(f"unknown train settings {bad}; known are {sorted(train_known)}")
        for key in ("adapter", "model", "data"):
            if data.get(key) is None:
                data[key] = {}
            if not isinstance(data[key], dict):
                raise ValueError(f"{key} must be a mapping, got {type(data[key]).__name__}")
        config = cls(train=TrainSettings(**train), **data)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["train"]["betas"] = list(self.train.betas)
        return out

    def validate(self) -> None:
        """Check everything that needs no model: task, method and its fields, training settings."""
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {sorted(TASKS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        self.train.validate()
        TASKS[self.task].settings(self.model, self.data)
        if self.method != FULL:
            self.adapter_config()
        elif self.adapter:
            raise ValueError("method 'full' trains every parameter and takes no adapter settings; remove 'adapter'")

    def adapter_config(self) -> AdapterConfig:
        """The method's config from ``adapter`` (task defaults fill target_modules / modules_to_save)."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {sorted(METHODS) + [FULL]}")
        task = TASKS[self.task]
        fields = {"target_modules": task.default_targets, "modules_to_save": task.default_modules_to_save, **self.adapter}
        return METHODS[self.method][0].from_dict({"method": self.method, **fields})

    def with_overrides(self, overrides: list[str]) -> RunConfig:
        return RunConfig.from_dict(apply_overrides(self.to_dict(), overrides))


def yaml_load(text: str) -> Any:
    """YAML with YAML 1.2 floats: ``1e-3`` is a number (PyYAML's 1.1 rules read it as a string)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
                   r"|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+0123456789."),
    )
    return yaml.load(text, Loader=Loader)


# keys that replace each other: an override of one clears the other (unless the overrides set both)
COUNTERPARTS = {"train.steps": "train.epochs", "train.epochs": "train.steps"}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``dotted.key=value`` items (values parsed as YAML) in a copy of ``data``.

    An override of ``train.steps`` clears the recipe's ``train.epochs`` and vice versa (see ``COUNTERPARTS``).
    """
    data = copy.deepcopy(data)
    given = {item.partition("=")[0] for item in overrides}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-3)")
        value = yaml_load(raw) if raw else None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ValueError(f"override {item!r}: {part!r} is not a mapping")
            node = node[part]
        node[parts[-1]] = value
        counterpart = COUNTERPARTS.get(key)
        if value is not None and counterpart is not None and counterpart not in given:
            node.pop(counterpart.rpartition(".")[2], None)
    return data


def read_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or JSON file holding one mapping."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recipe file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        data = yaml_load(text)
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"{path}: recipes are .yaml, .yml or .json files")
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a mapping of recipe keys")
    return data


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """A recipe file (or nothing: then overrides must set task and method) with overrides applied."""
    data = read_mapping(path) if path is not None else {}
    return RunConfig.from_dict(apply_overrides(data, overrides or []))


def write_config(config: RunConfig, path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
