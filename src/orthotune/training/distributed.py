"""Multi-process training on PyTorch's own engines: DDP and FSDP2, launched by torchrun or accelerate.

orthotune adds no engine: this module is the glue. :func:`init` starts the process group a launcher
described in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; nccl on CUDA, gloo on CPU);
:func:`wrap` hands an :class:`~orthotune.model.adapter_model.AdapterModel` to
``DistributedDataParallel`` or to FSDP2's ``fully_shard`` (each transformer block, then the root).
The base is frozen, so only adapter parameters get gradients and only they are all-reduced (DDP)
or reduce-scattered (FSDP); the frozen base is broadcast once (DDP) or sharded (FSDP).

Saving: every rank calls :func:`save_adapter`; under FSDP the adapter's shards are gathered into
full tensors first (a collective), then rank 0 alone writes the folder atomically (``model/io.py``) and
all ranks wait at a barrier, so the folder is complete when any rank goes on. The folder is an
ordinary adapter: ``orthotune.load_adapter(base, folder)`` loads it in one process.

The model's per-step plan (:mod:`orthotune.layer.plan`) works unchanged under DDP. Under FSDP the parameters
are shards (DTensors) until each block's own forward gathers them, so the plan leaves those layers
alone and each computes its core inside its block (same values, per layer).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor, nn

from ..layer import plan
from ..methods.config import check_choice
from ..methods.loca.loca import LoCA
from ..model.adapter_model import AdapterModel, _is_checkpointing
from ..model.io import WEIGHTS_NAME, adapter_state_dict, read_config, save_adapter as write_adapter

STRATEGIES = ("auto", "ddp", "fsdp", "none")
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a launch, as torchrun and ``accelerate launch`` describe it."""

    rank: int
    world_size: int
    local_rank: int


