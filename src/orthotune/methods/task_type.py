"""peft's ``task_type``: the task's output heads are trained in full and saved with the adapter.

peft's ``PeftModelFor<Task>`` classes extend ``modules_to_save`` with fixed head names
(``interop/peft_model.py``: ``["classifier", "score"]`` for sequence and token classification,
``["qa_outputs"]`` for question answering) and skip the names a model lacks. orthotune does the
same: the heads come from :data:`TASK_HEADS`, and only they may match nothing (an entry the user
wrote in ``modules_to_save`` must match a module, so a typo is never silently dropped).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import AdapterConfig

#: peft's ``TaskType`` values and the head modules each adds to ``modules_to_save`` (peft 0.21).
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
    "CAUSAL_LM": (),
    "SEQ_2_SEQ_LM": (),
    "FEATURE_EXTRACTION": (),
}


class TaskType(str, enum.Enum):
    """peft's ``TaskType``, so ``task_type=TaskType.SEQ_CLS`` reads the same (a plain string works too)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


def check_task_type(value: object) -> None:
    """Raise a clear error unless ``value`` is None or one of peft's task types."""
    if value is not None and value not in TASK_HEADS:
        raise ValueError(f"task_type={value!r} is not a peft task type; choose one of {sorted(TASK_HEADS)} or None")


def saved_patterns(config: AdapterConfig) -> tuple[list[str], list[str]]:
    """(entries that must match a module, the task's head names that may match nothing)."""
    required = list(config.modules_to_save or [])
    optional = [h for h in TASK_HEADS.get(config.task_type or "", ()) if h not in required]
    return required, optional
