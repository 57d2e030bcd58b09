"""PNG figures with matplotlib's Agg backend (no display needed): curves, spectra, image grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def training_curves(history: dict[str, list], metric: str, path: Path, title: str = "") -> Path:
    """Training loss (raw and smoothed) and the held-out metric against the optimiser step."""
    plt = _pyplot()
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.6))
    if history["train"]:
        steps = np.array([s for s, _, _ in history["train"]])
        loss = np.array([v for _, v, _ in history["train"]])
        ax_loss.plot(steps, loss, alpha=0.3, lw=0.8, label="loss")
        window = max(1, len(loss) // 20)
        if window > 1:
            smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
            ax_loss.plot(steps[window - 1 :], smooth, lw=1.6, label=f"mean of {window}")
        ax_loss.legend()
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    points = [(s, m[metric]) for s, m in history["eval"] if metric in m]
    if points:
        ax_metric.plot(*zip(*points), marker="o")
    ax_metric.set(xlabel="step", ylabel=metric, title=f"held-out {metric}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def image_grid(images: np.ndarray, path: Path, rows: int, title: str = "", row_labels: list[str] | None = None) -> Path:
    """A grid of grayscale images in [0, 1], shape (n, H, W), ``rows`` rows, filled row-major."""
    plt = _pyplot()
    n = len(images)
    cols = int(np.ceil(n / rows))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9 + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i < n:
            ax.imshow(np.clip(images[i], 0, 1), cmap="gray", vmin=0, vmax=1)
        if row_labels and i % cols == 0 and i // cols < len(row_labels):
            ax.set_ylabel(row_labels[i // cols], rotation=0, labelpad=12, va="center")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def layer_spectra(layers: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Per-layer rotation-angle spectra (sorted, radians) and orthogonality errors, for ``inspect``.

    Each entry has ``name`` and either ``angles`` (orthogonal methods) or ``singular_values``
    (additive updates), plus optionally ``orthogonality_error``.
    """
    plt = _pyplot()
    fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
    cmap = plt.get_cmap("viridis")
    kind = "angles" if any("angles" in layer for layer in layers) else "singular_values"
    for i, layer in enumerate(layers):
        values = np.sort(np.asarray(layer.get(kind, [])))[::-1]
        if len(values):
            ax_s.plot(np.arange(1, len(values) + 1), values, color=cmap(i / max(1, len(layers) - 1)), lw=1, label=layer["name"])
    ax_s.set(xlabel="index (sorted)", ylabel="|angle| (rad)" if kind == "angles" else "singular value of dW",
             title="rotation angle spectrum" if kind == "angles" else "update spectrum", xscale="log")
    if len(layers) <= 12:
        ax_s.legend(fontsize=6)
    errors = [layer.get("orthogonality_error") for layer in layers]
    if any(e is not None for e in errors):
        ax_e.bar(range(len(layers)), [max(e or 0.0, 1e-18) for e in errors])
        ax_e.set(yscale="log", xlabel="layer", ylabel="||R^T R - I||_F / sqrt(d)", title="orthogonality error")
    else:
        ax_e.set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
