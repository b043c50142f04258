"""Source-only (and oracle) training, BatchNorm re-estimation, and the EMA teacher update.

The data path is a straight line: dataset → batch on device → weak view (flip + random-sized crop, SPEC.md
5.5) → photometric augmentation (so the source model's BatchNorm statistics do not encode the source palette;
see TOYTOWN-NOTES) → model → cross-entropy → step. Optimiser and schedule follow SPEC.md 6.3 (head at 10× the
backbone's learning rate, cosine to 0.001·lr); the defaults are the toytown CPU settings.

A run is resumable: ``state.pt`` is written atomically every ``checkpoint_every`` iterations and a re-run of the
same command continues from it; the sampler order, augmentation RNG and optimiser state are restored exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
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
from hias_nb.models import DeepLabV2, describe_init, freeze_bn, load_checkpoint, param_groups, save_checkpoint
from hias_nb.runs import CsvLog, load_state, prepare_run_dir, resolve_device, save_state

__all__ = [
    "TrainConfig",
    "train_source",
    "build_model",
    "make_optimizer",
    "lr_factor",
    "set_lr",
    "save_due",
    "InfiniteSampler",
    "recalibrate_bn",
    "ema_update",
    "autocast_context",
    "cpu_has_native_bf16",
    "load_model",
    "make_scaler",
    "infinite_loader",
    "crop_heights",
]


@dataclass
class TrainConfig:
    """Source-only training (``hias-nb train-source``); with ``split: target_train`` it trains the oracle."""

    out: str = "runs/source_only"  # run directory (config, state, checkpoints, log)
    dataset: str = "toytown"  # a name in data_manifests/
    data_root: str = "data/toytown"
    split: str = "source_train"  # labelled split to train on
    resize: tuple[int, int] | None = None  # resize every image first (H, W); None keeps the files' size
    backbone: str = "resnet10t"  # any timm backbone with output_stride support; resnet101 for the paper
    pretrained: str | None = None  # local backbone weights file; None = random init (nothing is downloaded)
    init_checkpoint: str | None = None  # start from a full model checkpoint (hias_nb or published layout)
    aspp_rates: tuple[int, ...] = (1, 2, 4, 6)  # (6, 12, 18, 24) for paper-sized inputs; scaled for 64×128
    freeze_bn: Literal["none", "affine", "full"] = "none"  # SPEC 6.2; "affine" is the reference for ST
    iterations: int = 600
    batch_size: int = 16  # global batch (split across torchrun processes)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 2e-3  # backbone learning rate; the head gets head_lr_mult × lr
    head_lr_mult: float = 1.0  # 10 in the paper (pretrained backbone); a random-init backbone needs no slower lr
    weight_decay: float = 1e-4
    schedule: Literal["cosine", "poly", "constant"] = "poly"
    warmup: int = 30  # linear warm-up iterations (random-init training is unstable without one)
    crop_size: tuple[int, int] | None = None  # weak-view output (H, W); None = the image size
    crop_height_range: tuple[int, int] | None = None  # crop height in pixels (SPEC 5.5 rows); None: crop_scale
    crop_scale: tuple[float, float] = (0.6, 1.0)  # crop height as a fraction of the input height
    crop_ratio: float = 2.0  # crop width / height
    photometric: float = 1.0  # strength of source photometric augmentation; 0 disables it
    checkpoint_every: int = 100
    stop_after: int | None = None  # leave a resumable state after this many iterations (wall-time-limited jobs)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda[:N]
    amp: bool = True  # autocast: CUDA bf16 (else fp16 with a scaler); CPU bf16 where native (else fp32)
    num_workers: int = 0
    progress: bool = True

    def validate(self) -> None:
        for name in ("iterations", "batch_size", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise InputError(f"lr: must be positive, got {self.lr}")


def build_model(
    backbone: str,
    num_classes: int,
    aspp_rates: tuple[int, ...],
    pretrained: str | None = None,
    init_checkpoint: str | None = None,
) -> nn.Module:
    """DeepLabV2 with optional local backbone weights and an optional full-model checkpoint to start from."""
    if pretrained is not None and not Path(pretrained).is_file():
        raise InputError(f"pretrained: file not found: {pretrained}")
    model = DeepLabV2(backbone, num_classes=num_classes, pretrained=pretrained, aspp_rates=tuple(aspp_rates))
    if init_checkpoint is not None:
        report = load_checkpoint(model, init_checkpoint)
        if distributed.is_main():
            print(f"init_checkpoint: {report}")
    return model


def make_optimizer(model: nn.Module, kind: str, lr: float, head_lr_mult: float, weight_decay: float):
    groups = param_groups(model, lr, head_lr_mult=head_lr_mult, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if kind == "adam":  # SPEC 6.3: coupled L2 weight decay
        return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)


def lr_factor(it: int, total: int, schedule: str, warmup: int = 0, min_factor: float = 1e-3) -> float:
    """Multiplier of every group's base learning rate at iteration `it` (SPEC 6.3: cosine to 0.001·lr)."""
    if warmup and it < warmup:
        return (it + 1) / warmup
    t = min(it, total) / max(total, 1)
    if schedule == "cosine":
        return min_factor + (1 - min_factor) * (1 + math.cos(math.pi * t)) / 2
    if schedule == "poly":
        return max((1 - t) ** 0.9, min_factor)
    return 1.0


