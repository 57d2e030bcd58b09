"""Adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``, written atomically.

The JSON holds the method's config fields (flat, as in peft), the format version, the adapted
modules with their shapes, the SHA-256 of the weights file, and the layers whose quantised base
LoftQ's alternation re-quantised for this adapter (``own_base``, only if any), so a truncated,
tampered or mismatched folder, or a base without those layers, is refused with a clear message
before anything in the model changes.

Atomicity: both files are written into a temporary sibling folder, flushed, then swapped in with
one ``renameat2(RENAME_EXCHANGE)`` (Linux) or two renames; an interrupted save leaves the previous
adapter intact. A folder holding other files too (e.g. a trainer checkpoint) gets each file
replaced atomically instead, after hard-linking the previous pair to hidden ``.<name>.prev``
files; the checksum catches a save cut between the two replacements and the error points at
that backup. Non-finite tensors are refused on save and on load.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..layer import quantized
from ..layer.adapter_layer import layer_dims, layer_kind
from ..methods.config import FORMAT_VERSION, AdapterConfig
from ..methods.registry import config_from_dict
from ..methods.task_type import saved_patterns
from ..ops.finite import all_finite
from ..version import __version__
from .inject import build_method, find_modules_to_save, iter_named_layers, unsupported_reason
from .meta_init import build_on_meta, materialize

if TYPE_CHECKING:
    from .adapter_model import AdapterModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SAVED_PREFIX = "modules_to_save."
_META_KEYS = (
    "format_version", "orthotune_version", "base_model_class", "base_model_name_or_path", "targets", "weights_sha256", "own_base",
)


def adapter_state_dict(model: AdapterModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """Every tensor of one adapter, keyed ``<module>.<param>`` relative to the wrapped model."""
    if adapter_name not in model.configs:
        raise ValueError(f"no adapter named {adapter_name!r}; adapters here: {sorted(model.configs)}")
    state: dict[str, torch.Tensor] = {}
    for lname, layer in model.adapter_layers():
        if adapter_name in layer.adapters:
            for key, value in layer.adapters[adapter_name].state_dict().items():
                state[f"{lname}.{key}"] = value.detach()
    for sname, saved in model.saved_modules():
        if adapter_name in saved.copies:
            for key, value in saved.copies[adapter_name].state_dict().items():
                state[f"{SAVED_PREFIX}{sname}.{key}"] = value.detach()
    return state


def adapter_state_in(model: AdapterModel, state_dict: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
    """One adapter's tensors, keyed as :func:`adapter_state_dict` keys them, taken from a full ``model.state_dict()``
    (e.g. gathered from FSDP shards)."""
    own = adapter_state_dict(model, adapter_name)
    full = {_adapter_key(k, adapter_name): v for k, v in state_dict.items()}
    missing = sorted(set(own) - set(full))
    if missing:
        raise ValueError(f"state_dict lacks adapter {adapter_name!r}'s tensors {missing[:5]}: pass the model's state_dict()")
    return {k: full[k] for k in own}


def _adapter_key(key: str, adapter_name: str) -> str:
    """``model.state_dict()`` key -> :func:`adapter_state_dict` key (unchanged when it is no adapter tensor)."""
    key = key.removeprefix("base_model.")
    for infix, prefix in ((f".adapters.{adapter_name}.", ""), (f".copies.{adapter_name}.", SAVED_PREFIX)):
        if infix in key:
            owner, rest = key.split(infix, 1)
            return f"{prefix}{owner}.{rest}"
    return key


def save_adapter(model: AdapterModel, directory: str | Path, adapter_name: str, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write one adapter folder atomically (see the module docstring); refuses non-finite weights.

    ``state`` replaces the model's own tensors (:func:`adapter_state_dict`'s keys): the full tensors
    gathered from FSDP shards (:mod:`orthotune.training.distributed`), which the model's parameters are not.
    """
    directory = Path(directory)
    state = adapter_state_dict(model, adapter_name) if state is None else state
    state = {k: v.to("cpu").contiguous() for k, v in state.items()}
    bad = _first_nonfinite(state)
    if bad is not None:
        raise ValueError(
            f"refusing to save adapter {adapter_name!r}: tensor {bad!r} holds NaN or Inf (training diverged; "
            "orthotune.check_finite(model) names the layer). Nothing was written: an adapter already saved at "
            f"{directory} is left as it was"
        )
    targets = {
        lname: [layer.d_out, layer.d_in, layer.kind]
        for lname, layer in model.adapter_layers()
        if adapter_name in layer.adapters
    }
    base_cfg = getattr(model.base_model, "config", None)
    meta = {
        "format_version": FORMAT_VERSION,
        "orthotune_version": __version__,
        "base_model_class": type(model.base_model).__name__,
        "base_model_name_or_path": getattr(base_cfg, "name_or_path", None) or None,
        "targets": targets,
    }
    own = sorted(lname for lname, layer in model.adapter_layers() if adapter_name in layer.adapters and quantized.has_own_base(layer.base_layer))
    if own:  # LoftQ's alternation re-quantised these layers: the adapter belongs to that base (load_loftq_base)
        meta["own_base"] = own
    payload = {**model.configs[adapter_name].to_dict(), **meta}
    write_folder(directory, state, payload, {"format": "pt", "orthotune_format": str(FORMAT_VERSION)}, checksum=True)


