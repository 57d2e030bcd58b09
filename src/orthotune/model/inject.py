"""Finding the layers a config targets and swapping wrappers in and out, like peft's matching.

``target_modules`` / ``exclude_modules``: a list matches a module whose full name equals an entry
or ends with ``"." + entry``; a string is a regex matched against the full name (``re.fullmatch``);
``"all-linear"`` takes every Linear/Conv1D layer except the output head and modules_to_save.
``layers_to_transform`` / ``layers_pattern`` then keep the targets inside the chosen layer indices
(:func:`layer_index`, peft's rule).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..layer import quantized
from ..layer.adapter_layer import AdapterLayer, ModulesToSave, base_weight_matrix, layer_dims, layer_kind
from ..layer.offload import offload_hook, onloaded
from ..methods.config import AdapterConfig
from ..methods.registry import method_class
from ..methods.task_type import saved_patterns

#: Used when a config gives no target_modules, keyed by transformers' ``config.model_type``
#: (a regex where the layer names changed across transformers versions).
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "vit": r".*\.(q_proj|v_proj|query|value)",  # q_proj/v_proj since transformers 5
}


def iter_named_layers(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Named modules as the user sees them: a wrapper stands in for the module it wraps."""
    for name, child in model.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, AdapterLayer):
            yield full, child.base_layer
        elif isinstance(child, ModulesToSave):
            yield full, child.original
        else:
            yield full, child
            yield from iter_named_layers(child, full)


def matcher(pattern: str | list[str]) -> Callable[[str], bool]:
    """peft's rule for one pattern, prepared once: a list entry matches a full name or its dotted suffix, a string
    is a regex fullmatch. A list is looked up by the name's dotted suffixes, so matching N names against P
    entries costs O(N * depth), not O(N * P)."""
    if isinstance(pattern, str):
        regex = re.compile(pattern)
        return lambda name: regex.fullmatch(name) is not None
    entries = frozenset(pattern)
    return lambda name: any(s in entries for s in _dotted_suffixes(name))


def _dotted_suffixes(name: str) -> list[str]:
    """'a.b.c' -> ['a.b.c', 'b.c', 'c']."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a layer cannot carry an adapter (with the fix), or None if it can."""
    kind = layer_kind(module)
    if kind is None:
        return (
            f"is a {type(module).__name__}, not a layer orthotune adapts (nn.Linear, GPT-2 Conv1D, nn.Conv1d/2d/3d, "
            "nn.Embedding): point target_modules at its linear sub-layers"
        )
    if kind == "embedding" and module.max_norm is not None:
        return (
            f"is an nn.Embedding with max_norm={module.max_norm}, which renormalises rows of its weight in place on "
            "every lookup; an adapted weight is computed per call and cannot be: exclude it"
        )
    if quantized.is_quantized(module):
        return quantized.unsupported_reason(module)
    weight = module.weight
    if not weight.dtype.is_floating_point:
        # bitsandbytes/torchao layers subclass nn.Linear but hold packed integer weights
        return (
            f"has a {weight.dtype} weight (quantised or integer, {type(module).__name__}); adapters need a "
            "floating-point base weight: load the model in float32/bfloat16/float16"
        )
    if weight.device.type == "meta" and offload_hook(module) is None:
        return (
            "has its weight on the meta device and no accelerate hook that loads it; load the model's weights (or "
            "dispatch it with accelerate) before adding adapters"
        )
    with onloaded(module):
        if not bool(torch.isfinite(module.weight).all()):
            return "has NaN or Inf in its frozen weight (a broken checkpoint or an overflowed cast); reload the base model"
    return None


