"""peft's ``AutoPeftModel*``: load the base model an adapter folder names, then the adapter, in one call.

    model = orthotune.AutoOrthoModelForSequenceClassification.from_pretrained("out/adapter")

The folder's config records ``base_model_name_or_path`` (orthotune's and peft's both do); the base
is loaded with the task's transformers Auto class (from ``task_type``, or the class the subclass
fixes), then the adapter is attached as by ``OrthoModel.from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from ..model.hub import read_base_model_name, resolve_folder
from ..model.io import CONFIG_NAME
from .peft_model import OrthoModel

#: peft's task types -> the transformers Auto class peft's AutoPeftModelFor<Task> loads the base with.
TASK_AUTO_CLASS = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}
_HUB_KWARGS = ("subfolder", "revision", "cache_dir", "token", "local_files_only")


class AutoOrthoModel:
    """Loads base + adapter from an adapter folder; the base class comes from the folder's ``task_type``."""

    auto_class: ClassVar[str | None] = None

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, adapter_name: str = "default", is_trainable: bool = False, **kwargs: Any
    ) -> OrthoModel:
        """The base model named in the folder's config, with the folder's adapter attached; ``kwargs`` beyond the
        Hub ones (``subfolder``, ``revision``, ...) go to the base model's ``from_pretrained`` (e.g. ``dtype``)."""
        import transformers

        hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        folder = resolve_folder(pretrained_model_name_or_path, **hub)
        if not (folder / CONFIG_NAME).is_file():
            raise ValueError(f"{folder} has no {CONFIG_NAME}: it is not an adapter folder")
        base_name = read_base_model_name(folder)
        if base_name is None:
            raise ValueError(
                f"{folder / CONFIG_NAME} records no base_model_name_or_path (the adapter was made on a model not loaded "
                "with from_pretrained): load the base model yourself and use OrthoModel.from_pretrained(model, folder)"
            )
        name = cls.auto_class or _auto_class_for(folder)
        base = getattr(transformers, name).from_pretrained(base_name, **kwargs)
        return OrthoModel.from_pretrained(base, folder, adapter_name=adapter_name, is_trainable=is_trainable)


def _auto_class_for(folder: Path) -> str:
    """The Auto class for a folder's ``task_type``; without one, the class the adapter was saved on, if transformers has it."""
    import transformers

    data = json.loads((folder / CONFIG_NAME).read_text())
    task = data.get("task_type")
    if task in TASK_AUTO_CLASS:
        return TASK_AUTO_CLASS[task]
    saved_on = data.get("base_model_class") or (data.get("auto_mapping") or {}).get("base_model_class")
    if saved_on and hasattr(transformers, saved_on):
        return saved_on
    return "AutoModel"


def _for_class(auto_class: str) -> type[AutoOrthoModel]:
    """An :class:`AutoOrthoModel` whose base is always loaded with ``transformers.<auto_class>``."""
    name = "AutoOrthoModel" + auto_class.removeprefix("AutoModel")
    doc = f"Base loaded with ``{auto_class}``."
    return type(name, (AutoOrthoModel,), {"auto_class": auto_class, "__doc__": doc, "__module__": __name__})


AutoOrthoModelForSequenceClassification = _for_class("AutoModelForSequenceClassification")
AutoOrthoModelForTokenClassification = _for_class("AutoModelForTokenClassification")
AutoOrthoModelForQuestionAnswering = _for_class("AutoModelForQuestionAnswering")
AutoOrthoModelForCausalLM = _for_class("AutoModelForCausalLM")
AutoOrthoModelForSeq2SeqLM = _for_class("AutoModelForSeq2SeqLM")
AutoOrthoModelForFeatureExtraction = type(
    "AutoOrthoModelForFeatureExtraction", (AutoOrthoModel,),
    {"auto_class": "AutoModel", "__doc__": "Base loaded with ``AutoModel``.", "__module__": __name__},
)  # fmt: skip