def launch_env(env: Mapping[str, str] | None = None) -> Launch | None:
    """The launch described by ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, or None if not launched so."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return None
    try:
        values = [int(env.get(k, "0")) for k in _ENV]
    except ValueError:
        raise ValueError(f"the launcher's environment is malformed: {', '.join(f'{k}={env.get(k)!r}' for k in _ENV)}") from None
    rank, world, local = values
    if not 0 <= rank < world or local < 0:
        raise ValueError(f"the launcher's environment is inconsistent: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return Launch(rank, world, local)


def init(device_type: str | None = None) -> Launch:
    """Join the launch's process group (once; later calls return the same launch).

    nccl when ``device_type`` (default: CUDA if available) is ``"cuda"``, else gloo; on CUDA this
    process's GPU becomes ``cuda:LOCAL_RANK``. Raises if no launcher set the environment.
    """
    launch = launch_env()
    if dist.is_initialized():
        return Launch(dist.get_rank(), dist.get_world_size(), launch.local_rank if launch else 0)
    if launch is None:
        raise ValueError(
            "distributed training needs a launcher: run under `torchrun --nproc_per_node N ...` or "
            "`accelerate launch --num_processes N ...` (they set RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR)"
        )
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        torch.cuda.set_device(launch.local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=launch.rank, world_size=launch.world_size)
    return launch


def shutdown(wait: bool = True) -> None:
    """Leave the process group, if one was joined (after a barrier when ``wait``; not after an error)."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def resolve(strategy: str) -> str:
    """``ddp``, ``fsdp`` or ``none`` for a requested strategy; ``auto``: DDP when launched with WORLD_SIZE > 1."""
    check_choice("distributed", strategy, STRATEGIES)
    launch = launch_env()
    if strategy == "auto":
        return "ddp" if launch is not None and launch.world_size > 1 else "none"
    if strategy != "none" and launch is None and not dist.is_initialized():
        raise ValueError(
            f"--distributed {strategy} needs a launcher: run under `torchrun --nproc_per_node N ...` or "
            "`accelerate launch --num_processes N ...`, or use --distributed none"
        )
    return strategy


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0, and in a process that is not part of a distributed run."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------- wrapping
def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place: its model is the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter is an FSDP2 shard (a DTensor)."""
    return any(_is_dtensor(p) for p in unwrap(model).parameters())


def wrap(
    model: nn.Module,
    strategy: str,
    *,
    find_unused_parameters: bool | None = None,
    static_graph: bool | None = None,
    blocks: list[nn.Module] | None = None,
) -> nn.Module:
    """Hand ``model`` (an AdapterModel, or a model to fine-tune in full) to DDP or FSDP2; ``none`` returns it.

    DDP: ``find_unused_parameters`` defaults to True only where parameters sit out steps (LoCA's
    location phases freeze the coefficients), ``static_graph`` to True under activation
    checkpointing (reentrant checkpointing runs a block's backward twice). FSDP2: ``fully_shard``
    on each of ``blocks`` (default: the transformer blocks, see :func:`find_blocks`) and the root;
    the optimiser must be created after this call (the parameters become DTensors).
    """
    check_choice("strategy", strategy, ("ddp", "fsdp", "none"))
    if strategy == "none":
        return model
    if not dist.is_initialized():
        raise ValueError("no process group: call orthotune.training.distributed.init() (under torchrun or accelerate) before wrap()")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters: did the adapter match any module?")
    learns_locations = _learns_locations(model)
    device = next(model.parameters()).device
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=learns_locations if find_unused_parameters is None else find_unused_parameters,
            static_graph=(_checkpointing(model) and not learns_locations) if static_graph is None else static_graph,
            gradient_as_bucket_view=True,
        )
    if learns_locations:
        raise ValueError(
            "LoCA with learn_locations moves its cells by finite differences on whole spectra, which FSDP "
            "shards: train it with --distributed ddp (its adapters are small), or set adapter.learn_locations=false"
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    units = find_blocks(model) if blocks is None else blocks
    for unit in units + [model]:
        _check_uniform_trainable_dtype(unit, units)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    plan.clear(model)  # cores cached before sharding must not outlive the parameters they came from
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """FSDP units: modules of a class in transformers' ``_no_split_modules`` (decoder / encoder layers),
    else the members of the longest ``ModuleList`` / ``Sequential`` of one class (timm's ``blocks``)."""
    inner = unwrap(model)
    base = inner.base_model if isinstance(inner, AdapterModel) else inner
    names = set(getattr(base, "_no_split_modules", None) or [])
    found = [m for m in base.modules() if type(m).__name__ in names]
    if found:
        return [m for m in found if not any(o is not m and _contains(o, m) for o in found)]
    best: list[nn.Module] = []
    for m in base.modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > len(best) and len({type(c) for c in m}) == 1:
            best = list(m)
    return best


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def _check_uniform_trainable_dtype(unit: nn.Module, units: list[nn.Module]) -> None:
    """FSDP2 reduce-scatters one dtype per unit: refuse mixed trainable dtypes with the fix, before sharding."""
    inside = {id(p) for u in units if u is not unit and _contains(unit, u) for p in u.parameters()}
    dtypes = {p.dtype for p in unit.parameters() if p.requires_grad and id(p) not in inside}
    if len(dtypes) > 1:
        raise ValueError(
            f"FSDP needs one dtype for the trainable parameters of each sharded unit, {type(unit).__name__} has "
            f"{sorted(str(d) for d in dtypes)}: keep adapters in float32 (autocast_adapter_dtype=True) and cast "
            "modules_to_save to float32, or use --distributed ddp"
        )


def _learns_locations(model: nn.Module) -> bool:
    return any(isinstance(m, LoCA) and m.config.learn_locations and m.spectrum.requires_grad for m in model.modules())


def _checkpointing(model: nn.Module) -> bool:
    inner = model.base_model if isinstance(model, AdapterModel) else model
    return _is_checkpointing(inner)


def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


# ---------------------------------------------------------------------------------------------- state
def live_state(model: nn.Module, adapter_name: str | None = None) -> dict[str, Tensor]:
    """What a save writes, keyed as in the file, as views of the live (maybe sharded) tensors.

    An AdapterModel: one adapter (default: the active one) in ``io.adapter_state_dict``'s keys;
    any other model: its trainable parameters by name (full fine-tuning).
    """
    inner = unwrap(model)
    if isinstance(inner, AdapterModel):
        return adapter_state_dict(inner, adapter_name or inner.active_adapter)
    return {n: p.detach() for n, p in inner.named_parameters() if p.requires_grad}


def full_state(model: nn.Module, adapter_name: str | None = None) -> dict[str, Tensor]:
    """:func:`live_state` with FSDP shards gathered into full tensors (a collective: call on every rank)."""
    return {k: _full(v) for k, v in live_state(model, adapter_name).items()}


@torch.no_grad()
def load_full_state(model: nn.Module, state: Mapping[str, Tensor], adapter_name: str | None = None) -> None:
    """Copy full tensors (:func:`full_state`'s keys) into the live ones in place, each rank keeping its shard."""
    live = live_state(model, adapter_name)
    if set(live) != set(state):
        missing, unexpected = sorted(set(live) - set(state)), sorted(set(state) - set(live))
        raise ValueError(f"the saved tensors do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, target in live.items():
        value = state[key]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"tensor {key!r} has shape {tuple(value.shape)}, this model needs {tuple(target.shape)}")
        value = value.to(device=target.device, dtype=target.dtype)
        if _is_dtensor(target):
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value, target.device_mesh, target.placements)
        target.copy_(value)


def save_adapter(model: nn.Module, directory: str | Path, adapter_name: str | None = None) -> None:
    """Save one adapter from a distributed run: call on every rank; rank 0 writes atomically, all wait."""
    inner = unwrap(model)
    if not isinstance(inner, AdapterModel):
        raise ValueError(f"save_adapter needs an orthotune model, got {type(inner).__name__}")
    name = adapter_name or inner.active_adapter
    state = full_state(inner, name) if is_sharded(inner) else None
    if is_main_process():
        write_adapter(inner, directory, name, state=state)
    barrier()


def load_adapter_weights(model: nn.Module, directory: str | Path, adapter_name: str | None = None) -> None:
    """``AdapterModel.load_adapter_weights`` for a wrapped model (every rank reads the folder; FSDP: its shard)."""
    inner = unwrap(model)
    if not isinstance(inner, AdapterModel):
        raise ValueError(f"load_adapter_weights needs an orthotune model, got {type(inner).__name__}")
    if not is_sharded(inner):
        inner.load_adapter_weights(directory, adapter_name)
        return
    name = adapter_name or inner.active_adapter
    config, _ = read_config(directory)  # checks the weights' checksum
    if config.to_dict() != inner.configs[name].to_dict():
        raise ValueError(f"{directory} holds a different configuration than adapter {name!r}")
    load_full_state(inner, load_file(str(Path(directory) / WEIGHTS_NAME)), name)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser's state to checkpoint: its own ``state_dict`` unless sharded (FSDP: gathered to rank 0,
    keyed by parameter name; a collective). Resume with the strategy the checkpoint was written under."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap(model), optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of :func:`optimizer_state` (every rank passes the same full state)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))


