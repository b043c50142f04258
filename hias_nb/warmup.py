"""Adversarial warm-up (docs/method.md §1.4): ``hias-nb warmup``, the stage between source-only training and round 1.

Per iteration, read top to bottom in `warmup_step`: a labelled source batch and an unlabelled target batch →
weak views (source also photometric, as in source-only training) → the segmentation network on both →
generator loss ``CE(z_s, y_s)·source_weight + adv_weight·D_loss(D(φ(z_t)), source) [+ ent_weight·entropy(z_t)]``
(the discriminator frozen, so only the network moves) → discriminator loss
``D_weight·[D_loss(D(φ(z_s)), source) + D_loss(D(φ(z_t)), target)] / 2`` on detached maps → both steps.
Source label 0, target label 1: the generator pushes target outputs to look like source ones (AdaptSegNet's
output-space alignment). φ is the softmax (AdaptSegNet) or the normalised self-information map (AdvEnt).

Decisions (docs/method.md B37): MinEnt is off by default (`ent_weight=0`; the reference's default 3.0 silently
switched it on); the source and target batches go through the network in **one** forward pass (`joint_forward`),
so every BatchNorm layer normalises both with the same batch statistics (two train-mode passes would give the two
domains different statistics in training and mixed running statistics at test time, docs/toytown.md).
The run writes ``model_final.pt`` (the segmentation network: G and M of docs/method.md §1.1 — the reference's "best by
target-val" choice would use target labels, so both are the last iteration) and ``discriminator_final.pt``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from hias_nb import augment, distributed
from hias_nb.classes import IGNORE
from hias_nb.config import check_ranges
from hias_nb.data import SegDataset
from hias_nb.errors import InputError
from hias_nb.io import atomic_path
from hias_nb.models import checkpoint_meta, freeze_bn, save_checkpoint
from hias_nb.runner import (
    RunSettings,
    autocast_context,
    lr_factor,
    make_optimizer,
    rank_generator,
    run_stage,
    set_lr,
    stage_batches,
)
from hias_nb.train import load_model

__all__ = [
    "WarmupConfig",
    "FCDiscriminator",
    "discriminator_input",
    "discriminator_loss",
    "warmup_step",
    "AdversarialWarmup",
    "adversarial_warmup",
    "SOURCE_LABEL",
    "TARGET_LABEL",
]

SOURCE_LABEL, TARGET_LABEL = 0.0, 1.0


@dataclass
class WarmupConfig(RunSettings):
    """``hias-nb warmup``. Defaults are toytown's (what ``hias-nb demo`` runs, docs/toytown.md); the
    reference's values are noted where they differ."""

    out: str = "runs/warmup"
    init_checkpoint: str = "runs/source_only/model_final.pt"  # the source-only model
    dataset: str = "toytown"  # the target dataset (name or manifest YAML)
    data_root: str = "data/toytown"  # the target's root
    source_dataset: str | None = None  # None: `dataset` (toytown holds both domains); e.g. gta5, synthia
    source_root: str | None = None  # None: `data_root`
    source_split: str = "source_train"
    target_split: str = "target_train"
    resize: tuple[int, int] | None = None  # target images resized first (H, W); None keeps the files' size
    source_resize: tuple[int, int] | None = None  # None: `resize`
    iterations: int = 300
    batch_size: int = 16  # per domain
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 2e-4  # a tenth of toytown's source lr (reference: Adam 2e-5 after 1e-4 for source-only)
    head_lr_mult: float = 1.0
    weight_decay: float = 1e-4
    schedule: Literal["cosine", "poly", "constant"] = "poly"
    freeze_bn: Literal["none", "affine", "full"] = "none"
    joint_forward: bool = True  # source and target in one forward pass (shared BatchNorm batch statistics)
    source_weight: float = 1.0
    adv_weight: float = 0.15  # reference: 0.05 (GTA5, pretrained ResNet-101), 0.001 (SYNTHIA); not re-measured
    ent_weight: float = 0.0  # MinEnt on all target pixels (reference default 3.0, see module docstring)
    d_input: Literal["softmax", "entropy"] = "softmax"  # AdaptSegNet or AdvEnt
    d_loss: Literal["mse", "bce"] = "mse"  # LSGAN (reference) or BCE-with-logits (AdaptSegNet/AdvEnt papers)
    d_weight: float = 1.0
    d_lr: float = 1e-4
    d_ndf: int = 32  # discriminator width; reference: 64, sized for 1024×512 maps (1.5× slower a step here)
    crop_size: tuple[int, int] | None = None  # weak-view output (H, W) of both domains; None: the image size
    # crop heights in pixels per domain (docs/method.md §5.5: GTA5 (341, 950), Cityscapes (341, 1000)); None: crop_scale
    source_crop_height_range: tuple[int, int] | None = None
    target_crop_height_range: tuple[int, int] | None = None
    crop_scale: tuple[float, float] = (0.6, 1.0)  # crop height as a fraction of the image height
    crop_ratio: float = 2.0
    photometric: float = 1.0  # source photometric augmentation, as in source-only training
    strong_prob: float = 0.5  # share of source images that then take the CCA strong view, as in source-only

    def validate(self) -> None:
        super().validate()
        check_ranges(
            self,
            positive=("d_ndf", "d_lr", "head_lr_mult", "crop_ratio"),
            non_negative=("weight_decay", "source_weight", "adv_weight", "ent_weight", "d_weight", "photometric"),
            sizes=("resize", "source_resize", "crop_size", "source_crop_height_range", "target_crop_height_range"),
            unit=("strong_prob",),
            scale_ranges=("crop_scale",),
        )
        augment.check_crop_fits(self.source_resize or self.resize, self.source_crop_height_range, self.crop_ratio)
        augment.check_crop_fits(self.resize, self.target_crop_height_range, self.crop_ratio)

    def source(self) -> tuple[str, str]:
        """(dataset, root) of the source domain."""
        return self.source_dataset or self.dataset, self.source_root or self.data_root


