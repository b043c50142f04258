"""Figures (matplotlib object API only: importable and usable without a display; no `matplotlib.use`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from hias_nb.classes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, colorize
from hias_nb.errors import InputError
from hias_nb.io import read_label, read_rgb

__all__ = ["overlay", "toytown_grid"]


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5, palette: np.ndarray = CITYSCAPES_PALETTE):
    """Blend a label map `[H,W]` (class colours; ignored pixels stay unblended) over an image `[H,W,3]`."""
    colours = colorize(label, palette).astype(np.float32)
    keep = (np.asarray(label) < len(palette))[..., None]
    out = np.where(keep, (1 - alpha) * image.astype(np.float32) + alpha * colours, image.astype(np.float32))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def toytown_grid(root: str | os.PathLike, n: int = 4, split: str = "train") -> Figure:
    """`n` rows of toytown samples: source image, its label overlay, target image, its label overlay.

    Reads `root/{source,target}/{split}/{images,labels}/*.png` (the first `n` of each); shows the class-colour
    legend of the 19 classes below the grid.
    """
    root = Path(root)
    rows = []
    for domain in ("source", "target"):
        folder = root / domain / split
        names = sorted(p.name for p in (folder / "images").glob("*.png"))[:n]
        if len(names) < n:
            raise InputError(f"{folder / 'images'}: expected at least {n} toytown images, found {len(names)}")
        rows.append([(read_rgb(folder / "images" / k), read_label(folder / "labels" / k)) for k in names])
    h, w = rows[0][0][0].shape[:2]
    fig = Figure(figsize=(4 * 2.2 * w / h * 0.55, n * 1.2 + 1.1), dpi=100, layout="constrained")
    axes = fig.subplots(n, 4, squeeze=False)
    titles = ("source (game-like)", "source labels", "target (photo-like)", "target labels")
    for r in range(n):
        for c, (domain_rows, show_label) in enumerate(((rows[0], False), (rows[0], True), (rows[1], False),
                                                       (rows[1], True))):  # fmt: skip
            image, label = domain_rows[r]
            ax = axes[r, c]
            ax.imshow(overlay(image, label, 0.6) if show_label else image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
    handles = [Patch(facecolor=CITYSCAPES_PALETTE[k] / 255.0, label=name) for k, name in enumerate(CITYSCAPES_CLASSES)]
    fig.legend(handles=handles, loc="outside lower center", ncol=7, fontsize=7, frameon=False)
    fig.suptitle(f"toytown samples ({root.name}, {split})", fontsize=10)
    return fig
