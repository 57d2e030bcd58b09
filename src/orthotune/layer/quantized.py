"""Frozen bitsandbytes bases: 4-bit (``Linear4bit``: NF4/FP4, double quantisation) and 8-bit (``Linear8bitLt``).

The adapter wrapper (:mod:`orthotune.layer.adapter_layer`) calls into this module at four points, and nowhere
else does it treat quantised layers differently:

* :func:`dims`: the layer's (d_in, d_out) (the packed weight's shape is not the matrix's);
* :func:`matmul`: the quantised product ``x W0^T`` without bias, so a rotation transforms the
  input of the quantised matmul and an additive method adds to its output: the weight is never
  dequantised as a whole in training;
* :func:`dequantize`: one layer's (d_out, d_in) weight, for what needs it once (PiSSA's SVD,
  PSOFT/LOFT principal supports, the init check, merging), freed by the caller;
* :func:`requantize`: writing a merged weight back in the layer's own format, recording the
  re-quantisation error (:func:`merge_errors`); or :func:`to_dense` for a plain float layer.

:func:`stored_weight` / :func:`load_stored_weight` give a layer's quantised weight as plain tensors and
back, for a base that LoftQ's alternation re-quantised, which must travel with its adapter.

bitsandbytes is imported only when a model already holds its layers, so nothing here needs it
installed otherwise (``pip install orthotune[quant]``).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from torch import Tensor, nn

_ERROR_ATTR = "_orthotune_requantization_error"
_HEAD_CAST_ATTR = "_orthotune_head_cast"  # the handles of the head's and embeddings' cast hooks (prepare adds each once)
_EMBEDDING_CAST_ATTR = "_orthotune_embedding_cast"
_OWN_BASE_ATTR = "_orthotune_own_base"  # the weight is an adapter's own (LoftQ's alternation), not the checkpoint's rounding


def _bnb() -> Any:
    """bitsandbytes, if it has been imported (a bnb layer cannot exist before that)."""
    return sys.modules.get("bitsandbytes")


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` or ``Linear8bitLt``."""
    bnb = _bnb()
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def is_4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` (NF4 or FP4)."""
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a quantised linear layer."""
    return module.in_features, module.out_features


def quantized_param(p: Tensor) -> bool:
    """True for a bitsandbytes quantised weight (``Params4bit``/``Int8Params``)."""
    bnb = _bnb()
    return bnb is not None and isinstance(p, (bnb.nn.Params4bit, bnb.nn.Int8Params))


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype adapters cache their per-step cores in on a quantised layer: float32. The packed storage
    keeps no record of the activations' dtype (float32 after prepare_model_for_kbit_training, else the
    model's), and a core cached below the activations' precision would be rounded, one cast above is not."""
    return torch.float32


def matmul_dtype(module: nn.Module) -> torch.dtype | None:
    """The float dtype bitsandbytes' matmul computes in: a 4-bit layer's ``compute_dtype`` (None until set),
    float16 for int8 (its kernels quantise float16 inputs)."""
    return module.compute_dtype if is_4bit(module) else torch.float16


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a quantised layer cannot carry an adapter (with the fix), or None if it can."""
    if module.weight.device.type == "meta":
        return "has its weight on the meta device (not loaded yet); load the model's weights before adding adapters"
    if is_4bit(module):
        if getattr(module.weight, "quant_state", None) is None and getattr(module, "quant_state", None) is None:
            return (
                f"is a {type(module).__name__} whose weight is not quantised yet (no quant_state); move it to its "
                "device (.to(device)) or load the model with a BitsAndBytesConfig before adding adapters"
            )
        return None
    if module.state.has_fp16_weights:
        return (
            "is a Linear8bitLt with has_fp16_weights=True (its float weight trains in full); load it with "
            "BitsAndBytesConfig(load_in_8bit=True), which freezes the int8 weight"
        )
    if _int8_stats(module)[0] is None:
        return "is a Linear8bitLt whose weight is not quantised yet; move it to its device (.to(device)) first"
    return None


def _int8_stats(module: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    """(CB, SCB) of a Linear8bitLt: on its weight before the first forward, on its state after."""
    w, state = module.weight, module.state
    cb = w.CB if getattr(w, "CB", None) is not None else state.CB
    scb = w.SCB if getattr(w, "SCB", None) is not None else state.SCB
    if cb is None and w.dtype == torch.int8:
        cb = w.data
    return cb, scb


def _quant_state(module: nn.Module) -> Any:
    qs = getattr(module.weight, "quant_state", None)
    return qs if qs is not None else module.quant_state


@torch.no_grad()
def unpack_cpu_layout(module: nn.Module) -> None:
    """Return a 4-bit layer to bitsandbytes' standard layout if its own eval-mode forward on an AVX512-BF16
    CPU repacked it (``packing_format_for_cpu``): that layout serves only bnb's inference kernel, which
    has no backward, and ``dequantize_4bit`` misreads it. A no-op on every other layer."""
    if not is_4bit(module) or not getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    # the inverse rewrites the quant_state it is given: hand it the module's own, then store both back
    module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
        module.weight.data, module.weight.quant_state
    )


def keep_training_layout(model: nn.Module) -> None:
    """Keep every 4-bit layer of ``model`` in bnb's standard layout from now on: an eval-mode no-grad forward
    of a ``Linear4bit`` on an AVX512-BF16 CPU repacks its weight for an inference kernel without a backward,
    and the layer keeps that layout in train mode, so a later training step passes no gradient through it
    (bitsandbytes 0.50: an adapter before a frozen 4-bit layer silently stops learning after an evaluation).
    Such layers run bnb's standard CPU kernel instead, in both modes."""
    for module in model.modules():
        if is_4bit(module):
            unpack_cpu_layout(module)
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False


@torch.no_grad()
def dequantize(module: nn.Module) -> Tensor:
    """One layer's weight as a float (d_out, d_in) matrix: 4-bit in its original dtype, 8-bit in float32."""
    bnb = _bnb()
    if is_4bit(module):
        unpack_cpu_layout(module)
        return bnb.functional.dequantize_4bit(module.weight.data, _quant_state(module)).reshape(
            module.out_features, module.in_features
        )
    cb, scb = _int8_stats(module)
    return bnb.functional.int8_vectorwise_dequant(cb, scb).reshape(module.out_features, module.in_features)


def matmul(module: nn.Module, x: Tensor) -> Tensor:
    """``x W0^T`` through bitsandbytes' own kernels (as the layer's forward, without its bias), in x's dtype."""
    bnb = _bnb()
    if is_4bit(module):
        bnb.nn.modules.fix_4bit_weight_quant_state_from_module(module)
        unpack_cpu_layout(module)
        if not module.compute_type_is_set:
            module.set_compute_type(x)
            module.compute_type_is_set = True
        z = x if module.compute_dtype is None else x.to(module.compute_dtype)
        return bnb.matmul_4bit(z, module.weight, quant_state=module.weight.quant_state).to(x.dtype)
    state = module.state
    state.is_training = module.training
    if module.weight.CB is not None:
        module.init_8bit_state()
    out = bnb.matmul(x, module.weight, state=state)
    if state.CB is not None:
        module.weight.data = state.CB
    return out.to(x.dtype)


def _set_4bit(module: nn.Module, packed: Tensor, state: Any) -> None:
    """Give a ``Linear4bit`` a new packed weight and quant state, keeping its format settings."""
    old = module.weight
    module.weight = _bnb().nn.Params4bit(
        packed, requires_grad=False, quant_state=state, blocksize=old.blocksize,
        compress_statistics=old.compress_statistics, quant_type=old.quant_type,
        quant_storage=old.quant_storage, module=module, bnb_quantized=True,
    )
    module.quant_state = state


def _set_int8(module: nn.Module, cb: Tensor, scb: Tensor) -> None:
    """Give a ``Linear8bitLt`` new int8 rows and row scales; its next forward takes them."""
    module.weight = _bnb().nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    module.state.CB = module.state.SCB = None


@torch.no_grad()
def requantize(module: nn.Module, W: Tensor) -> None:
    """Write a float (d_out, d_in) weight into the layer in its own format (same quant type, block size,
    double quantisation, storage), recording the relative error of the re-quantised weight."""
    bnb = _bnb()
    W = W.reshape(module.out_features, module.in_features)
    if is_4bit(module):
        old = module.weight
        packed, state = bnb.functional.quantize_4bit(
            W.to(_quant_state(module).dtype).contiguous(),
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
        )
        _set_4bit(module, packed, state)
    else:
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(W.to(torch.float16).contiguous())
        _set_int8(module, cb, scb)
    W = W.float()
    error = float((dequantize(module).float() - W).norm() / W.norm().clamp_min(1e-30))
    module.__dict__[_ERROR_ATTR] = error


def mark_own_base(module: nn.Module) -> None:
    """Record that ``module``'s quantised weight was written for an adapter (LoftQ's alternation re-quantised it):
    adapters saved on it say so, and loading them onto a base without it is refused (:func:`has_own_base`)."""
    module.__dict__[_OWN_BASE_ATTR] = True


def has_own_base(module: nn.Module) -> bool:
    """True if ``module``'s weight is an adapter's own (:func:`mark_own_base`), written here or restored."""
    return bool(module.__dict__.get(_OWN_BASE_ATTR))


@torch.no_grad()
def stored_weight(module: nn.Module) -> dict[str, Tensor]:
    """A quantised layer's stored weight as plain tensors, for safetensors: 4-bit, the packed weight and
    bitsandbytes' packed quant state (as transformers serialises it); 8-bit, the int8 rows and their scales."""
    if is_4bit(module):
        unpack_cpu_layout(module)
        return {"weight": module.weight.data, **_quant_state(module).as_dict(packed=True)}
    cb, scb = _int8_stats(module)
    return {"CB": cb, "SCB": scb}


def check_stored_weight(module: nn.Module, tensors: dict[str, Tensor], name: str) -> Any:
    """Refuse :func:`stored_weight`'s tensors for ``module`` unless it is quantised the same way (kind, quant type,
    block size, shape); returns the 4-bit quant state they describe (None for 8-bit)."""
    if not is_quantized(module):
        raise ValueError(f"{name!r} is a {type(module).__name__}, but its stored weight is a bitsandbytes one: load "
                         "the base quantised as it was when the weight was stored (the same BitsAndBytesConfig)")
    shape = (module.out_features, module.in_features)
    if "weight" not in tensors:
        if is_4bit(module):
            raise ValueError(f"{name!r} is 4-bit here, its stored weight is 8-bit: load the base in 8-bit")
        if tuple(tensors["CB"].shape) != shape:
            raise ValueError(f"{name!r}'s stored weight is {tuple(tensors['CB'].shape)}, the layer is {shape}: it was "
                             "stored from another model")
        return None
    if not is_4bit(module):
        raise ValueError(f"{name!r} is 8-bit here, its stored weight is 4-bit: load the base in 4-bit")
    state = _bnb().functional.QuantState.from_dict({k: v for k, v in tensors.items() if k != "weight"}, module.weight.device)
    got = (state.quant_type, state.blocksize, tuple(state.shape))
    want = (module.weight.quant_type, module.weight.blocksize, shape)
    if got != want:
        raise ValueError(f"{name!r}'s stored weight is (quant type, block size, shape) {got}, the layer here is {want}: "
                         "load the base quantised as it was when the weight was stored")
    return state


@torch.no_grad()
def load_stored_weight(module: nn.Module, tensors: dict[str, Tensor], state: Any) -> None:
    """Write :func:`stored_weight`'s tensors into ``module``; ``state`` is what :func:`check_stored_weight` returned."""
    device = module.weight.device
    if state is not None:
        _set_4bit(module, tensors["weight"].to(device), state)
    else:
        _set_int8(module, tensors["CB"].to(device), tensors["SCB"].to(device))


def merge_errors(modules: dict[str, nn.Module]) -> dict[str, float]:
    """Relative Frobenius error ``|Q(W) - W| / |W|`` of each named layer re-quantised since the last call."""
    return {name: m.__dict__.pop(_ERROR_ATTR) for name, m in modules.items() if _ERROR_ATTR in m.__dict__}


def warn_requantized(errors: dict[str, float]) -> None:
    """Say that merging re-quantised layers, and how much that rounding moved the merged weights."""
    if errors:
        worst = max(errors, key=errors.get)
        warnings.warn(
            f"merged into {len(errors)} quantised layer(s) by re-quantising them: relative weight error "
            f"|Q(W)-W|/|W| mean {sum(errors.values()) / len(errors):.3g}, max {errors[worst]:.3g} ({worst!r}); the "
            "adapter's update is partly rounded away. For the exact merged model use "
            "merge_and_unload(dequantize=torch.bfloat16) (docs/quantized.md)",
            stacklevel=3,
        )


@torch.no_grad()
def to_dense(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A plain frozen ``nn.Linear`` of ``dtype`` holding the layer's dequantised weight and its bias."""
    W = dequantize(module)
    dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=W.device, dtype=dtype)
    dense.weight.copy_(W)
    if module.bias is not None:
        dense.bias.copy_(module.bias)
    dense.requires_grad_(False)
    return dense


def dequantize_adapted(layers: list[Any], dtype: torch.dtype) -> int:
    """Replace the quantised base of each adapter layer by a dense one of ``dtype``, one layer at a time."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dequantize must be a floating-point torch.dtype such as torch.bfloat16, got {dtype!r}")
    count = 0
    for layer in layers:
        if is_quantized(layer.base_layer):
            layer.base_layer = to_dense(layer.base_layer, dtype)
            count += 1
    return count


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    upcast_embeddings: bool = False,
    upcast_head: bool = True,
) -> nn.Module:
    """Ready a bitsandbytes-quantised model for adapter training, as peft's function of that name does: freeze
    everything; hold the norms, the output head and every other non-quantised float16/bfloat16 parameter in
    float32, so the residual stream, the normalisation statistics and the logits stay in float32 while the
    quantised matmuls run in their compute dtype; turn on activation checkpointing with input gradients, so that
    checkpointed blocks still pass gradients to the adapters inside them.

    One difference, exact: input embeddings not tied to the head stay in the dtype they were loaded in and their
    output is upcast to float32 (a forward hook), the values peft's float32 lookup returns, at 2 bytes a parameter
    less (1 GiB on Llama-3-8B). ``upcast_embeddings=True`` holds them in float32 as peft does.

    ``upcast_head=False`` keeps the head (and embeddings tied to it) in the loaded dtype, as the QLoRA paper's
    script does (arXiv:2305.14314, ``qlora.py``): 2 bytes a parameter less and a bf16 logits GEMM, but bf16 logits,
    with which LoCO trained measurably worse on the CPU (docs/quantized.md). The head casts its input to its
    weight's dtype (a forward pre-hook), so a head cast to bf16 after this call works as well. Each hook is added
    once however often the model is prepared."""
    keep_training_layout(model)
    embedding = _float_module(model, "get_input_embeddings")
    head = _float_module(model, "get_output_embeddings")
    tied = embedding is not None and head is not None and embedding.weight is head.weight
    kept = set()
    if head is not None and not upcast_head:
        kept.add(id(head.weight))
    if embedding is not None and not upcast_embeddings and not tied:
        kept.add(id(embedding.weight))
    for p in model.parameters():
        p.requires_grad_(False)
        if _16bit_float(p) and id(p) not in kept:
            p.data = p.data.float()
    if head is not None:
        _hook_once(head, _HEAD_CAST_ATTR, head.register_forward_pre_hook, _input_to_weight_dtype)
    if embedding is not None:
        _hook_once(embedding, _EMBEDDING_CAST_ATTR, embedding.register_forward_hook, _output_to_float32)
    if use_gradient_checkpointing:
        enable_activation_checkpointing(model, gradient_checkpointing_kwargs)
    return model


def _16bit_float(p: Any) -> bool:
    """A float16/bfloat16 tensor that is not a bitsandbytes quantised weight."""
    return isinstance(p, Tensor) and p.dtype in (torch.float16, torch.bfloat16) and not quantized_param(p)


def _float_module(model: nn.Module, getter: str) -> nn.Module | None:
    """A transformers model's input embeddings or output head (``getter``) if its weight is a floating-point tensor
    that bitsandbytes did not quantise, else None."""
    module = getattr(model, getter)() if hasattr(model, getter) else None
    weight = getattr(module, "weight", None)
    return module if isinstance(weight, Tensor) and weight.is_floating_point() and not quantized_param(weight) else None


def _hook_once(module: nn.Module, attr: str, register: Any, hook: Any) -> None:
    """Register ``hook`` with ``register`` unless an earlier preparation did (its handle is kept as ``attr``)."""
    if not hasattr(module, attr):
        setattr(module, attr, register(hook))


def _input_to_weight_dtype(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook: the head's float input (float32 from a float32 norm) cast to the head's weight dtype."""
    x = args[0] if args else None
    if isinstance(x, Tensor) and x.is_floating_point() and x.dtype != module.weight.dtype:
        return (x.to(module.weight.dtype), *args[1:])
    return None


def _output_to_float32(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
    """Forward hook: a 16-bit embedding's output in float32, the residual stream's dtype under peft's preparation."""
    return out.float() if _16bit_float(out) else None


def enable_activation_checkpointing(model: nn.Module, kwargs: dict[str, Any] | None = None) -> None:
    """Turn on a transformers model's activation checkpointing (non-reentrant unless ``kwargs`` say otherwise)
    with input gradients, so that checkpointed blocks of a frozen model still pass gradients to adapters."""
    kwargs = kwargs or {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
        model.activation_checkpointing_enable(kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(model).__name__} has no activation_checkpointing_enable(); turn checkpointing off")
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
