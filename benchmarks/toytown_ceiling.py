"""The resolution ceiling of toytown: how much of each class a stride-8 prediction can recover at all.

    python benchmarks/toytown_ceiling.py [--sizes 64x128 96x192] [--images 150] [--stride 8]

From the labels alone (no model): the one-hot target label map average-pooled by the output stride, upsampled
bilinearly (as DeepLabV2's logits are) and arg-maxed, scored against the full-resolution label. Prints mIoU and
per-class IoU per image size (docs/toytown.md, "The resolution ceiling").
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from hias_nb.classes import CITYSCAPES_CLASSES
from hias_nb.data.toytown import render_scene
from hias_nb.metrics import iou_per_class


def ceiling(size: tuple[int, int], images: int, stride: int) -> list[float | None]:
    labels = [render_scene(np.random.default_rng(1000 + i), "target", size)[1] for i in range(images)]
    y = torch.from_numpy(np.stack(labels).astype(np.int64))  # [N,H,W]
    one_hot = F.one_hot(y, 19).permute(0, 3, 1, 2).float()
    up = F.interpolate(F.avg_pool2d(one_hot, stride), size=size, mode="bilinear", align_corners=True).argmax(1)
    matrix = np.bincount((y * 19 + up).ravel().numpy(), minlength=19 * 19).reshape(19, 19)
    return iou_per_class(matrix)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["64x128", "96x192"])
    ap.add_argument("--images", type=int, default=150)
    ap.add_argument("--stride", type=int, default=8)
    args = ap.parse_args()
    for text in args.sizes:
        size = tuple(int(v) for v in text.split("x"))
        iou = ceiling(size, args.images, args.stride)
        valid = [v for v in iou if v is not None]
        per = ", ".join(f"{n} {v:.0f}" for n, v in zip(CITYSCAPES_CLASSES, iou, strict=True) if v is not None)
        print(f"{text}: ceiling mIoU {sum(valid) / len(valid):.1f}  ({per})")


if __name__ == "__main__":
    main()
