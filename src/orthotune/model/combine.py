"""``add_weighted_adapter``: a new adapter made from weighted existing ones (peft's LoraModel API).

Each method family combines what its parameterisation can represent exactly (docs/adapters.md,
"Combining adapters", has the math):

* low-rank updates (LoRA, PiSSA): peft 0.21's combination types, computed as peft computes them.
  A PiSSA adapter enters as the LoRA factors of its update ``s (B A - B0 A0)``; the result is a LoRA
  adapter (scale 1: ``lora_alpha = r``).
* sparse spectra (FourierFT, LoCA): ``linear`` sums the weighted coefficients where every adapter
  uses the same cells; ``cat`` concatenates the cells and weighted coefficients (``n`` adds up).
* rotations (LoCO, OFT, BOFT, HRA, GOFT, PSOFT, LOFT): ``linear`` is the weighted sum of the
  skew generators (Cayley / exponential / Givens angles), an exactly orthogonal result, ``R^w`` for
  one exponential adapter; ``cat`` is the product ``R_1^{w_1} R_2^{w_2} ...`` where the
  parameterisation is itself a product (LoCO and LOFT "exp" chains, Householder reflections).

A layer that only some of the adapters adapt combines the ones there (the others count as the
identity). The new adapter is added inactive, as in peft.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..methods.config import AdapterConfig
from ..methods.lora import LoRAConfig
from ..methods.registry import method_class
from .inject import build_method
from .merge_utils import MERGES, SignMethod, merge

if TYPE_CHECKING:
    from ..layer.adapter_layer import AdapterLayer
    from .adapter_model import AdapterModel

LOWRANK_TYPES = tuple(["svd", "linear", "cat", *(t for t in MERGES if t not in ("svd", "linear"))])
LOWRANK = ("lora", "pissa")
SPECTRA = {"fourierft": "scaling", "loca": "scale"}  # method -> the config field scaling its coefficients
#: Factors of exponential chains (LoCO, LOFT "exp"): (links, d, rank) with ``S = U V^T - V U^T`` per link.
EXP_U, EXP_V = ("U", "transform.U"), ("V", "transform.V")
#: Householder vectors (HRA, LOFT "householder"): (d, reflections), ``R = H_1 H_2 ...``.
REFLECTIONS = ("transform.u",)
#: Scales beside the rotation (BOFT's, PSOFT's magnitudes): combined as ``1 + sum_i w_i (s_i - 1)``.
SCALES = ("boft_s", "transform.vector_a", "transform.vector_b")
#: The config field that counts what ``cat`` (chain links, reflections) or ``linear`` (LoCO's generator rank) adds up.
SIZE_FIELDS = {
    ("loco", "cat"): "chain_length", ("loco", "linear"): "rank", ("hra", "cat"): "r",
    ("exp", "cat"): "chain_length", ("exp", "linear"): "generator_rank", ("householder", "cat"): "reflections",
}  # fmt: skip


def add_weighted_adapter(
    model: AdapterModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str | None = None,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: SignMethod = "total",
) -> None:
    """Add ``adapter_name``, the ``combination_type`` combination of ``adapters`` with ``weights`` (peft's arguments).

    ``combination_type=None`` takes the family's default: peft's ``"svd"`` for low-rank updates, ``"cat"`` for sparse
    spectra (exact whatever the cells), and the first type the rotation's parameterisation supports (``"linear"``, or
    ``"cat"`` for Householder products).
    """
    adapters, weights = list(adapters), [float(w) for w in weights]
    model._check_new_name(adapter_name)
    method = _check_inputs(model, adapters, weights)
    if len(adapters) == 1:
        combination_type = "linear"  # peft: one adapter can only be scaled
    configs = [model.configs[a] for a in adapters]
    kind = _kind(method)
    allowed = _allowed(kind, configs)
    if combination_type is None:
        combination_type = {"lowrank": "svd", "spectrum": "cat"}.get(kind, allowed[0] if allowed else "linear")
    if combination_type not in allowed:
        raise ValueError(
            f"combination_type={combination_type!r} is not supported for {method!r} adapters; supported: {list(allowed)} "
            f"(docs/adapters.md, 'Combining adapters', says why)"
        )
    if combination_type in MERGES and combination_type not in ("linear", "svd") and density is None:
        raise ValueError(f"combination_type={combination_type!r} prunes: pass density (the share of entries kept, in [0, 1])")
    layers = [(n, layer) for n, layer in model.adapter_layers() if any(a in layer.adapters for a in adapters)]
    if kind == "lowrank":
        ranks = [c.r * (2 if c.method == "pissa" else 1) for c in configs]  # PiSSA's update has rank 2r
        rank = _lowrank_rank(combination_type, ranks, svd_rank)
        combine = _lowrank(combination_type, weights, rank, svd_clamp, svd_full_matrices, svd_driver, density, majority_sign_method)
    elif kind == "spectrum":
        combine = _spectrum(combination_type, weights, SPECTRA[method])
    else:
        combine = _rotation(combination_type, weights)
    states, size = {}, 0
    for lname, layer in layers:  # the size is the same on every layer: absent adapters count with their own size
        states[lname], size = combine(lname, layer, [layer.adapters[a] if a in layer.adapters else None for a in adapters])
    config = _config(kind, combination_type, method, configs, [n for n, _ in layers], size)
    modules = {}
    for lname, layer in layers:
        try:
            method_class(config).check_layer(config, layer.d_in, layer.d_out, lname)
        except ValueError as err:
            raise ValueError(f"the {combination_type!r} combination does not fit layer {lname!r}: {err}") from err
        module = _build(config, layer)
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in states[lname].items()})
        modules[lname] = module
    model._attach(adapter_name, config, modules, [])


def _check_inputs(model: AdapterModel, adapters: list[str], weights: list[float]) -> str:
    """The one method of ``adapters``; every input problem raises before anything changes."""
    if not adapters:
        raise ValueError("adapters is empty: name the adapters to combine")
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(weights)} weights for {len(adapters)} adapters: pass one weight per adapter")
    unknown = [a for a in adapters if a not in model.configs]
    if unknown:
        raise ValueError(f"Adapter(s) {unknown} do not exist; adapters here: {sorted(model.configs)}")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"adapter names repeat in {adapters}: give each adapter once, with its total weight")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights}")
    methods = sorted({model.configs[a].method for a in adapters})
    if len(methods) > 1:
        raise ValueError(
            f"cannot combine adapters of different methods {methods}: their updates live in different "
            "parameterisations (an additive update and a rotation have no common form); combine one method at a time"
        )
    saved = [a for a in adapters if model.configs[a].modules_to_save]
    if saved:
        raise ValueError(
            f"adapter(s) {saved} train modules in full (modules_to_save): add_weighted_adapter combines adapter layers "
            "only and cannot combine fully trained copies; combine adapters without modules_to_save"
        )
    patterned = [a for a in adapters if any(getattr(model.configs[a], f) for f in model.configs[a].patterns)]
    if patterned:
        raise ValueError(
            f"adapter(s) {patterned} set per-module sizes ({sorted(model.configs[patterned[0]].patterns)}): the combined "
            "sizes differ per layer and one combined config cannot state them; combine adapters without patterns"
        )
    if model.merged:
        raise ValueError("the model has merged adapters: call unmerge() before add_weighted_adapter (new adapters are built on W0)")
    return methods[0]


def _kind(method: str) -> str:
    if method in LOWRANK:
        return "lowrank"
    if method in SPECTRA:
        return "spectrum"
    return "rotation"


def _allowed(kind: str, configs: list[AdapterConfig]) -> tuple[str, ...]:
    """The combination types a method supports; rotations depend on the parameterisation."""
    if kind == "lowrank":
        return LOWRANK_TYPES
    if kind == "spectrum":
        return ("linear", "cat")
    c = configs[0]
    householder = c.method == "hra" or (c.method == "loft" and c.transform == "householder")
    if householder:
        if any(getattr(x, "apply_GS", False) for x in configs):
            return ()  # Gram-Schmidt mixes the reflections of the product: no combination is exact
        return ("cat",)  # reflections have no generator to add or scale
    if c.method == "psoft" and not c.psoft_orth:
        return ()  # a free r x r matrix is no rotation
    # an exact chain is a product, so chains concatenate; LoCO's "approx" is exp(S_1 + ... + S_k), no product
    exp_chain = (c.method == "loco" and c.mode != "approx") or (c.method == "loft" and c.transform == "exp")
    return ("linear", "cat") if exp_chain else ("linear",)


# ---------------------------------------------------------------------- low-rank updates
def _factors(module: nn.Module) -> tuple[Tensor, Tensor, float]:
    """``(A, B, s)`` with the module's update ``s B A`` (PiSSA: the factors of ``s (B A - B0 A0)``)."""
    if hasattr(module, "factors"):
        left, right = module.factors()
        return left.detach(), right.detach(), module.scaling
    return module.lora_A.detach(), module.lora_B.detach(), module.scaling


