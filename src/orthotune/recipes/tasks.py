"""Task name -> task class: the recipes' kinds of experiment (``task:`` in a recipe)."""

from __future__ import annotations

from .causal_lm import CausalLMTask
from .diffusion import DiffusionTask
from .task import Task
from .text import TextClassificationTask
from .vision import ImageClassificationTask

TASKS: dict[str, type[Task]] = {
    task.name: task for task in (TextClassificationTask, CausalLMTask, ImageClassificationTask, DiffusionTask)
}
