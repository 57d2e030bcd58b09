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

from .task_type import check_task_type

FORMAT_VERSION = 1


@dataclass
class AdapterConfig:
    """Targets and options common to every method."""

    method: ClassVar[str] = ""

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

    def __post_init__(self) -> None:
        self._check_common()
        self.validate()

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
