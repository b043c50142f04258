"""Generic pretraining (the random-colour domain, category labels, the cached backbone)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hias_nb.classes import CITYSCAPES_CLASSES
from hias_nb.data.toytown import GAME_PALETTE, render_scene
from hias_nb.errors import InputError
from hias_nb.models import DeepLabV2, describe_init
from hias_nb.pretrain import CATEGORIES, CATEGORY_OF, PretrainConfig, pretrain, render_pretrain_set

# The Cityscapes label definition's categories, written out by name (independent of CATEGORY_OF's array).
_BY_NAME = {
    "flat": ("road", "sidewalk"),
    "construction": ("building", "wall", "fence"),
    "object": ("pole", "traffic light", "traffic sign"),
    "nature": ("vegetation", "terrain"),
    "sky": ("sky",),
    "human": ("person", "rider"),
    "vehicle": ("car", "truck", "bus", "train", "motorcycle", "bicycle"),
}


def test_categories_follow_the_cityscapes_grouping():
    for cat, names in _BY_NAME.items():
        for name in names:
            assert CATEGORIES[CATEGORY_OF[CITYSCAPES_CLASSES.index(name)]] == cat, name
    assert sum(len(v) for v in _BY_NAME.values()) == 19 == len(CATEGORY_OF)


def test_pretrain_domain_draws_random_class_colours_on_the_same_layouts():
    road_means = []
    for i in range(12):
        img, label = render_scene(np.random.default_rng(i), "pretrain", (48, 96))
        assert set(np.unique(label).tolist()) <= set(range(19))
        road_means.append(img[label == 0].astype(float).mean(0))
    road_means = np.array(road_means)
    # the game road is one dark blue-grey; here every image draws its own road colour
    assert road_means.std(0).mean() > 30
    assert np.abs(road_means - GAME_PALETTE[0]).max(1).mean() > 40


def test_render_pretrain_set_is_seeded_per_image_and_labels_are_categories():
    x1, y1 = render_pretrain_set(6, seed=3, size=(32, 64), workers=1, progress=False)
    x2, y2 = render_pretrain_set(6, seed=3, size=(32, 64), workers=2, progress=False)
    assert x1.shape == (6, 3, 32, 64) and x1.dtype == torch.uint8 and y1.shape == (6, 32, 64)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)  # independent of the number of workers
    assert int(y1.max()) < len(CATEGORIES) and int(y1.min()) >= 0
    x3, _ = render_pretrain_set(6, seed=4, size=(32, 64), workers=1, progress=False)
    assert not torch.equal(x1, x3)


def test_pretrain_writes_a_backbone_the_stages_load_and_is_cached(tmp_path, capsys):
    cfg = PretrainConfig(out=str(tmp_path / "pt"), size=(32, 64), images=6, iterations=2, batch_size=2, warmup=1,
                         num_workers=1, progress=False, device="cpu")  # fmt: skip
    path = pretrain(cfg)
    assert path == tmp_path / "pt" / "backbone.pt"
    model = DeepLabV2("resnet10t", num_classes=19, aspp_rates=(1, 2), pretrained=str(path))
    assert "loaded 70/70" in describe_init(model)
    state = torch.load(path, map_location="cpu")
    assert torch.equal(model.backbone.conv1[0].weight, state["conv1.0.weight"])
    mtime = path.stat().st_mtime_ns
    capsys.readouterr()
    assert pretrain(cfg) == path and path.stat().st_mtime_ns == mtime  # cached: nothing re-run
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(InputError, match="config"):
        pretrain(dataclasses.replace(cfg, lr=1e-3))  # another config never mixes into this folder
