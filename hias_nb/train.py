"""Source-only (and oracle) training, BatchNorm re-estimation (AdaBN), and the EMA (mean-teacher) update.

One iteration (`SourceTraining.step`): labelled batch → weak view (flip + random-sized crop, docs/method.md §5.5)
→ photometric augmentation (so the source model's BatchNorm statistics do not encode the source palette,
docs/toytown.md) → model → cross-entropy → optimiser step. Optimiser and schedule follow docs/method.md §6.3
(head at ``head_lr_mult`` × the backbone's learning rate); the defaults are the toytown CPU settings. Folders,
resumption, logging and checkpoints are the shared `hias_nb.runner.run_stage`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from hias_nb import augment, distributed, runner
from hias_nb.config import check_ranges
from hias_nb.data import SegDataset
from hias_nb.errors import InputError
from hias_nb.models import (
    DeepLabV2,
    checkpoint_architecture,
    describe_init,
    freeze_bn,
    load_checkpoint,
    load_complete,
    save_checkpoint,
)
from hias_nb.runner import RunSettings

__all__ = ["TrainConfig", "SourceTraining", "train_source", "build_model", "recalibrate_bn", "ema_update", "load_model"]


@dataclass
class TrainConfig(RunSettings):
    """Source-only training (``hias-nb train-source``); with ``split: target_train`` it trains the oracle.

    Defaults are toytown's (what ``hias-nb demo`` runs, docs/toytown.md); ``configs/gta5_source.yaml`` holds the
    paper's settings, and comments give the paper's value where it differs."""

    out: str = "runs/source_only"  # run directory (config, state, checkpoints, log)
    dataset: str = "toytown"  # a name in data_manifests/
    data_root: str = "data/toytown"
    split: str = "source_train"  # labelled split to train on
    resize: tuple[int, int] | None = None  # resize every image first (H, W); None keeps the files' size
    backbone: str = "resnet10t"  # any timm backbone with output_stride support; resnet101 for the paper
    pretrained: str | None = None  # local backbone weights file; None = random init (nothing is downloaded)
    init_checkpoint: str | None = None  # start from a full model checkpoint (hias_nb or published layout)
    aspp_rates: tuple[int, ...] = (1, 2, 4, 6)  # (6, 12, 18, 24) for paper-sized inputs; scaled for 64×128
    skip: bool = True  # models.StrideFourSkip, toytown's: +4 mIoU a stage for the same step time; paper: false
    freeze_bn: Literal["none", "affine", "full"] = "none"  # docs/method.md §6.2; "affine" is the reference for ST
    iterations: int = 300  # also the oracle's in the demo; paper: 24936 (8 GTA5 "epochs" at batch 8)
    batch_size: int = 16  # global batch (split across torchrun processes)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 2e-3  # backbone learning rate; the head gets head_lr_mult × lr
    head_lr_mult: float = 1.0  # 10 in the paper (pretrained backbone); a random-init backbone needs no slower lr
    weight_decay: float = 1e-4
    schedule: Literal["cosine", "poly", "constant"] = "poly"
    warmup: int = 30  # linear warm-up iterations (random-init training is unstable without one)
    crop_size: tuple[int, int] | None = None  # weak-view output (H, W); None = the image size
    crop_height_range: tuple[int, int] | None = None  # crop height in pixels (docs/method.md §5.5); None: crop_scale
    crop_scale: tuple[float, float] = (0.6, 1.0)  # crop height as a fraction of the input height
    crop_ratio: float = 2.0  # crop width / height
    photometric: float = 1.0  # strength of source photometric augmentation; 0 disables it
    strong_prob: float = 0.5  # share of images that then take the CCA strong view (docs/toytown.md); paper: 0
    num_workers: int = 0

    def validate(self) -> None:
        super().validate()
        check_ranges(
            self,
            positive=("head_lr_mult", "crop_ratio"),
            non_negative=("weight_decay", "warmup", "photometric", "num_workers"),
            unit=("strong_prob",),
            sizes=("resize", "crop_size", "crop_height_range"),
            scale_ranges=("crop_scale",),
        )
        augment.check_crop_fits(self.resize, self.crop_height_range, self.crop_ratio)


def build_model(
    backbone: str,
    num_classes: int,
    aspp_rates: tuple[int, ...],
    pretrained: str | None = None,
    init_checkpoint: str | None = None,
    skip: bool = False,
) -> nn.Module:
    """DeepLabV2 with optional local backbone weights and an optional full-model checkpoint to start from."""
    if pretrained is not None and not Path(pretrained).is_file():
        raise InputError(f"pretrained: file not found: {pretrained}")
    model = DeepLabV2(backbone, num_classes, pretrained=pretrained, aspp_rates=tuple(aspp_rates), skip=skip)
    if init_checkpoint is not None:
        arch = checkpoint_architecture(init_checkpoint)
        if arch["skip"] != skip:  # a non-strict load would drop (or leave random) the skip branch without a word
            raise InputError(f"skip: {init_checkpoint} {'has' if arch['skip'] else 'lacks'} the skip branch, "
                             f"the run asks for skip: {str(skip).lower()}")  # fmt: skip
        report = load_checkpoint(model, init_checkpoint)
        if distributed.is_main():
            print(f"init_checkpoint: {report}")
    return model


class SourceTraining:
    """The source-only (or oracle) stage for `run_stage`: one model, cross-entropy on labelled weak views."""

    postfix = ("loss",)

    def __init__(self, cfg: TrainConfig, device: str, start: int) -> None:
        self.cfg, self.device = cfg, device
        ds = SegDataset(cfg.dataset, cfg.data_root, cfg.split, size=cfg.resize)
        self.num_classes = ds.protocol.num_classes
        torch.manual_seed(cfg.seed)
        self.model = build_model(
            cfg.backbone, self.num_classes, cfg.aspp_rates, cfg.pretrained, cfg.init_checkpoint, skip=cfg.skip
        )
        self.model.to(device)
        freeze_bn(self.model, cfg.freeze_bn)
        if distributed.is_main():
            print(describe_init(self.model))
        self.opt = runner.make_optimizer(self.model, cfg.optimizer, cfg.lr, cfg.head_lr_mult, cfg.weight_decay)
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]  # before a resumed state overwrites them
        self.scaler = runner.make_scaler(device, cfg.amp)
        self.gen = runner.rank_generator(device, cfg.seed)
        self.parts = {"model": self.model, "optimizer": self.opt, "scaler": self.scaler, "generator": self.gen}
        self.net = distributed.wrap(self.model)
        self.net.train()
        freeze_bn(self.model, cfg.freeze_bn)
        self.batches = runner.stage_batches(ds, cfg, start, device, cfg.seed, cfg.num_workers)

    def step(self, it: int) -> dict[str, float]:
        cfg, device = self.cfg, self.device
        batch = next(self.batches)
        images, labels = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        views = augment.make_views(
            images, labels, generator=self.gen, crop_size=cfg.crop_size, crop_height_range=cfg.crop_height_range,
            crop_scale=cfg.crop_scale, crop_ratio=cfg.crop_ratio, strong=False,
        )  # fmt: skip
        images = views.weak
        if cfg.photometric > 0:  # so the source model's BatchNorm statistics do not encode the source palette
            images = augment.photometric(images, generator=self.gen, strength=cfg.photometric)
        # so that a self-training student, which learns from strong views, does not start by learning them
        images = augment.some_strong(images, self.gen, cfg.strong_prob)
        lr = runner.set_lr(self.opt, self.base_lrs, runner.lr_factor(it, cfg.iterations, cfg.schedule, cfg.warmup))
        loss = runner.cross_entropy_step(self.net, self.opt, self.scaler, images, views.label, device, cfg.amp)
        return {"loss": loss, "lr": lr}

    def finish(self, out: Path, timing: dict[str, Any]) -> None:
        cfg = self.cfg
        meta = {
            "backbone": cfg.backbone,
            "num_classes": self.num_classes,
            "aspp_rates": list(cfg.aspp_rates),
            "dataset": cfg.dataset,
            "split": cfg.split,
            **timing,
        }
        save_checkpoint(out / "model_final.pt", self.model, meta)


def train_source(cfg: TrainConfig) -> Path:
    """Train on a labelled split; returns ``model_final.pt`` (``state.pt`` when paused by ``stop_after``).
    Re-running resumes, or returns at once when the run is complete."""
    out = runner.run_stage(
        cfg, f"train {cfg.split}", "model_final.pt", lambda device, start: SourceTraining(cfg, device, start)
    )
    final = out / "model_final.pt"
    return final if final.exists() else out / "state.pt"


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, images: Iterator[torch.Tensor], device: str, max_batches: int | None = None, progress: bool = True
) -> nn.Module:
    """AdaBN: re-estimate every BatchNorm's running statistics on target images (uint8 ``[B,3,H,W]`` batches).

    Statistics are reset and re-accumulated as a cumulative average (``momentum=None``) in train mode without
    gradients; the weights are untouched. This is the share of adaptation that BN statistics alone explain.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i, batch in enumerate(tqdm(images, desc="AdaBN", disable=not progress, leave=False)):
        if max_batches is not None and i >= max_batches:
            break
        model(augment.normalize(batch.to(device)))
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
    model.eval()
    return model


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, gamma: float) -> None:
    """Mean teacher (docs/method.md §5.2): every parameter ``t ← γ·t + (1−γ)·s``; every buffer copied from the
    student. Uses the fused multi-tensor ``torch._foreach_*`` kernels (one launch for all tensors)."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher has {len(t_params)} parameters, student {len(s_params)}")
    torch._foreach_mul_(t_params, gamma)
    torch._foreach_add_(t_params, [p.detach() for p in s_params], alpha=1 - gamma)
    t_bufs, s_bufs = list(teacher.buffers()), list(student.buffers())
    if len(t_bufs) != len(s_bufs):
        raise ValueError(f"teacher has {len(t_bufs)} buffers, student {len(s_bufs)}")
    torch._foreach_copy_(t_bufs, s_bufs)


def load_model(checkpoint: str | Path, device: str, num_classes: int | None = None) -> nn.Module:
    """Rebuild a DeepLabV2 and load every weight of `checkpoint`: a hias_nb file (architecture from its meta) or a
    published HIAST/IAST file (DeepLab-v2-ResNet-101, `models.PUBLISHED_ARCHITECTURE`). A published file's key
    report is printed (what matched, what was ignored on purpose); a key that is missing or unexpected is refused."""
    arch = checkpoint_architecture(checkpoint)
    if num_classes is not None and arch["num_classes"] != num_classes:
        raise InputError(f"{checkpoint}: num_classes is {arch['num_classes']}, expected {num_classes}")
    model = DeepLabV2.from_architecture(arch)
    report = load_complete(model, checkpoint)
    if arch["layout"] == "published":
        print(f"published layout, loaded as {arch['backbone']} DeepLab-v2: {report}")
    return model.to(device).eval()  # callers that train switch it back with .train()