def _lowrank(ctype: str, weights: list[float], rank: int, clamp: float | None, full: bool, driver: str | None,
             density: float | None, sign: SignMethod) -> Callable:  # fmt: skip
    """peft's LoraModel.add_weighted_adapter for one layer: returns ``({lora_A, lora_B}, rank)``."""

    def combine(lname: str, layer: AdapterLayer, present: list[nn.Module | None]) -> tuple[dict[str, Tensor], int]:
        here = [(_factors(m), w) for m, w in zip(present, weights) if m is not None]
        if ctype == "cat":  # peft: the present adapters' factors first, zeros after
            A = torch.cat([A * (w * s) for (A, _, s), w in here])
            B = torch.cat([B for (_, B, _), _ in here], dim=1)
            return {"lora_A": _pad(A, rank, 0), "lora_B": _pad(B, rank, 1)}, rank
        if ctype.endswith("svd"):
            deltas = [(B @ A) * s for (A, B, s), _ in here]  # peft's get_delta_weight, in the adapters' dtype
            if rank > min(deltas[0].shape):
                raise ValueError(f"svd_rank={rank} exceeds min(d_out, d_in)={min(deltas[0].shape)} of {lname!r}; lower svd_rank")
            flip = layer.kind == "conv1d"  # peft merges a Conv1D's delta as stored (d_in, d_out): DARE's masks follow it
            deltas = [d.T for d in deltas] if flip else deltas
            delta = merge(ctype, deltas, torch.tensor([w for _, w in here]).to(deltas[0].device), density, sign)
            delta = delta.T if flip else delta
            U, S, Vh = torch.linalg.svd(delta, full_matrices=full, driver=driver)
            U, Vh = U[:, :rank] @ torch.diag(S[:rank]), Vh[:rank, :]
            if clamp is not None:
                hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
                U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
            return {"lora_A": Vh, "lora_B": U}, rank
        scales = [w * s for (_, _, s), w in here]
        wA = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in scales]).to(here[0][0][0].device)
        wB = torch.tensor([math.sqrt(abs(x)) for x in scales]).to(here[0][0][0].device)
        A = merge(ctype, [A for (A, _, _), _ in here], wA, density, sign)
        B = merge(ctype, [B for (_, B, _), _ in here], wB, density, sign)
        return {"lora_A": A, "lora_B": B}, rank

    return combine


