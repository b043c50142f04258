"""Adversarial warm-up (SPEC.md 1.4): ``hias-nb warmup``, the stage between source-only training and round 1.

Per iteration, read top to bottom in `warmup_step`: a labelled source batch and an unlabelled target batch →
weak views (source also photometric, as in source-only training) → the segmentation network on both →
generator loss ``CE(z_s, y_s)·source_weight + adv_weight·D_loss(D(φ(z_t)), source) [+ ent_weight·entropy(z_t)]``
(the discriminator frozen, so only the network moves) → discriminator loss
``D_weight·[D_loss(D(φ(z_s)), source) + D_loss(D(φ(z_t)), target)] / 2`` on detached maps → both steps.
Source label 0, target label 1: the generator pushes target outputs to look like source ones (AdaptSegNet's
output-space alignment). φ is the softmax (AdaptSegNet) or the normalised self-information map (AdvEnt).

Decisions (SPEC 9 B37): MinEnt is off by default (`ent_weight=0`; the reference's default 3.0 silently switched it
on); the source and target batches go through the network in **one** forward pass (`joint_forward`), so every
BatchNorm layer normalises both with the same batch statistics (two train-mode passes would give the two domains
different statistics in training and mixed running statistics at test time, TOYTOWN-NOTES).
The run writes ``model_final.pt`` (the segmentation network: G and M of SPEC 1.1 — the reference's "best by
target-val" choice would use target labels, so both are the last iteration) and ``discriminator_final.pt``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hias_nb import augment, distributed
from hias_nb.classes import IGNORE
from hias_nb.data import SegDataset
from hias_nb.errors import InputError
from hias_nb.models import checkpoint_meta, freeze_bn, save_checkpoint
from hias_nb.runs import CsvLog, load_state, prepare_run_dir, resolve_device, save_state
from hias_nb.train import (
    autocast_context,
    crop_heights,
    infinite_loader,
    load_model,
    lr_factor,
    make_optimizer,
    save_due,
    set_lr,
)

__all__ = [
    "WarmupConfig",
    "FCDiscriminator",
    "discriminator_input",
    "discriminator_loss",
    "warmup_step",
    "adversarial_warmup",
    "SOURCE_LABEL",
    "TARGET_LABEL",
]

SOURCE_LABEL, TARGET_LABEL = 0.0, 1.0


@dataclass
class WarmupConfig:
    """``hias-nb warmup``. Defaults are toytown's; the reference's values are noted where they differ."""

    out: str = "runs/warmup"
    init_checkpoint: str = "runs/source_only/model_final.pt"  # the source-only model
    dataset: str = "toytown"
    data_root: str = "data/toytown"
    source_split: str = "source_train"
    target_split: str = "target_train"
    resize: tuple[int, int] | None = None
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
    adv_weight: float = 0.05  # reference: 0.05 (GTA5), 0.001 (SYNTHIA)
    ent_weight: float = 0.0  # MinEnt on all target pixels (reference default 3.0, see module docstring)
    d_input: Literal["softmax", "entropy"] = "softmax"  # AdaptSegNet or AdvEnt
    d_loss: Literal["mse", "bce"] = "mse"  # LSGAN (reference) or BCE-with-logits (AdaptSegNet/AdvEnt papers)
    d_weight: float = 1.0
    d_lr: float = 1e-4
    d_ndf: int = 64
    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: float = 2.0
    photometric: float = 1.0  # source photometric augmentation, as in source-only training
    checkpoint_every: int = 100
    stop_after: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    progress: bool = True

    def validate(self) -> None:
        for name in ("iterations", "batch_size", "checkpoint_every", "d_ndf"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("lr", "d_lr"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("source_weight", "adv_weight", "ent_weight", "d_weight"):
            if getattr(self, name) < 0:
                raise InputError(f"{name}: must be >= 0, got {getattr(self, name)}")


class FCDiscriminator(nn.Module):
    """Output-space discriminator of SPEC 1.4 (``FCDiscriminator(C, ndf)``).

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
    """MinEnt term of SPEC 1.4: ``Σ −p log2 p / (N·H·W·log2 C)`` over all pixels of ``[N,C,H,W]`` logits."""
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