def set_lr(opt: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> float:
    """Set every parameter group's lr to its base lr × `factor` (the schedule); returns `factor`."""
    for g, lr in zip(opt.param_groups, base_lrs, strict=True):
        g["lr"] = lr * factor
    return factor


def save_due(done: int, every: int, stop: int) -> bool:
    """Whether to write the resumable state after `done` iterations: every `every`, and where this session stops
    (the end of the run or `stop_after`)."""
    return done % every == 0 or done == stop


class InfiniteSampler(torch.utils.data.Sampler[int]):
    """Endless reshuffled indices: epoch e is a permutation seeded by (seed, e); rank r takes every world-th index.

    ``start`` skips that many (global) samples so a resumed run sees exactly the batches it would have seen.
    With ``positions=True`` it yields ``(position, index)`` pairs, the position counting samples from the start
    of the run over all ranks: a dataset can seed per-sample randomness with it (see ``self_train.HPLATarget``).
    """

    def __init__(self, n: int, seed: int, start: int = 0, positions: bool = False) -> None:
        self.n, self.seed, self.start, self.positions = n, seed, start, positions
        self.rank, self.world = distributed.rank(), distributed.world_size()

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        pos = self.start
        while True:
            epoch, offset = divmod(pos, self.n)
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            for i in range(offset, self.n):
                if (pos - self.start) % self.world == self.rank:
                    yield (pos, int(perm[i])) if self.positions else int(perm[i])
                pos += 1


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 convolutions natively here (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_context(device: str, amp: bool):
    """bf16 autocast on CUDA when available (fp16 otherwise) and on CPUs with native bf16 (≈ 1.8× faster steps
    on an AVX512-BF16 CPU, `benchmarks/bench_step.py`); a no-op elsewhere and with `amp=False`."""
    if amp and device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp and device == "cpu" and cpu_has_native_bf16())


def crop_heights(pixels: tuple[int, int] | None, scale: tuple[float, float], in_h: int) -> tuple[int, int]:
    """Inclusive crop-height range of the weak view: `pixels` when given (SPEC 5.5 rows), else `scale` × input
    height (the toytown default (0.6, 1.0))."""
    if pixels is not None:
        return int(pixels[0]), int(pixels[1])
    lo, hi = max(1, round(scale[0] * in_h)), max(1, round(scale[1] * in_h))
    if lo > hi:
        raise InputError(f"crop_scale: lower bound above upper bound: {scale}")
    return lo, hi


def make_scaler(device: str, amp: bool) -> torch.amp.GradScaler:
    """A loss scaler, enabled only where autocast runs in fp16 (CUDA without bf16)."""
    return torch.amp.GradScaler(
        "cuda", enabled=amp and device.startswith("cuda") and not torch.cuda.is_bf16_supported()
    )


def infinite_loader(ds, batch: int, seed: int, start: int, workers: int, device: str, positions: bool = False):
    """Endless batches over `ds` in `InfiniteSampler` order, starting `start` samples in (for resumption)."""
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        sampler=InfiniteSampler(len(ds), seed, start, positions),
        num_workers=workers,
        pin_memory=device.startswith("cuda"),
        drop_last=True,
        persistent_workers=workers > 0,
    )


