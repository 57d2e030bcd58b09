"""``orthotune inspect``: what a saved adapter holds, without its base model.

Each adapted layer's method module is rebuilt from the config and the stored target shape
(``adapter_config.json``'s ``targets``) on a zero stand-in weight, then loaded with the saved
tensors. Orthogonal methods report the eigen-angles of their rotation ``R`` (``|arg lambda|`` of
its eigenvalues: a rotation by theta in a plane gives the pair +-theta) and the orthogonality error
``||R^T R - I||_F / sqrt(d)``; additive methods report the singular values of their update ``dW``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..methods.registry import method_class
from ..model.io import SAVED_PREFIX, WEIGHTS_NAME, read_config
from .plots import layer_spectra

ANGLE_TOL = 1e-6


@torch.no_grad()
def layer_report(module: torch.nn.Module) -> dict[str, Any]:
    """Parameter count and spectrum of one method module (float64 eigen-analysis)."""
    report: dict[str, Any] = {"parameters": sum(p.numel() for p in module.parameters())}
    rotation = module.rotation() if module.multiplicative else None
    if rotation is None and module.multiplicative:
        rotation = module.merged_weight(torch.eye(module.d_in))
    if rotation is not None:
        R = rotation.double()
        eye = torch.eye(R.shape[0], dtype=R.dtype)
        angles = torch.linalg.eigvals(R).angle().abs()
        report.update({
            "angles": sorted(angles.tolist(), reverse=True),
            "max_angle": float(angles.max()),
            "rotated_dims": int((angles > ANGLE_TOL).sum()),
            "orthogonality_error": float(torch.linalg.matrix_norm(R.T @ R - eye) / R.shape[0] ** 0.5),
            "distance_from_identity": float(torch.linalg.matrix_norm(R - eye)),
        })
    else:
        dW = module.merged_weight(torch.zeros(module.d_out, module.d_in)).double()
        s = torch.linalg.svdvals(dW)
        report.update({
            "singular_values": s.tolist(),
            "update_norm": float(torch.linalg.matrix_norm(dW)),
            "update_rank": int((s > s.max() * 1e-6).sum()) if s.numel() and s.max() > 0 else 0,
        })
    report.update({k: v for k, v in module.diagnostics().items() if isinstance(v, (int, float))})
    return report


def inspect_adapter(directory: str | Path) -> dict[str, Any]:
    """Config, exact parameter counts and per-layer spectra of the adapter folder ``directory``."""
    directory = Path(directory)
    config, meta = read_config(directory)
    state = load_file(str(directory / WEIGHTS_NAME))
    cls = method_class(config)
    layers: list[dict[str, Any]] = []
    for lname, (d_out, d_in, kind) in meta["targets"].items():
        module = cls(config, d_in, d_out, torch.zeros(d_out, d_in))
        keys = module.state_dict().keys()
        missing = [k for k in keys if f"{lname}.{k}" not in state]
        if missing:
            raise ValueError(f"{directory / WEIGHTS_NAME} lacks {lname}.{missing[0]}: the folder is incomplete; save the adapter again")
        module.load_state_dict({k: state[f"{lname}.{k}"].float() for k in keys})
        layers.append({"name": lname, "shape": [d_out, d_in], "kind": kind, **layer_report(module.eval())})
    saved = sum(v.numel() for k, v in state.items() if k.startswith(SAVED_PREFIX))
    adapter = sum(layer["parameters"] for layer in layers)
    return {
        "method": config.method, "config": config.to_dict(), "base_model_class": meta["base_model_class"],
        "base_model_name_or_path": meta["base_model_name_or_path"], "layers": layers,
        "parameters": {"adapter": adapter, "modules_to_save": saved, "total": adapter + saved},
    }


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """``inspect.json`` and ``inspect.png`` (spectra and orthogonality errors) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "inspect.json").write_text(json.dumps(report, indent=2) + "\n")
    png = layer_spectra(report["layers"], out / "inspect.png", title=f"{report['method']} adapter, {len(report['layers'])} layers")
    return [out / "inspect.json", png]


def summary(report: dict[str, Any]) -> str:
    """A plain-text table of the report."""
    p = report["parameters"]
    lines = [f"method: {report['method']}   base: {report['base_model_class']} ({report['base_model_name_or_path']})",
             "config: " + json.dumps({k: v for k, v in report["config"].items() if v is not None}, sort_keys=True),
             f"parameters: {p['adapter']:,} in adapters + {p['modules_to_save']:,} in modules_to_save = {p['total']:,}"]
    rotation = any("angles" in layer for layer in report["layers"])
    header = f"{'layer':48s} {'shape':>11s} {'params':>8s} " + (
        f"{'max angle':>9s} {'rot. dims':>9s} {'orth. err':>9s}" if rotation else f"{'||dW||':>9s} {'rank':>5s}")
    lines.append(header)
    for layer in report["layers"]:
        shape = "x".join(map(str, layer["shape"]))
        row = f"{layer['name'][-48:]:48s} {shape:>11s} {layer['parameters']:>8,d} "
        if "angles" in layer:
            row += f"{layer['max_angle']:9.4f} {layer['rotated_dims']:9d} {layer['orthogonality_error']:9.1e}"
        else:
            row += f"{layer['update_norm']:9.4f} {layer['update_rank']:5d}"
        lines.append(row)
    return "\n".join(lines)
