from __future__ import annotations

import math

import numpy as np
import torch

from hias_nb.classes import get_protocol
from hias_nb.metrics import ConfusionMatrix, iou_per_class, iou_table, mean_iou


def test_confusion_and_iou_hand_computed():
    gt = torch.tensor([[0, 0, 1, 1, 255, 2]])
    pred = torch.tensor([[0, 1, 1, 1, 2, 1]])
    cm = ConfusionMatrix(4)
    cm.update(pred, gt)
    # class 0: I=1, U=2 ; class 1: I=2, U=4 ; class 2: I=0, U=1 (in GT only) ; class 3: absent -> None
    ious = iou_per_class(cm.matrix)
    assert ious[0] == 50.0 and ious[1] == 50.0 and ious[2] == 0.0 and ious[3] is None
    assert mean_iou(ious) == (50 + 50 + 0) / 3
    # the 255 pixel predicted as 2 is not counted anywhere
    assert cm.matrix.sum() == 5


def test_accumulates_over_batches_equals_one_shot():
    rng = np.random.default_rng(0)
    gt = torch.from_numpy(rng.integers(0, 5, (4, 8, 8)))
    gt[0, :2] = 255
    pred = torch.from_numpy(rng.integers(0, 5, (4, 8, 8)))
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(pred, gt)
    for i in range(4):
        b.update(pred[i], gt[i])
    np.testing.assert_array_equal(a.matrix, b.matrix)


def test_synthia_means_over_listed_classes_not_rescaled():
    ious = [50.0] * 19
    for c in (9, 14, 16):
        ious[c] = 80.0  # predicted classes SYNTHIA does not evaluate must not inflate the mean (B22)
    p16 = get_protocol("synthia16")
    assert mean_iou(ious, p16.evaluated) == 50.0
    assert len(p16.evaluated) == 16 and len(get_protocol("synthia13").evaluated) == 13
    df = iou_table({"a": ious}, p16)
    assert list(df.index)[-1] == "mIoU" and df.loc["mIoU", "a"] == 50.0 and "terrain" not in df.index


def test_mean_of_nothing_is_nan():
    assert math.isnan(mean_iou([None, None]))
