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

__all__ = ["overlay", "toytown_grid", "stage_iou_bars"]


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


def stage_iou_bars(report: dict, stages: list[str] | None = None) -> Figure:
    """Grouped bars of per-class IoU, one bar per stage of a ``report.json`` (CONTRACT.md), mIoU in the legend.

    Bars of a class absent from both prediction and ground truth (IoU ``None``) are left empty.
    """
    entries = [s for s in report["stages"] if stages is None or s["name"] in stages]
    classes = report["classes"]
    fig = Figure(figsize=(max(8, 0.55 * len(classes)), 4.2))
    ax = fig.subplots()
    width = 0.8 / max(len(entries), 1)
    x = np.arange(len(classes))
    for i, s in enumerate(entries):
        vals = [np.nan if s["per_class"][c] is None else s["per_class"][c] for c in classes]
        ax.bar(x + (i - (len(entries) - 1) / 2) * width, vals, width, label=f"{s['name']} ({s['miou']:.1f})")
    ax.set_xticks(x, classes, rotation=60, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Per-class IoU on the target validation split ({report['protocol']}); mIoU in brackets")
    ax.legend(fontsize=8, ncols=min(len(entries), 4), loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
