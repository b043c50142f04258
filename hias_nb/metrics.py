"""Segmentation metrics: a confusion matrix accumulated over a whole split, per-class IoU and mIoU
(docs/method.md §7.1).

Differences from the published evaluator, on purpose (docs/method.md §9.4, 11):
- a class absent from both prediction and ground truth has IoU ``None`` and is left out of the mean (the
  published code counts it as 0);
- SYNTHIA's 16/13-class means are means over the listed classes, never a rescaled 19-class mean (B22);
- predictions are never modified in place (B21).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from hias_nb.classes import IGNORE, Protocol

__all__ = ["ConfusionMatrix", "iou_per_class", "mean_iou", "iou_table"]


class ConfusionMatrix:
    """Counts ``matrix[gt, pred]`` over many batches; pixels whose ground truth is 255 are skipped.

    Args:
        num_classes: C.
    Shape:
        ``update(pred, gt)``: int tensors of equal shape (e.g. ``[B,H,W]``); values of ``pred`` in ``0..C-1``.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != ground-truth shape {tuple(gt.shape)}")
        c = self.num_classes
        valid = gt != IGNORE
        if valid.any() and int(gt[valid].max()) >= c:
            raise ValueError(f"ground truth holds class {int(gt[valid].max())} but there are only {c} classes")
        idx = gt[valid].long() * c + pred[valid].long()
        counts = torch.bincount(idx, minlength=c * c).reshape(c, c)
        self.matrix += counts.cpu().numpy()

    def merge(self, other: ConfusionMatrix | np.ndarray) -> None:
        self.matrix += other.matrix if isinstance(other, ConfusionMatrix) else other


def iou_per_class(matrix: np.ndarray) -> list[float | None]:
    """IoU of each class in percent; ``None`` where the class is in neither prediction nor ground truth."""
    inter = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + matrix.sum(1) - np.diag(matrix)
    return [None if u == 0 else 100.0 * float(i) / float(u) for i, u in zip(inter, union, strict=True)]


def mean_iou(ious: list[float | None], evaluated: tuple[int, ...] | None = None) -> float:
    """Mean over the `evaluated` classes (all by default) whose IoU is defined; NaN if none is."""
    idx = range(len(ious)) if evaluated is None else evaluated
    vals = [ious[i] for i in idx if ious[i] is not None]
    return float(np.mean(vals)) if vals else float("nan")


def iou_table(stages: dict[str, list[float | None]], protocol: Protocol) -> pd.DataFrame:
    """Per-class IoU table, one column per stage, rows = evaluated classes plus a final ``mIoU`` row."""
    rows = {protocol.classes[c]: [s[c] for s in stages.values()] for c in protocol.evaluated}
    df = pd.DataFrame.from_dict(rows, orient="index", columns=list(stages), dtype=float)
    df.loc["mIoU"] = [mean_iou(s, protocol.evaluated) for s in stages.values()]
    return df