def write_folder(
    directory: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], metadata: dict[str, str], checksum: bool
) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` atomically (see the module docstring).

    With ``checksum`` the weights' SHA-256 goes into the config as ``weights_sha256``.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_folder(directory)
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        if checksum:
            config = {**config, "weights_sha256": _sha256(tmp / WEIGHTS_NAME)}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in (WEIGHTS_NAME, CONFIG_NAME):
            _fsync(tmp / f)
        _install(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def staging_folder(directory: Path) -> Path:
    """A fresh temporary sibling of ``directory`` to write it in, then move into place, with the permissions the
    folder should end with: those ``directory`` has, else 0755 (what ``save_pretrained``'s ``os.makedirs`` gives
    under the usual umask), not mkdtemp's 0700."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    os.chmod(tmp, directory.stat().st_mode & 0o7777 if directory.is_dir() else 0o755)
    return tmp


def read_adapter(
    base: nn.Module, directory: str | Path, low_cpu_mem_usage: bool = False
) -> tuple[AdapterConfig, dict[str, nn.Module], dict[str, dict]]:
    """Validate a folder against ``base`` and build its modules, touching nothing in ``base``.

    Returns the config, the method module per target (weights loaded), and the state of each
    saved module (keys checked against the module it belongs to). ``low_cpu_mem_usage``: see
    :mod:`orthotune.model.meta_init`.
    """
    directory = Path(directory)
    config, meta = read_config(directory)
    _check_own_base(base, meta["own_base"] or [], directory)
    try:
        state = load_file(str(directory / WEIGHTS_NAME))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{directory / WEIGHTS_NAME} is not a readable safetensors file ({err}); save the adapter again") from err
    modules, saved_states = build_adapter(
        base, config, meta["targets"], state, directory, meta["base_model_class"], low_cpu_mem_usage
    )
    return config, modules, saved_states


def _check_own_base(base: nn.Module, names: list[str], source: Path) -> None:
    """An adapter saved on layers LoftQ's alternation re-quantised needs that base: refused on a quantised base
    without it (restore it first), a warning on a float base (which lacks the rounding the adapter corrects)."""
    if not names:  # the usual folder: nothing to check, no walk over the model
        return
    layers = dict(iter_named_layers(base))
    missing = [n for n in names if n in layers and quantized.is_quantized(layers[n]) and not quantized.has_own_base(layers[n])]
    if missing:
        raise ValueError(
            f"the adapter in {source} was started by loftq_init(iterations > 1), which re-quantised {len(names)} layers "
            f"(e.g. {missing[0]!r}) for it; this base has the checkpoint's own rounding there: restore them first with "
            "orthotune.load_loftq_base(model, <the loftq_base.safetensors saved with the adapter>)"
        )
    floats = [n for n in names if n in layers and not quantized.is_quantized(layers[n])]
    if floats:
        warnings.warn(
            f"the adapter in {source} was trained on a base LoftQ's alternation re-quantised; on this float base "
            f"({len(floats)} such layers) it also adds its start's correction of the rounding, which is not there",
            stacklevel=4,
        )


def build_adapter(
    base: nn.Module,
    config: AdapterConfig,
    targets: dict[str, list],
    state: dict[str, torch.Tensor],
    source: str | Path,
    saved_for: str | None,
    low_cpu_mem_usage: bool = False,
) -> tuple[dict[str, nn.Module], dict[str, dict]]:
    """Check an adapter's tensors (orthotune's key layout) against ``base`` and build its modules.

    ``targets`` maps each adapted module to ``[d_out, d_in, kind]``; ``source`` and ``saved_for``
    (the architecture it was trained on) only serve the error messages. Touches nothing in ``base``.
    ``low_cpu_mem_usage`` builds the parameters on the meta device and assigns the loaded tensors
    (:mod:`orthotune.model.meta_init`): no initialisation runs and each tensor is held once.
    """
    build = build_on_meta if low_cpu_mem_usage else build_method

    layers = dict(iter_named_layers(base))
    modules: dict[str, nn.Module] = {}
    for lname, (d_out, d_in, kind) in targets.items():
        module = layers.get(lname)
        if module is None or layer_kind(module) is None:
            raise ValueError(
                f"the adapter in {source} adapts {lname!r}, which this model does not have as a linear layer: "
                f"it was saved for a {saved_for or 'different model'}; load it into that architecture"
            )
        reason = unsupported_reason(module)
        if reason is not None:
            raise ValueError(f"cannot load the adapter in {source}: layer {lname!r} {reason}")
        if layer_dims(module) != (d_in, d_out) or layer_kind(module) != kind:
            got_in, got_out = layer_dims(module)
            raise ValueError(
                f"shape mismatch at {lname!r}: the adapter expects a {kind} of {d_out}x{d_in}, the model has a "
                f"{layer_kind(module)} of {got_out}x{got_in}; it was saved for a different base model"
            )
        modules[lname] = build(config, module, lname)

    expected: dict[str, torch.Tensor] = {}
    for lname, method in modules.items():
        expected.update({f"{lname}.{k}": v for k, v in method.state_dict().items()})
    saved_states = _saved_module_states(base, state, config, source)
    for sname, sstate in saved_states.items():
        expected.update({f"{SAVED_PREFIX}{sname}.{k}": v for k, v in sstate.items()})
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"the tensors in {source} do not fit their config: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            "the folder was edited or mixes two adapters: save the adapter again"
        )
    for key, ref in expected.items():
        if state[key].shape != ref.shape:
            why = (
                "it was saved for a different base model"
                if key.startswith(SAVED_PREFIX)
                else "the tensors do not fit the config for this model's layer shapes: the adapter was saved for a "
                "different base model, or the folder was edited (e.g. its rank); save the adapter again"
            )
            raise ValueError(
                f"tensor {key!r} in {source} has shape {tuple(state[key].shape)}, this model needs {tuple(ref.shape)}; {why}"
            )
        if state[key].dtype.is_floating_point != ref.dtype.is_floating_point:
            raise ValueError(
                f"tensor {key!r} in {source} is {state[key].dtype}, this adapter needs a {ref.dtype} tensor; "
                "the folder was edited: save the adapter again"
            )
    bad = _first_nonfinite(state)
    if bad is not None:
        raise ValueError(
            f"tensor {bad!r} in {source} holds NaN or Inf: the adapter was saved from a diverged run; load an "
            "earlier checkpoint"
        )
    with torch.no_grad():
        for lname, method in modules.items():
            own = {k: state[f"{lname}.{k}"] for k in method.state_dict()}
            if low_cpu_mem_usage:
                materialize(method, own, layers[lname], lname)
            else:
                method.load_state_dict(own)
        for sname, sstate in saved_states.items():
            prefix = f"{SAVED_PREFIX}{sname}."
            for k in sstate:
                sstate[k] = state[prefix + k]
    return modules, saved_states


def _saved_module_states(base: nn.Module, state: dict, config: AdapterConfig, source: str | Path) -> dict[str, dict]:
    """The reference state (keys and shapes) of each saved module named in the file."""
    found = dict(find_modules_to_save(base, *saved_patterns(config)))
    out: dict[str, dict] = {}
    for key in state:
        if not key.startswith(SAVED_PREFIX):
            continue
        rest = key[len(SAVED_PREFIX):]
        owner = next((n for n in found if rest.startswith(n + ".")), None)
        if owner is None:
            raise ValueError(f"{source}: saved module tensor {key!r} belongs to no module of this model")
        out.setdefault(owner, dict(found[owner].state_dict()))
    return out


def read_config(directory: str | Path) -> tuple[AdapterConfig, dict[str, Any]]:
    """Parse and check ``adapter_config.json`` and the weights checksum; (config, metadata)."""
    directory = Path(directory)
    if not directory.is_dir():
        hint = _interrupted_save_hint(directory)
        raise ValueError(f"adapter folder {directory} does not exist{hint}")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise ValueError(f"{directory} has no {name}: it is not a complete orthotune adapter folder; save the adapter again")
    try:
        data = json.loads((directory / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{directory / CONFIG_NAME} is not valid JSON ({err}); the file is corrupted: save the adapter again") from err
    if not isinstance(data, dict) or "format_version" not in data:
        hint = ": it was saved by peft, load it with orthotune.from_peft" if isinstance(data, dict) and "peft_type" in data else ""
        raise ValueError(f"{directory / CONFIG_NAME} is not an orthotune adapter config (no format_version){hint}")
    version = data["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{directory / CONFIG_NAME} has an invalid format_version {version!r}; the file was edited: save the adapter again")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{directory} was written in adapter format {version!r}, newer than this orthotune's {FORMAT_VERSION}; "
            "upgrade orthotune to load it"
        )
    meta = {k: data.pop(k, None) for k in _META_KEYS}
    if not isinstance(meta["targets"], dict) or not meta["targets"]:
        raise ValueError(f"{directory / CONFIG_NAME} lists no adapted modules ('targets'); save the adapter again")
    own = meta["own_base"]
    if own is not None and not (isinstance(own, list) and all(isinstance(n, str) and n in meta["targets"] for n in own)):
        raise ValueError(f"{directory / CONFIG_NAME} has an invalid 'own_base' (not a list of its adapted modules); the "
                         "file was edited: save the adapter again")
    actual = _sha256(directory / WEIGHTS_NAME)
    if actual != meta["weights_sha256"]:
        backups = _backup_paths(directory)
        hint = (
            f"; an interrupted save left the previous adapter as {backups[0].name} and {backups[1].name} in "
            f"{directory}: rename them to {WEIGHTS_NAME} and {CONFIG_NAME}"
            if _pair_consistent(*backups)
            else "; save the adapter again"
        )
        raise ValueError(
            f"{directory / WEIGHTS_NAME} does not match the checksum in {CONFIG_NAME}: the weights were truncated, "
            f"modified, or a save was interrupted{hint}"
        )
    return config_from_dict(data), meta


def _first_nonfinite(state: dict[str, torch.Tensor]) -> str | None:
    """The key of the first floating tensor holding NaN or Inf (one fused check when all are finite)."""
    floats = {k: v for k, v in state.items() if v.dtype.is_floating_point}
    if all_finite(list(floats.values())):
        return None
    return next(k for k, v in floats.items() if not bool(torch.isfinite(v).all()))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the renames are still atomic


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2; False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _install(tmp: Path, directory: Path) -> None:
    """Move the finished temporary folder into place without a moment where neither adapter is whole."""
    if not directory.exists():
        os.rename(tmp, directory)
    elif not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a folder; choose another path")
    elif set(os.listdir(directory)) <= {CONFIG_NAME, WEIGHTS_NAME}:
        if _exchange(tmp, directory):
            shutil.rmtree(tmp)  # now holds the previous adapter
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.rmdir(old)
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old)
    else:
        # Other files live here (a checkpoint folder): replace our two files, weights first, with
        # the previous pair kept as hidden backups until both are in.
        backups = _keep_backups(directory)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(tmp / name, directory / name)
        _fsync_dir(directory)
        for b in backups:
            b.unlink(missing_ok=True)
    _fsync_dir(directory.parent)


def _backup_paths(directory: Path) -> tuple[Path, Path]:
    """Where a folder shared with other files keeps its previous (weights, config) during a save."""
    return directory / f".{WEIGHTS_NAME}.prev", directory / f".{CONFIG_NAME}.prev"


def _pair_consistent(weights: Path, config: Path) -> bool:
    """Whether a (weights, config) pair exists and the weights match the config's checksum."""
    try:
        return weights.is_file() and json.loads(config.read_text()).get("weights_sha256") == _sha256(weights)
    except (OSError, ValueError, AttributeError):
        return False


def _keep_backups(directory: Path) -> tuple[Path, ...]:
    """Hard-link the current whole adapter to the backup names (copy where links are refused).

    If the current pair is not whole (an earlier save was cut), backups that are whole already
    hold the last good adapter and are kept as they are.
    """
    backups = _backup_paths(directory)
    current = (directory / WEIGHTS_NAME, directory / CONFIG_NAME)
    if not _pair_consistent(*current):
        return backups if _pair_consistent(*backups) else ()
    for src, dst in zip(current, backups):
        dst.unlink(missing_ok=True)  # stale; the current pair is whole while this runs
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    _fsync_dir(directory)
    return backups


def _interrupted_save_hint(directory: Path) -> str:
    parent = directory.parent
    if parent.is_dir():
        olds = sorted(p for p in parent.glob(f".{directory.name}.old-*") if p.is_dir())
        if olds:
            return f"; an interrupted save left the previous adapter in {olds[-1]}: rename it to {directory.name}"
    return ""