def find_targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """The (name, layer) pairs ``config`` adapts, after every check; raises ValueError naming the fix."""
    layers = list(iter_named_layers(model))
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                "target_modules is not set and there is no default for this model"
                f"{f' (model_type={model_type!r})' if model_type else ''}; set target_modules, e.g. "
                "['q_proj', 'v_proj'] or 'all-linear'"
            )
        targets = DEFAULT_TARGETS[model_type]

    if targets == "all-linear":
        head = _output_head(model)
        is_saved = matcher([p for ps in saved_patterns(config) for p in ps])
        chosen = [
            (n, m)
            for n, m in layers
            if layer_kind(m) in ("linear", "conv1d") and m is not head and not is_saved(n)
        ]
    else:
        is_target = matcher(targets)
        chosen = [(n, m) for n, m in layers if is_target(n)]
        if isinstance(targets, list):
            _check_every_entry_matched(targets, [n for n, _ in layers])
    if config.layers_to_transform is not None:
        # peft skips the layer check for a list entry equal to the full name; 'all-linear' is filtered too
        # (peft 0.21 expands it to full names and so ignores layers_to_transform there)
        named = set(targets) if isinstance(targets, list) else set()
        chosen = [(n, m) for n, m in chosen if n in named or in_layers(config, n)]
    if config.exclude_modules is not None:
        is_excluded = matcher(config.exclude_modules)
        chosen = [(n, m) for n, m in chosen if not is_excluded(n)]
    bad = [(n, reason) for n, m in chosen if (reason := unsupported_reason(m))]
    if bad:
        name, reason = bad[0]
        raise ValueError(
            f"target {name!r} {reason}, or add it to exclude_modules"
            + (f" ({len(bad) - 1} more like it)" if len(bad) > 1 else "")
        )
    if not chosen:
        raise ValueError(
            f"target_modules={targets!r} matched no adaptable layer (after exclude_modules); "
            f"linear layers here end in: {_suffix_sample(layers)}"
        )
    cls = method_class(config)
    for name, module in chosen:
        d_in, d_out = layer_dims(module)
        cls.check_layer(config.for_layer(name), d_in, d_out, name)
    return chosen


def layer_index(name: str, layers_pattern: str | list[str] | None) -> int | None:
    """The layer index of module ``name`` as peft reads it: the first ``<pattern>.<number>.`` in the name
    (any pattern in ``layers_pattern``), or without a pattern the first number after the second dotted
    name (``model.layers.3.mlp`` -> 3); None when there is none."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name))), None)
    return int(match["idx"]) if match else None


def in_layers(config: AdapterConfig, name: str) -> bool:
    """Whether module ``name`` lies in one of ``config.layers_to_transform`` (True when that is unset or empty)."""
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    index = layer_index(name, config.layers_pattern)
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def _check_every_entry_matched(entries: list[str], names: list[str], field: str = "target_modules") -> None:
    leaves = sorted({n.split(".")[-1] for n in names})
    suffixes = {s for n in names for s in _dotted_suffixes(n)}
    for entry in entries:
        if entry not in suffixes:
            close = difflib.get_close_matches(entry.split(".")[-1], leaves, n=3)
            hint = f"; did you mean {close}?" if close else f"; module names end in e.g. {leaves[:8]}"
            raise ValueError(f"{field} entry {entry!r} matches no module in the model{hint}")


def _suffix_sample(layers: list[tuple[str, nn.Module]]) -> list[str]:
    return sorted({n.split(".")[-1] for n, m in layers if layer_kind(m) is not None})[:10]


def find_modules_to_save(model: nn.Module, patterns: list[str], optional: list[str] = ()) -> list[tuple[str, nn.Module]]:
    """The modules named by ``modules_to_save``: every entry of ``patterns`` must match something, those of
    ``optional`` (a task's default heads, see :mod:`orthotune.methods.task_type`) may match nothing, as in peft."""
    layers = list(iter_named_layers(model))
    _check_every_entry_matched(patterns, [n for n, _ in layers], field="modules_to_save")
    is_saved = matcher([*patterns, *optional])
    found = [(n, m) for n, m in layers if is_saved(n)]
    # keep outermost matches only (a saved module's children are saved with it)
    names = {n for n, _ in found}
    return [(n, m) for n, m in found if not any(".".join(n.split(".")[:i]) in names for i in range(1, n.count(".") + 1))]


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the module called ``name``."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def wrap(model: nn.Module, name: str, cls: type[nn.Module]) -> nn.Module:
    """Put a wrapper of type ``cls`` around the module called ``name`` (reusing one already there)."""
    parent, attr = get_submodule_parent(model, name)
    current = getattr(parent, attr)
    if isinstance(current, cls):
        return current
    wrapper = cls(current)
    setattr(parent, attr, wrapper)
    return wrapper


def unwrap_all(model: nn.Module) -> None:
    """Replace every wrapper by what it wraps (an adapter layer by its base, a saved module by its active copy)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, AdapterLayer):
            parent, attr = get_submodule_parent(model, name)
            setattr(parent, attr, module.base_layer)
        elif isinstance(module, ModulesToSave):
            parent, attr = get_submodule_parent(model, name)
            setattr(parent, attr, module.current())


def build_method(config: AdapterConfig, module: nn.Module, name: str) -> nn.Module:
    """A method module for the base layer called ``name`` (its pattern overrides applied), on its device,
    adapter dtype from the config."""
    d_in, d_out = layer_dims(module)
    with onloaded(module):  # an offloaded layer's adapter is created where accelerate computes the layer
        return method_class(config)(config.for_layer(name), d_in, d_out, base_weight_matrix(module).detach())
