"""transformers integration: a ``Trainer`` whose checkpoints are orthotune adapter folders.

``Trainer._save`` writes the full ``state_dict`` of any model that is not a ``PreTrainedModel``
or a peft model (base weights included), and its loaders only know those two. ``OrthoTrainer``
writes and reads adapter folders instead (``AdapterModel.save_pretrained`` layout, peft's: adapter
``default`` in the checkpoint folder, every other one in a subfolder named after it)::

    trainer = OrthoTrainer(model=orthotune.get_model(hf_model, config), args=args, train_dataset=ds)
    trainer.train()                                   # checkpoint-*/adapter_config.json + adapter_model.safetensors
    trainer.train(resume_from_checkpoint=True)        # adapter weights restored in place, then optimizer etc.
    orthotune.load_adapter(fresh_hf_model, "out/checkpoint-500")

On CUDA it trains the model under ``torch.compile`` by default (``compile=None``: the ``Trainer``'s own
``torch_compile`` switched on, a host-bound adapter step is the case it speeds up); ``compile=False``
leaves ``TrainingArguments`` as given; a mode name (``compile="reduce-overhead"``, CUDA graphs: the faster
choice for fixed-shape batches) compiles in that mode (``torch_compile_mode``), and activation-checkpointed
transformers layers trace whole (:func:`~orthotune.training.graphs.compile_settings`). The plain ``Trainer`` with
``torch_compile=True`` works the same, save that last point (docs/speed.md says what to set).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME

from ..model.adapter_model import AdapterModel, adapter_folder
from .graphs import COMPILE_MODES, compile_settings


class OrthoTrainer(Trainer):
    """``transformers.Trainer`` that saves and loads orthotune adapters at checkpoints (other models: unchanged)."""

    def __init__(self, model: nn.Module | None = None, args: TrainingArguments | None = None, *rest,
                 compile: bool | str | None = None, **kwargs) -> None:  # noqa: A002 (torch.compile's name)
        if isinstance(compile, str) and compile not in COMPILE_MODES:
            raise ValueError(f"OrthoTrainer(compile={compile!r}): give True, False, None (compile on CUDA) or one of "
                             f"torch.compile's modes {list(COMPILE_MODES)}")
        if compile if compile is not None else torch.cuda.is_available():
            args = compiled_arguments(args, compile if isinstance(compile, str) else None)
        super().__init__(model, args, *rest, **kwargs)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        """The ``Trainer``'s loss, traced with :func:`~orthotune.training.graphs.compile_settings` when compiled."""
        with compile_settings(bool(self.args.torch_compile)):
            return super().compute_loss(model, inputs, *args, **kwargs)

    def _ortho_model(self, model: nn.Module | None = None) -> AdapterModel | None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)
        return model if isinstance(model, AdapterModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._ortho_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        ortho = self._ortho_model(model)
        if ortho is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_adapters(ortho, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        ortho = self._ortho_model()
        if ortho is None:
            return super()._load_best_model()
        restore_adapters(ortho, self.state.best_model_checkpoint)
        return None


def restore_adapters(model: AdapterModel, directory: str | Path) -> None:
    """Copy every adapter saved by ``save_pretrained`` in ``directory`` back into ``model``, in place."""
    for name in model.configs:
        folder = adapter_folder(directory, name)
        if name == "default" or folder.is_dir():
            model.load_adapter_weights(folder, name)


def compiled_arguments(args: TrainingArguments | None, mode: str | None = None) -> TrainingArguments:
    """A copy of ``args`` (the ``Trainer``'s defaults if None) with ``torch_compile`` on, a backend set and ``mode``
    (if given) as ``torch_compile_mode``."""
    args = copy.copy(args) if args is not None else TrainingArguments(output_dir="tmp_trainer")
    args.torch_compile = True
    args.torch_compile_backend = args.torch_compile_backend or "inductor"
    if mode is not None:
        args.torch_compile_mode = mode
    return args
