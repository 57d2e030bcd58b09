"""The fields every adapter config shares, and their (de)serialisation.

A method's config is a dataclass that subclasses :class:`AdapterConfig` and adds its own
hyperparameters, each with ``metadata={"help": ...}`` as in peft. Validation that needs no layer
shapes happens at construction; shape checks happen at injection (``check_layer``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .defaults import default_lr
from .task_type import check_task_type

FORMAT_VERSION = 1


@dataclass
class AdapterConfig:
    """Targets and options common to every method."""

    method: ClassVar[str] = ""
    #: Per-module overrides, peft's ``rank_pattern`` style: pattern field -> the field it overrides.
    patterns: ClassVar[dict[str, str]] = {}

    target_modules: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules to adapt: a list of names or name suffixes ('query', 'attn.c_attn'), a regex "
            "matched against full module names, or 'all-linear' (every linear layer but the output head)."
        },
    )
    exclude_modules: str | list[str] | None = field(
        default=None, metadata={"help": "Modules never adapted: same syntax as target_modules."}
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules trained in full and saved with the adapter (e.g. a new classifier head), "
            "matched by name or suffix."
        },
    )
    task_type: str | None = field(
        default=None,
        metadata={
            "help": "peft's task type (SEQ_CLS, TOKEN_CLS, QUESTION_ANS, CAUSAL_LM, SEQ_2_SEQ_LM, FEATURE_EXTRACTION): "
            "the task's heads (e.g. classifier/score for SEQ_CLS) are added to modules_to_save where the model has them."
        },
    )
    init_identity: bool = field(
        default=True,
        metadata={
            "help": "Start as the identity (the model's outputs are unchanged at step 0). False starts away "
            "from it, which makes equivalence tests meaningful."
        },
    )
    autocast_adapter_dtype: bool = field(
        default=True,
        metadata={
            "help": "Keep adapter parameters in float32 on a bf16/fp16 base. False stores them in the base "
            "dtype (less memory, less precise)."
        },
    )
    layers_to_transform: int | list[int] | None = field(
        default=None,
        metadata={
            "help": "Only adapt targets inside these layer indices (peft's rule: the first number after "
            "layers_pattern, or after the second dotted name). Needs target_modules as a list (or 'all-linear')."
        },
    )
    layers_pattern: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "Name of the layer list that layers_to_transform indexes (e.g. 'layers', 'h'); only with "
            "layers_to_transform."
        },
    )

    def __post_init__(self) -> None:
        self._check_common()
        self._check_layer_selection()
        self.validate()
        self._check_patterns()

    def validate(self) -> None:
        """Method-specific checks that need no layer shapes; raise ValueError naming the fix."""

    def _check_common(self) -> None:
        for name in ("init_identity", "autocast_adapter_dtype"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                if value != "all-linear":
                    try:
                        re.compile(value)
                    except re.error as err:
                        raise ValueError(f"{name}={value!r} is not a valid regex ({err}); pass a list of names instead") from err
            elif isinstance(value, (list, tuple, set)):
                bad = [v for v in value if not isinstance(v, str) or not v]
                if bad:
                    raise ValueError(f"{name} must hold non-empty strings, got {bad!r}")
                object.__setattr__(self, name, list(value))
            else:
                raise ValueError(f"{name} must be a string, a list of strings or None, got {type(value).__name__}")
        check_task_type(self.task_type)
        if self.task_type is not None:
            self.task_type = str(getattr(self.task_type, "value", self.task_type))  # peft's TaskType enum too
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            self.modules_to_save = list(self.modules_to_save)

    def _check_layer_selection(self) -> None:
        """peft's rules for ``layers_to_transform`` / ``layers_pattern``."""
        layers, pattern = self.layers_to_transform, self.layers_pattern
        if isinstance(layers, (list, tuple)):
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise ValueError(f"layers_to_transform must hold layer indices >= 0, got {list(layers)!r}")
            self.layers_to_transform = list(layers)
        elif layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 0):
            raise ValueError(f"layers_to_transform must be a layer index >= 0, a list of them or None, got {layers!r}")
        if isinstance(pattern, (list, tuple)):
            if not all(isinstance(p, str) and p for p in pattern):
                raise ValueError(f"layers_pattern must hold non-empty strings, got {list(pattern)!r}")
            self.layers_pattern = list(pattern)
        elif pattern is not None and not isinstance(pattern, str):
            raise ValueError(f"layers_pattern must be a string, a list of strings or None, got {pattern!r}")
        regex_targets = isinstance(self.target_modules, str) and self.target_modules != "all-linear"
        for name in ("layers_to_transform", "layers_pattern"):
            if regex_targets and getattr(self, name) is not None:
                raise ValueError(
                    f"{name} cannot be used when target_modules is a regex string (as in peft): give target_modules "
                    "as a list of names, or put the layer indices into the regex"
                )
        if pattern and layers is None:
            raise ValueError("layers_pattern only names the layer list for layers_to_transform: set layers_to_transform too")

    def _check_patterns(self) -> None:
        """Each pattern is a dict of valid regexes to values its field accepts (checked by building that config)."""
        for pfield, target in self.patterns.items():
            table = getattr(self, pfield)
            if table is None:
                table = {}
            if not isinstance(table, dict):
                raise ValueError(f"{pfield} must be a dict of module name patterns to {target} values, got {table!r}")
            setattr(self, pfield, dict(table))
            for key, value in table.items():
                try:
                    re.compile(key)
                except (re.error, TypeError) as err:
                    raise ValueError(f"{pfield} key {key!r} is not a valid regex ({err})") from err
                try:
                    dataclasses.replace(self, **{target: value, **{p: {} for p in self.patterns}})
                except (ValueError, TypeError) as err:
                    raise ValueError(f"{pfield}[{key!r}]={value!r} is not a valid {target}: {err}") from err

    def for_layer(self, name: str) -> AdapterConfig:
        """This config as it applies to module ``name``: each pattern's value replaces its field (peft's rule)."""
        changes = {}
        for pfield, target in self.patterns.items():
            key = pattern_key(getattr(self, pfield), name)
            if key is not None:
                changes[target] = getattr(self, pfield)[key]
        return dataclasses.replace(self, **changes) if changes else self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, with the method name."""
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Rebuild a config, rejecting unknown fields with the list of known ones."""
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"this config is for method {method!r}, not {cls.method!r}: load it with {method!r}'s config")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} fields {unknown}; known fields are {sorted(known)}. "
                "The adapter may come from a newer orthotune: upgrade orthotune."
            )
        return cls(**data)

    def replace(self, **changes: Any) -> AdapterConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def default_learning_rate(self) -> float:
        """A starting learning rate for this method (AdamW, batch 32), and the centre of ``--lr auto``'s
        candidates; each number's source is in :mod:`orthotune.methods.defaults`."""
        return default_lr(self)


def pattern_key(table: dict[str, Any], name: str) -> str | None:
    """peft's ``get_pattern_key``: the first key (in order) that fully matches ``name`` or a dotted suffix of it
    as a regex, else ``name`` itself if it is a key, else None."""
    for key in table:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name if name in table else None


def check_positive_int(name: str, value: Any) -> None:
    """Raise a clear error unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_finite_number(name: str, value: Any) -> None:
    """Raise a clear error unless ``value`` is a finite real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_dropout(name: str, value: Any) -> None:
    """Raise a clear error unless ``value`` is a dropout probability in ``[0, 1)``."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise a clear error unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(choices)}")