def _lowrank_rank(ctype: str, ranks: list[int], svd_rank: int | None) -> int:
    """peft's rank of the result: the common rank (linear family), the sum (cat) or svd_rank / the largest (svd)."""
    if ctype == "cat":
        return sum(ranks)
    if ctype.endswith("svd"):
        return svd_rank or max(ranks)
    if len(set(ranks)) > 1:
        raise ValueError(
            f"combination_type={ctype!r} adds factors entry by entry, so every adapter needs the same rank, got {ranks} "
            "(a PiSSA adapter's factors have rank 2r): use 'cat' or an '_svd' type"
        )
    return ranks[0]


def _pad(t: Tensor, size: int, dim: int) -> Tensor:
    """``t`` zero-padded along ``dim`` to ``size``."""
    shape = list(t.shape)
    shape[dim] = size - shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


# ---------------------------------------------------------------------- sparse spectra
def _spectrum(ctype: str, weights: list[float], scale_field: str) -> Callable:
    """Weighted coefficients, rescaled to the first adapter's scale; same cells (linear) or all cells (cat)."""

    def combine(lname: str, layer: AdapterLayer, present: list[nn.Module | None]) -> tuple[dict[str, Tensor], int]:
        ref = next(m for m in present if m is not None)
        scale0 = getattr(ref.config, scale_field)
        if scale0 == 0:
            raise ValueError(f"the first adapter's {scale_field} is 0: its coefficients cannot carry the others'")
        if ctype == "cat":
            parts = [m if m is not None else _identity(layer, ref) for m in present]
            cells = torch.cat([m.locations for m in parts], dim=1)
            c = torch.cat([m.spectrum.detach() * (w * getattr(m.config, scale_field) / scale0) for m, w in zip(parts, weights)])
            return {"spectrum": c, "locations": cells}, c.shape[0]
        here = [(m, w) for m, w in zip(present, weights) if m is not None]
        if any(not torch.equal(m.locations, ref.locations) for m, _ in here):
            raise ValueError(
                f"the adapters use different spectrum cells on layer {lname!r}: 'linear' adds coefficients cell by cell; "
                "use combination_type='cat' (all cells, n_frequency adds up)"
            )
        c = sum(m.spectrum.detach() * (w * getattr(m.config, scale_field) / scale0) for m, w in here)
        return {"spectrum": c, "locations": ref.locations}, c.shape[0]

    return combine


