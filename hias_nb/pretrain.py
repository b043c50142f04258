"""Generic pretraining for toytown: the stand-in for ImageNet weights (not part of the paper).

Real UDA starts from a backbone whose features already carry shape (an ImageNet-initialised ResNet-101,
docs/method.md §6.1); a network trained from random weights on the game domain reads colour instead, and its
target predictions are then confidently wrong in ways self-training only reinforces. toytown therefore gives
its backbone a short supervised pretraining on a **third** generated domain, run once and cached like a
download (``hias-nb demo`` does it on first use and reports its time separately):

- images: toytown street layouts (source and target layout statistics, half each) drawn with a **random colour
  per class and per image** and the game's flat finish (`render_scene(..., "pretrain")`): never the game
  palette, never the target's photo look (its textures, shadow, haze, blur and noise);
- labels: the 7 Cityscapes *categories* (flat, construction, object, nature, sky, human, vehicle), never the
  19 classes the benchmark evaluates: road vs sidewalk, car vs truck vs bus, person vs rider, pole vs sign
  vs light and the other distinctions are learned from the source domain only, as with ImageNet features;
- only the backbone is kept (``backbone.pt``, a timm state dict that ``TrainConfig.pretrained`` loads); the
  7-way head is discarded.

The run goes through `hias_nb.runner.run_stage` like every training stage: resumable, locked, refused when its
folder holds another config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hias_nb import augment, distributed, runner
from hias_nb.config import check_ranges
from hias_nb.data.toytown import VERSION, parallel_map, render_scene
from hias_nb.models import DeepLabV2, save_checkpoint
from hias_nb.runner import RunSettings

__all__ = ["CATEGORIES", "CATEGORY_OF", "PretrainConfig", "Pretraining", "pretrain", "render_pretrain_set"]

CATEGORIES: tuple[str, ...] = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
# Cityscapes train id -> category (the Cityscapes label definition's grouping).
CATEGORY_OF = np.array([0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 6, 6, 6, 6, 6, 6], dtype=np.uint8)


@dataclass
class PretrainConfig(RunSettings):
    """Generic pretraining on the random-colour domain (``hias-nb demo`` runs it once, cached in ``out``)."""

    out: str = "data/toytown_pretrain"  # run folder; the backbone weights are ``out/backbone.pt``
    backbone: str = "resnet10t"  # must be the backbone of the stages that load it
    size: tuple[int, int] = (64, 128)  # image size (H, W): toytown's
    images: int = 1500  # rendered once into memory, seeded by (data_seed, index)
    data_seed: int = 0
    iterations: int = 400
    batch_size: int = 16
    lr: float = 2e-3  # AdamW, poly schedule with a linear warm-up, as toytown's source-only training
    weight_decay: float = 1e-4
    warmup: int = 30
    aspp_rates: tuple[int, ...] = (1, 2, 4, 6)
    photometric: float = 1.0  # the source-only photometric augmentation, on top of the random finish
    num_workers: int = 2  # rendering processes

    def validate(self) -> None:
        super().validate()
        check_ranges(self, positive=("images", "num_workers"), non_negative=("weight_decay", "warmup", "photometric"),
                     sizes=("size",))  # fmt: skip


def _render_pretrain(job: tuple[int, int, tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    seed, index, size = job
    img, label = render_scene(np.random.default_rng(np.random.SeedSequence([seed, 99, index])), "pretrain", size)
    return img, CATEGORY_OF[label]


def render_pretrain_set(
    images: int, seed: int, size: tuple[int, int], workers: int = 2, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """`images` pretraining scenes: uint8 images ``[N,3,H,W]`` and category labels ``[N,H,W]`` (int64, 0..6).
    Each is seeded by (seed, index) alone, so the set does not depend on `workers`."""
    jobs = [(int(seed), i, (int(size[0]), int(size[1]))) for i in range(images)]
    pairs = list(parallel_map(_render_pretrain, jobs, workers, "pretrain images", progress))
    x = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
    return x, y


class _TensorPairs(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i]}


class Pretraining:
    """The pretraining stage for `run_stage`: a 7-way DeepLab-v2, cross-entropy on augmented category maps."""

    postfix = ("loss",)

    def __init__(self, cfg: PretrainConfig, device: str, start: int) -> None:
        self.cfg, self.device = cfg, device
        x, y = render_pretrain_set(cfg.images, cfg.data_seed, cfg.size, cfg.num_workers, cfg.progress)
        torch.manual_seed(cfg.seed)
        self.model = DeepLabV2(cfg.backbone, num_classes=len(CATEGORIES), aspp_rates=tuple(cfg.aspp_rates))
        self.model.to(device)
        self.opt = runner.make_optimizer(self.model, "adamw", cfg.lr, 1.0, cfg.weight_decay)
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        self.scaler = runner.make_scaler(device, cfg.amp)
        self.gen = runner.rank_generator(device, cfg.seed)
        self.parts = {"model": self.model, "optimizer": self.opt, "scaler": self.scaler, "generator": self.gen}
        self.net = distributed.wrap(self.model)
        self.net.train()
        self.batches = runner.stage_batches(_TensorPairs(x, y), cfg, start, device, cfg.seed)

    def step(self, it: int) -> dict[str, float]:
        cfg, device = self.cfg, self.device
        batch = next(self.batches)
        images, labels = batch["image"].to(device), batch["label"].to(device)
        views = augment.make_views(images, labels, generator=self.gen, crop_scale=(0.6, 1.0), crop_ratio=2.0,
                                   strong=False)  # fmt: skip
        images = augment.photometric(views.weak, generator=self.gen, strength=cfg.photometric)
        lr = runner.set_lr(self.opt, self.base_lrs, runner.lr_factor(it, cfg.iterations, "poly", cfg.warmup))
        loss = runner.cross_entropy_step(self.net, self.opt, self.scaler, images, views.label, device, cfg.amp)
        return {"loss": loss, "lr": lr}

    def finish(self, out: Path, timing: dict[str, Any]) -> None:
        meta = {"backbone": self.cfg.backbone, "toytown_version": VERSION, "categories": list(CATEGORIES), **timing}
        save_checkpoint(out / "model_final.pt", self.model, meta)  # the 7-way model, for inspection
        torch.save(self.model.backbone.state_dict(), out / "backbone.tmp")
        os.replace(out / "backbone.tmp", out / "backbone.pt")  # last: its presence marks the run complete


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume, or find complete) the pretraining; returns the backbone weights file."""
    out = runner.run_stage(cfg, "pretrain", "backbone.pt", lambda device, start: Pretraining(cfg, device, start))
    return out / "backbone.pt"
