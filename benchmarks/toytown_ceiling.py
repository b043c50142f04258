"""The resolution ceiling of toytown: how much of each class a stride-8 prediction can recover at all.

    python benchmarks/toytown_ceiling.py [--sizes 64x128 96x192] [--images 150] [--stride 8] [--grow 1 2]

From the labels alone (no model): the one-hot target label map average-pooled by the output stride, upsampled
bilinearly (as DeepLabV2's logits are) and arg-maxed, scored against the full-resolution label. Prints mIoU and
per-class IoU per image size (docs/toytown.md, "The resolution ceiling").

``--grow K``: also the mIoU of the true labels with every thing (the object, human and vehicle classes: pole to
bicycle, not the flat, construction, nature and sky ones) grown by K px into the background around it — what a
self-training round that dilates things by K px costs at that size (docs/toytown.md, "Which errors make the
drift").
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from hias_nb.classes import CITYSCAPES_CLASSES
from hias_nb.data.toytown import render_scene
from hias_nb.metrics import iou_per_class

THINGS = (5, 6, 7, 11, 12, 13, 14, 15, 16, 17, 18)  # pole, light, sign, person, rider, car ... bicycle


def grow_things(label: np.ndarray, k: int) -> np.ndarray:
    """``[H,W]`` train ids with every background pixel within `k` px (Chebyshev) of a thing relabelled as that
    thing (things in `THINGS` order where two reach one pixel); things themselves are never overwritten."""
    out = label.copy()
    background = ~np.isin(label, THINGS)
    for c in THINGS:
        mask = torch.from_numpy(label == c).float()[None, None]
        near = F.max_pool2d(mask, 2 * k + 1, 1, k)[0, 0].numpy() > 0
        take = near & background
        out[take] = c
        background &= ~take
    return out


def target_labels(size: tuple[int, int], images: int) -> np.ndarray:
    """``[N,H,W]`` int64: the labels of target scenes 1000 .. 1000 + images - 1 at `size`."""
    return np.stack([render_scene(np.random.default_rng(1000 + i), "target", size)[1] for i in range(images)])


def grown_miou(labels: np.ndarray, k: int) -> float:
    """mIoU of `labels` ``[N,H,W]`` grown by `k` px (`grow_things`) against themselves."""
    matrix = np.zeros((19, 19), dtype=np.int64)
    for y in labels.astype(np.int64):
        matrix += np.bincount((y * 19 + grow_things(y, k)).ravel(), minlength=19 * 19).reshape(19, 19)
    valid = [v for v in iou_per_class(matrix) if v is not None]
    return sum(valid) / len(valid)


def ceiling(labels: np.ndarray, stride: int) -> list[float | None]:
    """Per-class IoU of `labels` ``[N,H,W]`` average-pooled by `stride`, upsampled and arg-maxed."""
    size = tuple(labels.shape[-2:])
    y = torch.from_numpy(labels.astype(np.int64))  # [N,H,W]
    one_hot = F.one_hot(y, 19).permute(0, 3, 1, 2).float()
    up = F.interpolate(F.avg_pool2d(one_hot, stride), size=size, mode="bilinear", align_corners=True).argmax(1)
    matrix = np.bincount((y * 19 + up).ravel().numpy(), minlength=19 * 19).reshape(19, 19)
    return iou_per_class(matrix)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["64x128", "96x192"])
    ap.add_argument("--images", type=int, default=150)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--grow", type=int, nargs="*", default=[], help="px: also the mIoU after things grow this much")
    args = ap.parse_args()
    for text in args.sizes:
        size = tuple(int(v) for v in text.split("x"))
        labels = target_labels(size, args.images)  # drawn once for the ceiling and every growth
        iou = ceiling(labels, args.stride)
        valid = [v for v in iou if v is not None]
        per = ", ".join(f"{n} {v:.0f}" for n, v in zip(CITYSCAPES_CLASSES, iou, strict=True) if v is not None)
        print(f"{text}: ceiling mIoU {sum(valid) / len(valid):.1f}  ({per})")
        for k in args.grow:
            print(f"{text}: every thing grown by {k} px: mIoU {grown_miou(labels, k):.1f}")


if __name__ == "__main__":
    main()