def adversarial_warmup(cfg: WarmupConfig) -> Path:
    """Run the warm-up; returns the run folder (``model_final.pt``, ``discriminator_final.pt``). Resumable."""
    cfg.validate()
    device = resolve_device(cfg.device)
    distributed.init_distributed(device)
    out = Path(cfg.out)
    if (out / "model_final.pt").exists() and (out / "config.yaml").exists():
        prepare_run_dir(out, cfg)  # refuses if the finished run had another config
        print(f"{out}: warm-up already complete; nothing to do")
        return out
    if distributed.is_main():
        prepare_run_dir(out, cfg)
    world = distributed.world_size()
    if cfg.batch_size % world:
        raise InputError(f"batch_size: {cfg.batch_size} does not divide over {world} processes")

    src = SegDataset(cfg.dataset, cfg.data_root, cfg.source_split, size=cfg.resize)
    tgt = SegDataset(cfg.dataset, cfg.data_root, cfg.target_split, size=cfg.resize)
    hw_s, hw_t = tuple(src[0]["image"].shape[-2:]), tuple(tgt[0]["image"].shape[-2:])
    if hw_s != hw_t and cfg.resize is None:
        raise InputError(f"resize: source images are {hw_s}, target images {hw_t}; set resize to one size")
    num_classes = src.protocol.num_classes
    meta = checkpoint_meta(cfg.init_checkpoint)
    model = load_model(cfg.init_checkpoint, device, num_classes=num_classes)
    torch.manual_seed(cfg.seed)
    disc = FCDiscriminator(num_classes, cfg.d_ndf).to(device)
    freeze_bn(model, cfg.freeze_bn)
    opt = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.head_lr_mult, cfg.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.d_lr, betas=(0.9, 0.999))  # SPEC 1.4: no weight decay
    base_d = cfg.d_lr
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1000 * distributed.rank())
    start = 0
    state = load_state(out / "state.pt")
    if state is not None:
        model.load_state_dict(state["model"])
        disc.load_state_dict(state["discriminator"])
        opt.load_state_dict(state["optimizer"])
        opt_d.load_state_dict(state["optimizer_d"])
        gen.set_state(state["generator"])
        start = int(state["iteration"])
        print(f"{out / 'state.pt'}: resuming at iteration {start}/{cfg.iterations}")
    net, dnet = model, disc
    if world > 1:
        net = nn.parallel.DistributedDataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(model))
        dnet = nn.parallel.DistributedDataParallel(disc)

    per_rank = cfg.batch_size // world
    src_it = iter(infinite_loader(src, per_rank, cfg.seed, start * cfg.batch_size, 0, device))
    tgt_it = iter(infinite_loader(tgt, per_rank, cfg.seed + 1, start * cfg.batch_size, 0, device))
    h_range = crop_heights(None, cfg.crop_scale, hw_s[0])
    log = CsvLog(out / "log.csv", resume_from=start) if distributed.is_main() else None
    net.train()
    freeze_bn(model, cfg.freeze_bn)
    bar = tqdm(
        total=cfg.iterations,
        initial=start,
        desc="warm-up",
        disable=not (cfg.progress and distributed.is_main()),
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    stop = cfg.iterations if cfg.stop_after is None else min(cfg.iterations, start + cfg.stop_after)
    for it in range(start, stop):
        bs, bt = next(src_it), next(tgt_it)
        xs, ys, _ = augment.weak_view(
            bs["image"].to(device), bs["label"].to(device), out_size=hw_s, h_range=h_range,
            ratio=cfg.crop_ratio, generator=gen,
        )  # fmt: skip
        if cfg.photometric > 0:
            xs = augment.photometric(xs, generator=gen, strength=cfg.photometric)
        xt, _, _ = augment.weak_view(
            bt["image"].to(device),
            bt["label"].to(device),
            out_size=hw_s,
            h_range=h_range,
            ratio=cfg.crop_ratio,
            generator=gen,
        )  # fmt: skip  (the target label rides along only to share weak_view's signature; it is never read)
        f = set_lr(opt, base_lrs, lr_factor(it, cfg.iterations, cfg.schedule))
        set_lr(opt_d, [base_d], lr_factor(it, cfg.iterations, cfg.schedule))
        g_loss, d_loss, terms = warmup_step(net, dnet, augment.normalize(xs), ys, augment.normalize(xt), cfg, device)
        if not np.isfinite(terms["loss"]) or not np.isfinite(terms["d_loss"]):
            raise RuntimeError(f"iteration {it}: non-finite loss; terms {terms}; lower lr (now {cfg.lr})")
        opt.zero_grad(set_to_none=True)
        g_loss.backward()
        opt.step()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

        bar.update(1)
        bar.set_postfix(ce=f"{terms['ce']:.3f}", adv=f"{terms['adv']:.3f}", d=f"{terms['d_loss']:.3f}")
        if log is not None:
            log.write(
                {
                    "iteration": it + 1,
                    **{k: round(v, 6) for k, v in terms.items()},
                    "lr": base_lrs[0] * f,
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
        if distributed.is_main() and save_due(it + 1, cfg.checkpoint_every, stop):
            save_state(
                out / "state.pt",
                {
                    "model": model.state_dict(),
                    "discriminator": disc.state_dict(),
                    "optimizer": opt.state_dict(),
                    "optimizer_d": opt_d.state_dict(),
                    "generator": gen.get_state(),
                    "iteration": it + 1,
                },
            )
    bar.close()
    if stop < cfg.iterations:
        print(f"{out / 'state.pt'}: stopped at iteration {stop}/{cfg.iterations}; re-run to resume")
        return out
    if distributed.is_main():
        meta = {
            **meta,
            "warmup": "adversarial",
            "iterations": cfg.iterations,
            "seconds_per_iteration": (time.perf_counter() - t0) / max(cfg.iterations - start, 1),
        }
        torch.save(disc.state_dict(), out / "discriminator_final.pt")
        save_checkpoint(out / "model_final.pt", model, meta)  # written last: its presence marks a finished run
    distributed.barrier()
    return out