class FCDiscriminator(nn.Module):
    """Output-space discriminator of docs/method.md §1.4 (``FCDiscriminator(C, ndf)``).

    Five 4×4 convolutions with stride 2 and padding 1, channels ``C → ndf → 2ndf → 4ndf → 8ndf → 1``, LeakyReLU(0.2)
    between them. Parameter names match the published checkpoints' ``D.*`` keys (conv1..conv4, classifier).

    Shape: ``forward(x: [B, C, H, W]) -> [B, 1, H/32, W/32]`` (each stride halves with floor; one logit per patch).
    """

    def __init__(self, num_classes: int, ndf: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_classes, ndf, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(ndf, ndf * 2, 4, stride=2, padding=1)
        self.conv3 = nn.Conv2d(ndf * 2, ndf * 4, 4, stride=2, padding=1)
        self.conv4 = nn.Conv2d(ndf * 4, ndf * 8, 4, stride=2, padding=1)
        self.classifier = nn.Conv2d(ndf * 8, 1, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = F.leaky_relu(conv(x), 0.2)
        return self.classifier(x)


def discriminator_input(logits: torch.Tensor, kind: str = "softmax") -> torch.Tensor:
    """φ(z): the softmax ``p`` (AdaptSegNet) or the self-information ``−p·log2 p / log2 C`` (AdvEnt), ``[B,C,H,W]``."""
    p = logits.softmax(1)
    if kind == "softmax":
        return p
    if kind == "entropy":
        return -p * torch.log2(p.clamp_min(1e-30)) / math.log2(logits.shape[1])
    raise InputError(f"d_input: expected 'softmax' or 'entropy', got {kind!r}")


def discriminator_loss(d_out: torch.Tensor, label: float, kind: str = "mse") -> torch.Tensor:
    """Mean over every patch of ``(d − label)²`` (LSGAN, the reference) or BCE-with-logits against ``label``."""
    target = torch.full_like(d_out, label)
    if kind == "mse":
        return F.mse_loss(d_out, target)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(d_out, target)
    raise InputError(f"d_loss: expected 'mse' or 'bce', got {kind!r}")


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """MinEnt term of docs/method.md §1.4: ``Σ −p log2 p / (N·H·W·log2 C)`` over all pixels of ``[N,C,H,W]`` logits."""
    p = logits.softmax(1)
    return -(p * torch.log2(p.clamp_min(1e-30))).sum(1).mean() / math.log2(logits.shape[1])


def warmup_step(
    model: nn.Module,
    disc: nn.Module,
    source: torch.Tensor,
    labels: torch.Tensor,
    target: torch.Tensor,
    cfg: WarmupConfig,
    device: str,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """The two losses of one warm-up iteration on augmented, normalised batches (``source``, ``target`` float
    ``[B,3,H,W]`` of the same size, ``labels`` int64 ``[B,H,W]``).

    Returns ``(generator_loss, discriminator_loss, terms)``. The generator loss flows through the discriminator
    into the network only (the discriminator's parameters have ``requires_grad`` off while it is built); the
    discriminator loss sees detached maps, so it reaches the discriminator only.
    """
    with autocast_context(device, cfg.amp):
        if cfg.joint_forward:
            z = model(torch.cat([source, target]))
            z_s, z_t = z[: len(source)], z[len(source) :]
        else:
            z_s, z_t = model(source), model(target)
    z_s, z_t = z_s.float(), z_t.float()
    ce = F.cross_entropy(z_s, labels, ignore_index=IGNORE)
    phi_s, phi_t = discriminator_input(z_s, cfg.d_input), discriminator_input(z_t, cfg.d_input)

    def d_forward(x: torch.Tensor) -> torch.Tensor:
        with autocast_context(device, cfg.amp):
            return disc(x).float()

    for p in disc.parameters():
        p.requires_grad_(False)
    adv = discriminator_loss(d_forward(phi_t), SOURCE_LABEL, cfg.d_loss)  # fool D: target maps should look "source"
    for p in disc.parameters():
        p.requires_grad_(True)
    ent = mean_entropy(z_t) if cfg.ent_weight > 0 else z_t.new_zeros(())
    g_loss = cfg.source_weight * ce + cfg.adv_weight * adv + cfg.ent_weight * ent

    d_s = d_forward(phi_s.detach())
    d_t = d_forward(phi_t.detach())
    d_src = discriminator_loss(d_s, SOURCE_LABEL, cfg.d_loss)
    d_tgt = discriminator_loss(d_t, TARGET_LABEL, cfg.d_loss)
    d_loss = cfg.d_weight * (d_src + d_tgt) / 2
    terms = {
        "loss": g_loss.item(),
        "ce": ce.item(),
        "adv": adv.item(),
        "entropy": ent.item(),
        "d_loss": d_loss.item(),
        # how well D separates the domains: mean output on source and target patches (0 and 1 when it does)
        "d_source": d_s.float().mean().item(),
        "d_target": d_t.float().mean().item(),
    }
    return g_loss, d_loss, terms


class AdversarialWarmup:
    """The warm-up stage for `run_stage`: the segmentation network and the discriminator, each with its optimiser."""

    postfix = ("ce", "adv", "d_loss")

    def __init__(self, cfg: WarmupConfig, device: str, start: int) -> None:
        self.cfg, self.device = cfg, device
        src = SegDataset(*cfg.source(), cfg.source_split, size=cfg.source_resize or cfg.resize)
        tgt = SegDataset(cfg.dataset, cfg.data_root, cfg.target_split, size=cfg.resize)
        if src.protocol.classes != tgt.protocol.classes:
            raise InputError(
                f"source_dataset: {cfg.source()[0]} labels {src.protocol.num_classes} classes, the target "
                f"{cfg.dataset} {tgt.protocol.num_classes}; the warm-up needs one class list"
            )
        hw_s, hw_t = tuple(src[0]["image"].shape[-2:]), tuple(tgt[0]["image"].shape[-2:])
        if cfg.crop_size is None and hw_s != hw_t:
            raise InputError(f"crop_size: source images are {hw_s}, target images {hw_t}; set crop_size (or resize)")
        self.hw = tuple(cfg.crop_size) if cfg.crop_size is not None else hw_s
        augment.check_crop_fits(hw_s, cfg.source_crop_height_range, cfg.crop_ratio)  # the files' size, if not resized
        augment.check_crop_fits(hw_t, cfg.target_crop_height_range, cfg.crop_ratio)
        num_classes = src.protocol.num_classes
        self.meta = checkpoint_meta(cfg.init_checkpoint)
        self.model = load_model(cfg.init_checkpoint, device, num_classes=num_classes)
        torch.manual_seed(cfg.seed)
        self.disc = FCDiscriminator(num_classes, cfg.d_ndf).to(device)
        freeze_bn(self.model, cfg.freeze_bn)
        self.opt = make_optimizer(self.model, cfg.optimizer, cfg.lr, cfg.head_lr_mult, cfg.weight_decay)
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=cfg.d_lr, betas=(0.9, 0.999))  # no weight decay
        self.gen = rank_generator(device, cfg.seed)
        self.parts = {
            "model": self.model,
            "discriminator": self.disc,
            "optimizer": self.opt,
            "optimizer_d": self.opt_d,
            "generator": self.gen,
        }
        self.net, self.dnet = distributed.wrap(self.model), distributed.wrap(self.disc)
        self.net.train()
        freeze_bn(self.model, cfg.freeze_bn)
        self.source = stage_batches(src, cfg, start, device, cfg.seed)
        self.target = stage_batches(tgt, cfg, start, device, cfg.seed + 1)

    def _weak(self, batch: dict, heights: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Flip and random-sized crop of one domain's batch to ``[B,3,*self.hw]`` (labels ``[B,*self.hw]``)."""
        cfg = self.cfg
        v = augment.make_views(
            batch["image"].to(self.device), batch["label"].to(self.device), generator=self.gen,
            crop_size=self.hw, crop_height_range=heights, crop_scale=cfg.crop_scale, crop_ratio=cfg.crop_ratio,
            strong=False,
        )  # fmt: skip
        return v.weak, v.label

    def step(self, it: int) -> dict[str, float]:
        cfg = self.cfg
        xs, ys = self._weak(next(self.source), cfg.source_crop_height_range)
        if cfg.photometric > 0:
            xs = augment.photometric(xs, generator=self.gen, strength=cfg.photometric)
        xs = augment.some_strong(xs, self.gen, cfg.strong_prob)
        xt, _ = self._weak(next(self.target), cfg.target_crop_height_range)  # its label is never read
        lr = set_lr(self.opt, self.base_lrs, lr_factor(it, cfg.iterations, cfg.schedule))
        set_lr(self.opt_d, [cfg.d_lr], lr_factor(it, cfg.iterations, cfg.schedule))
        g_loss, d_loss, terms = warmup_step(
            self.net, self.dnet, augment.normalize(xs), ys, augment.normalize(xt), cfg, self.device
        )
        self.opt.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt.step()
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        return {**terms, "lr": lr}

    def finish(self, out: Path, timing: dict[str, Any]) -> None:
        with atomic_path(out / "discriminator_final.pt") as tmp:
            torch.save(self.disc.state_dict(), tmp)
        meta = {**self.meta, "warmup": "adversarial", **timing}
        save_checkpoint(out / "model_final.pt", self.model, meta)  # written last: its presence marks a finished run


def adversarial_warmup(cfg: WarmupConfig) -> Path:
    """Run the warm-up; returns the run folder (``model_final.pt``, ``discriminator_final.pt``). Resumable."""
    return run_stage(cfg, "warm-up", "model_final.pt", lambda device, start: AdversarialWarmup(cfg, device, start))