def merge_and_unload(model: nn.Module) -> nn.Module:
    """The merged plain model of a DDP (or single-process) run; under FSDP, where no rank holds the
    full base weights, save the adapter and merge it in one process instead."""
    inner = unwrap(model)
    if is_sharded(inner):
        raise ValueError(
            "the base weights are FSDP shards, so no rank can merge into them: save the adapter with "
            "orthotune.training.distributed.save_adapter(model, folder), then in one process "
            "orthotune.load_adapter(base_model, folder).merge_and_unload() (or `orthotune merge RUN --out DIR`)"
        )
    if not isinstance(inner, AdapterModel):
        raise ValueError(f"merge_and_unload needs an orthotune model, got {type(inner).__name__}")
    return inner.merge_and_unload()


# ---------------------------------------------------------------------------------------------- data
def shard_batch(batch: object, rank: int, world: int) -> tuple[object, float]:
    """This rank's contiguous slice of a global batch (tensors split on dim 0, in dicts / lists / tuples)
    and the slice's share of the batch's examples; ``world`` consecutive slices make the batch again."""
    sizes: list[int] = []

    def split(x: object) -> object:
        if isinstance(x, Tensor) and x.dim() > 0:
            parts = torch.tensor_split(x, world)
            sizes.append(x.shape[0])
            return parts[rank]
        if isinstance(x, Mapping):
            return type(x)({k: split(v) for k, v in x.items()})
        if isinstance(x, (list, tuple)):
            return type(x)(split(v) for v in x)
        return x

    local = split(batch)
    if not sizes or len(set(sizes)) != 1:
        raise ValueError(f"cannot shard this batch across ranks: its tensors' first dimensions differ ({sorted(set(sizes))})")
    n = sizes[0]
    if n < world:
        raise ValueError(f"a batch of {n} examples cannot be split over {world} processes; raise train.batch_size")
    return local, len(range(rank, n, world)) / n  # tensor_split's slice sizes


def global_mean(value: Tensor, share: float) -> Tensor:
    """The batch mean of a per-slice mean ``value`` over all ranks (an all-reduce; ``value`` alone if not distributed).

    With ``loss * share * world_size`` backpropagated, DDP's and FSDP's gradient averaging gives the
    gradient of this mean: that of one process on the whole batch.
    """
    if world_size() == 1:
        return value
    total = value.detach().float() * share
    dist.all_reduce(total)
    return total