def train_source(cfg: TrainConfig) -> Path:
    """Train on a labelled split; returns the path of ``model_final.pt``. Re-running resumes or returns at once."""
    device = resolve_device(cfg.device)
    distributed.init_distributed(device)
    out = Path(cfg.out)
    final = out / "model_final.pt"
    if final.exists() and (out / "config.yaml").exists():
        prepare_run_dir(out, cfg)  # refuses if the finished run had another config
        if distributed.is_main():
            print(f"{final}: already trained; nothing to do")
        return final
    if distributed.is_main():
        prepare_run_dir(out, cfg)
    world = distributed.world_size()
    if cfg.batch_size % world:
        raise InputError(f"batch_size: {cfg.batch_size} does not divide over {world} processes")

    ds = SegDataset(cfg.dataset, cfg.data_root, cfg.split, size=cfg.resize)
    num_classes = ds.protocol.num_classes
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.backbone, num_classes, cfg.aspp_rates, cfg.pretrained, cfg.init_checkpoint).to(device)
    freeze_bn(model, cfg.freeze_bn)
    if distributed.is_main():
        print(describe_init(model))
    opt = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.head_lr_mult, cfg.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]  # before a resumed state overwrites them
    scaler = make_scaler(device, cfg.amp)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1000 * distributed.rank())

    start = 0
    state = load_state(out / "state.pt")
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        gen.set_state(state["generator"])
        start = int(state["iteration"])
        if distributed.is_main():
            print(f"{out / 'state.pt'}: resuming at iteration {start}/{cfg.iterations}")
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(model))

    loader = infinite_loader(ds, cfg.batch_size // world, cfg.seed, start * cfg.batch_size, cfg.num_workers, device)
    image_hw = tuple(ds[0]["image"].shape[-2:])
    out_hw = tuple(cfg.crop_size) if cfg.crop_size else image_hw
    h_range = crop_heights(cfg.crop_height_range, cfg.crop_scale, image_hw[0])
    log = CsvLog(out / "log.csv", resume_from=start) if distributed.is_main() else None
    net.train()
    freeze_bn(model, cfg.freeze_bn)
    bar = tqdm(
        total=cfg.iterations,
        initial=start,
        desc=f"train {cfg.split}",
        disable=not (cfg.progress and distributed.is_main()),
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    batches = iter(loader)
    stop = cfg.iterations if cfg.stop_after is None else min(cfg.iterations, start + cfg.stop_after)
    for it in range(start, stop):
        batch = next(batches)
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        images, labels, _ = augment.weak_view(
            images, labels, out_size=out_hw, h_range=h_range, ratio=cfg.crop_ratio, generator=gen
        )
        if cfg.photometric > 0:
            images = augment.photometric(images, generator=gen, strength=cfg.photometric)
        f = set_lr(opt, base_lrs, lr_factor(it, cfg.iterations, cfg.schedule, cfg.warmup))
        with autocast_context(device, cfg.amp):
            logits = net(augment.normalize(images))
        loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if not torch.isfinite(loss):
            raise RuntimeError(f"iteration {it}: loss is {loss.item()}; lower lr (now {cfg.lr})")
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if log is not None:
            log.write(
                {
                    "iteration": it + 1,
                    "loss": round(loss.item(), 5),
                    "lr": base_lrs[0] * f,
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
        if distributed.is_main() and save_due(it + 1, cfg.checkpoint_every, stop):
            save_state(
                out / "state.pt",
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scaler": scaler.state_dict(),
                    "generator": gen.get_state(),
                    "iteration": it + 1,
                },
            )
    bar.close()
    if stop < cfg.iterations:
        print(f"{out / 'state.pt'}: stopped at iteration {stop}/{cfg.iterations}; re-run to resume")
        return out / "state.pt"
    if distributed.is_main():
        meta = {
            "backbone": cfg.backbone,
            "num_classes": num_classes,
            "aspp_rates": list(cfg.aspp_rates),
            "dataset": cfg.dataset,
            "split": cfg.split,
            "iterations": cfg.iterations,
            "seconds_per_iteration": (time.perf_counter() - t0) / max(cfg.iterations - start, 1),
        }
        save_checkpoint(final, model, meta)
    distributed.barrier()
    return final


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
    """Mean teacher (SPEC 5.2): every parameter ``t ← γ·t + (1−γ)·s``; every buffer copied from the student.

    Uses the fused multi-tensor ``torch._foreach_*`` kernels (one launch for all tensors instead of one per tensor).
    """
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
    """Rebuild a DeepLabV2 from a hias_nb checkpoint (architecture from its meta) and load its weights."""
    from hias_nb.models import checkpoint_meta

    meta = checkpoint_meta(checkpoint)
    if not meta:
        raise InputError(f"{checkpoint}: not a hias_nb checkpoint (no meta); use `hias-nb evaluate --backbone`")
    if num_classes is not None and meta["num_classes"] != num_classes:
        raise InputError(f"{checkpoint}: num_classes is {meta['num_classes']}, expected {num_classes}")
    model = DeepLabV2(meta["backbone"], num_classes=meta["num_classes"], aspp_rates=tuple(meta["aspp_rates"]))
    load_checkpoint(model, checkpoint, strict=True)
    return model.to(device).eval()  # callers that train switch it back with .train()