# ---------------------------------------------------------------------- rotations
def _rotation(ctype: str, weights: list[float]) -> Callable:
    """Weighted generators (linear) or the product of the rotations in the order given (cat)."""

    def combine(lname: str, layer: AdapterLayer, present: list[nn.Module | None]) -> tuple[dict[str, Tensor], int]:
        ref = next(m for m in present if m is not None)
        parts = [m if m is not None else _identity(layer, ref) for m in present]
        states = [{k: v.detach() for k, v in m.state_dict().items()} for m in parts]
        params = {k for k, _ in ref.named_parameters()}
        _check_same_structure(lname, ctype, states, params)
        out, size = {}, 0
        for k, first in states[0].items():
            values = [s[k] for s in states]
            if k not in params:  # the support, shared
                out[k] = first
            elif k in EXP_U + EXP_V:
                scaled = [v * w if k in EXP_U else v for v, w in zip(values, weights)]
                # cat: links one after another (exp(w S) = R^w per link); linear: sum_i w_i S_i = [w U][V]^T - [V][w U]^T
                out[k] = torch.cat(scaled, dim=0 if ctype == "cat" else -1)
                size = out[k].shape[0 if ctype == "cat" else -1]
            elif k in REFLECTIONS:  # cat only: R_1 R_2 = H_11 .. H_1k H_21 .. H_2k
                if any(w != 1 for w in weights):
                    raise ValueError(
                        f"weights {weights}: a product of Householder reflections has no generator to scale, so 'cat' "
                        "needs every weight to be 1"
                    )
                out[k] = torch.cat(values, dim=-1)
                size = out[k].shape[-1]
            elif k in SCALES:
                out[k] = 1 + sum(w * (v - 1) for v, w in zip(values, weights))
            else:  # the generator is linear in these parameters (skew entries, Givens angles)
                out[k] = sum(w * v for v, w in zip(values, weights))
        return out, size

    return combine


def _check_same_structure(lname: str, ctype: str, states: list[dict[str, Tensor]], params: set[str]) -> None:
    """One support and one parameter shape (but the axis that ``cat`` / LoCO's ``linear`` concatenates)."""
    for k, first in states[0].items():
        if k not in params:
            if any(not torch.equal(s[k], first) for s in states):
                raise ValueError(
                    f"the adapters rotate different supports ({k!r}) on layer {lname!r}: a combined rotation needs one "
                    "support; build the adapters with the same support (e.g. support='principal' on the same weights)"
                )
            continue
        free = 0 if (ctype == "cat" and k in EXP_U + EXP_V) else -1 if (k in REFLECTIONS or k in EXP_U + EXP_V) else None
        shapes = {tuple(d for i, d in enumerate(s[k].shape) if free is None or i != free % s[k].dim()) for s in states}
        if len(shapes) > 1:
            raise ValueError(
                f"the adapters' {k!r} have different shapes on layer {lname!r}: the combined rotation needs one "
                "structure (same block sizes; same ranks to chain, same chain lengths to add generators)"
            )


# ---------------------------------------------------------------------- building the result
def _identity(layer: AdapterLayer, like: nn.Module) -> nn.Module:
    """A fresh identity adapter shaped like ``like`` on ``layer`` (stands in where an adapter is absent)."""
    return _build(dataclasses.replace(like.config, init_identity=True), layer)


def _build(config: AdapterConfig, layer: AdapterLayer) -> nn.Module:
    return build_method(config, layer.base_layer, "")  # no per-module patterns: _check_inputs refuses them


def _config(kind: str, ctype: str, method: str, configs: list[AdapterConfig], targets: list[str], size: int) -> AdapterConfig:
    """The combined adapter's config: the first adapter's, targeting exactly the combined layers, its size updated."""
    first = configs[0]
    common = {"target_modules": targets, "exclude_modules": None, "modules_to_save": None}
    if kind == "lowrank":
        fields = {f.name for f in dataclasses.fields(LoRAConfig)}
        base = {k: v for k, v in dataclasses.asdict(first).items() if k in fields}
        return LoRAConfig(**{**base, **common, "r": size, "lora_alpha": float(size), "use_rslora": False})
    if kind == "spectrum":
        return first.replace(**common, n_frequency=size)
    changes: dict = dict(common)
    field = SIZE_FIELDS.get((method, ctype)) or SIZE_FIELDS.get((getattr(first, "transform", None), ctype))
    if field is not None:
        changes[field] = size
    if ctype == "cat":
        changes["init_identity"] = False  # the parameters are given; an odd number of reflections is no identity start
    return first.replace(**changes)
