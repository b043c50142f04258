"""One HIAST self-training round (SPEC.md sections 3–5, 6.2–6.3): ``hias-nb self-train``.

Per iteration, read top to bottom in `self_training_step`:
target batch (image, pseudo-label) → HPLA copy-paste of hard-class pixels (full resolution) → weak view (flip +
random-sized crop; label and provenance mask transformed with it) → strong view (CCA colour ops on the weak view)
→ teacher (EMA, eval mode) on the weak view, student on the strong view →
``L = λce·CE(Ωc) + λc·KLD(Ωc) + λi·entropy(Ωig) + λcst·consistency(Ωig)`` → optimiser step → EMA update.

Training is target-only. The student starts from `init_checkpoint`; the teacher is a copy of it at the start of
the round (SPEC 1.1). Both are saved at the end (``student_final.pt``, ``teacher_final.pt``); ``state.pt`` makes
a killed round resumable.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from hias_nb import augment, distributed, losses
from hias_nb.classes import IGNORE
from hias_nb.data import SegDataset, resize_label
from hias_nb.errors import InputError
from hias_nb.hpla import HPLA, donor_lists, hard_classes
from hias_nb.io import read_json, read_label
from hias_nb.models import checkpoint_meta, freeze_bn, save_checkpoint
from hias_nb.pseudo_label import load_pseudo_summary
from hias_nb.runs import CsvLog, load_state, prepare_run_dir, resolve_device, save_state
from hias_nb.train import (
    autocast_context,
    crop_heights,
    ema_update,
    infinite_loader,
    load_model,
    lr_factor,
    make_optimizer,
    make_scaler,
    save_due,
    set_lr,
)

__all__ = ["SelfTrainConfig", "PseudoLabelledTarget", "self_training_step", "self_train", "build_hpla"]


@dataclass
class SelfTrainConfig:
    """``hias-nb self-train``: one round. Defaults are toytown's; ``configs/hiast_gta5.yaml`` has the paper's."""

    out: str = "runs/round_1"
    pseudo_dir: str = "runs/pseudo_1"  # output of `hias-nb pseudo-label`
    init_checkpoint: str = "runs/source_only/model_final.pt"  # the student's start (and the teacher's)
    dataset: str = "toytown"
    data_root: str = "data/toytown"
    split: str = "target_train"
    resize: tuple[int, int] | None = None  # image size during training (labels nearest-resized to it, B14)
    iterations: int = 300
    batch_size: int = 16
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"  # SPEC 6.3: Adam, coupled weight decay 5e-4
    lr: float = 1e-4  # backbone; head ×head_lr_mult (paper: 3e-6, 2e-6, 1e-6 per round)
    head_lr_mult: float = 10.0
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "poly", "constant"] = "cosine"
    warmup: int = 0
    freeze_bn: Literal["none", "affine", "full"] = "affine"  # reference: affine frozen, statistics still update
    ema_gamma: float = 0.999
    lambda_ce: float = 1.0
    lambda_kld: float = 0.1  # R_c on the confident region
    lambda_ent: float = 1.0  # R_i on the ignored region
    lambda_cst: float = 0.5  # consistency with the teacher
    cst_region: Literal["ignored", "confident", "all"] = "ignored"
    normalisation: Literal["reference", "pixel"] = "reference"  # SPEC 4 / 5.3 (the 1/C factors) or per pixel
    hpla: bool = True
    hpla_mode: Literal["reference", "intended"] = "reference"
    num_hard: int = 14
    donor_drop_fraction: float = 0.1
    ignored_classes: tuple[int, ...] = ()  # never hard: (9, 14, 16) for SYNTHIA
    strong: bool = True  # the student sees the CCA strong view (False: the weak view)
    crop_size: tuple[int, int] | None = None
    crop_height_range: tuple[int, int] | None = None  # crop height in pixels (SPEC 5.5 rows); None: crop_scale
    crop_scale: tuple[float, float] = (0.6, 1.0)  # crop height as a fraction of the input height
    crop_ratio: float = 2.0
    checkpoint_every: int = 100
    num_workers: int = 0  # DataLoader workers (image reads and HPLA pastes run there)
    stop_after: int | None = None  # leave a resumable state after this many iterations
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    progress: bool = True

    def validate(self) -> None:
        if self.iterations <= 0 or self.batch_size <= 0:
            raise InputError("iterations and batch_size: must be positive")
        if not 0.0 <= self.ema_gamma <= 1.0:
            raise InputError(f"ema_gamma: must be in [0, 1], got {self.ema_gamma}")


class PseudoLabelledTarget(torch.utils.data.Dataset):
    """Target images with their pseudo-labels read back from a ``hias-nb pseudo-label`` folder.

    Items: ``image`` uint8 ``[3,H,W]``, ``label`` int64 ``[H,W]`` (pseudo-label, 255 ignored, nearest-resized
    to the image when generated at another size), ``name``, ``index``.
    """

    def __init__(self, images: SegDataset, pseudo_dir: str | Path) -> None:
        self.images = images
        self.folder = Path(pseudo_dir) / "labels"
        self.index_of = {s.id: i for i, s in enumerate(images.samples)}
        missing = [s.id for s in images.samples if not (self.folder / f"{s.id}.png").exists()]
        if missing:
            raise InputError(f"{self.folder}: no pseudo-label for {len(missing)} image(s), e.g. {missing[0]}.png")

    def __len__(self) -> int:
        return len(self.images)

    def load(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image uint8 [3,H,W], pseudo-label int64 [H,W])`` of the image called `name` (an HPLA donor)."""
        item = self.images[self.index_of[name]]
        label = torch.from_numpy(read_label(self.folder / f"{name}.png"))
        if label.shape != item["image"].shape[1:]:
            label = resize_label(label, tuple(item["image"].shape[1:]))
        return item["image"], label

    def __getitem__(self, i: int) -> dict:
        name = self.images.samples[i].id
        image, label = self.load(name)
        return {"image": image, "label": label, "name": name, "index": i}


class HPLATarget(torch.utils.data.Dataset):
    """`PseudoLabelledTarget` items with HPLA applied in the data pipeline, as the reference does in its dataset
    (SPEC 3.5: per sample, at full resolution, before the views), so that with ``num_workers > 0`` the donor
    reads and pastes run in DataLoader workers, off the training step.

    Keys are ``(position, index)`` pairs (``InfiniteSampler(..., positions=True)``): the paste draws of the
    sample at stream position p come from a generator seeded by ``(seed, p)``, so they are the same for any
    worker count and after a resumption. Items add ``provenance`` int64 ``[H,W]`` (pasted class, 255 elsewhere).
    """

    def __init__(self, target: PseudoLabelledTarget, hpla: HPLA | None, seed: int) -> None:
        self.target, self.hpla, self.seed = target, hpla, seed

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        position, i = key
        item = self.target[i]
        if self.hpla is None:
            item["provenance"] = torch.full_like(item["label"], IGNORE)
            return item
        seed = int(np.random.SeedSequence([self.seed, position]).generate_state(1)[0])
        self.hpla.generator = torch.Generator().manual_seed(seed)
        item["image"], item["label"], item["provenance"] = self.hpla(item["image"], item["label"])
        return item


def build_hpla(
    pseudo_dir: str | Path,
    target: PseudoLabelledTarget,
    num_hard: int,
    ignored: tuple[int, ...],
    mode: str,
    drop_fraction: float,
    generator: torch.Generator | None,
) -> HPLA:
    """HPLA for a round, fixed from the round's generation statistics (SPEC 3.1–3.3)."""
    summary = load_pseudo_summary(pseudo_dir)
    hard, probs = hard_classes(np.asarray(summary["class_values"]), num_hard, ignored=ignored)
    raw = read_json(Path(pseudo_dir) / "donors.json")
    donors = donor_lists({int(c): [(n, int(k)) for n, k in v] for c, v in raw.items()}, drop_fraction)
    return HPLA(hard, probs, donors, target.load, mode=mode, generator=generator)


def self_training_step(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    provenance: torch.Tensor,
    cfg: SelfTrainConfig,
    generator: torch.Generator,
    device: str,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one HIAST iteration on an HPLA-augmented batch (``images`` uint8 ``[B,3,H,W]``, ``labels`` and
    ``provenance`` int64 ``[B,H,W]``, all on `device`). Returns the total loss (with graph) and every term."""
    out_hw = tuple(cfg.crop_size) if cfg.crop_size else tuple(images.shape[-2:])
    h_range = crop_heights(cfg.crop_height_range, cfg.crop_scale, images.shape[-2])
    # Views: the weak view's geometry also moves the pseudo-label and the HPLA provenance mask.
    weak, labels, (provenance,) = augment.weak_view(
        images,
        labels,
        extra_maps=(provenance,),
        out_size=out_hw,
        h_range=h_range,
        ratio=cfg.crop_ratio,
        generator=generator,
    )
    blur_limit = augment.scaled_blur_limit(out_hw)  # the paper's 3..41 px kernels, scaled to the crop size
    strong = augment.strong_view(weak, generator=generator, blur_limit=blur_limit)[0] if cfg.strong else weak

    with torch.no_grad(), autocast_context(device, cfg.amp):
        teacher_probs = teacher(augment.normalize(weak)).float().softmax(1)  # [B,C,H,W], soft target
    with autocast_context(device, cfg.amp):
        logits = student(augment.normalize(strong))  # [B,C,H,W]
    logits = logits.float()

    # CE and R_c on the confident region Ωc, R_i on the ignored region Ωig, consistency on `cst_region`
    ce, kld, ent, cst = losses.hiast_terms(
        logits, teacher_probs, labels, cfg.cst_region, normalisation=cfg.normalisation
    )
    loss = cfg.lambda_ce * ce + cfg.lambda_kld * kld + cfg.lambda_ent * ent + cfg.lambda_cst * cst

    confident = labels != IGNORE
    terms = {
        "loss": loss.item(),
        "ce": ce.item(),
        "kld": kld.item(),
        "entropy": ent.item(),
        "consistency": cst.item(),
        "confident_fraction": confident.float().mean().item(),
        "pasted_fraction": (provenance != IGNORE).float().mean().item(),
    }
    return loss, terms


def self_train(cfg: SelfTrainConfig) -> Path:
    """Run one round; returns the run folder (with ``student_final.pt`` and ``teacher_final.pt``)."""
    device = resolve_device(cfg.device)
    distributed.init_distributed(device)
    out = Path(cfg.out)
    if (out / "teacher_final.pt").exists() and (out / "config.yaml").exists():
        prepare_run_dir(out, cfg)
        print(f"{out}: round already complete; nothing to do")
        return out
    if distributed.is_main():
        prepare_run_dir(out, cfg)
    world = distributed.world_size()
    if cfg.batch_size % world:
        raise InputError(f"batch_size: {cfg.batch_size} does not divide over {world} processes")

    images = SegDataset(cfg.dataset, cfg.data_root, cfg.split, size=cfg.resize)
    target = PseudoLabelledTarget(images, cfg.pseudo_dir)
    meta = checkpoint_meta(cfg.init_checkpoint)
    student = load_model(cfg.init_checkpoint, device, num_classes=images.protocol.num_classes)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1000 * distributed.rank())
    hpla = (
        build_hpla(
            cfg.pseudo_dir,
            target,
            cfg.num_hard,
            tuple(cfg.ignored_classes),
            cfg.hpla_mode,
            cfg.donor_drop_fraction,
            None,  # HPLATarget seeds a generator per sample
        )
        if cfg.hpla
        else None
    )

    freeze_bn(student, cfg.freeze_bn)
    opt = make_optimizer(student, cfg.optimizer, cfg.lr, cfg.head_lr_mult, cfg.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]  # before a resumed state overwrites them
    scaler = make_scaler(device, cfg.amp)
    teacher = copy.deepcopy(student)  # SPEC 1.1: a copy of the student at the start of the round
    start = 0
    state = load_state(out / "state.pt")
    if state is not None:
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        gen.set_state(state["generator"])
        start = int(state["iteration"])
        print(f"{out / 'state.pt'}: resuming at iteration {start}/{cfg.iterations}")
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()  # always eval mode: BN uses the running statistics copied from the student
    net = student
    if world > 1:
        net = nn.parallel.DistributedDataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(student))
    pasted = HPLATarget(target, hpla, cfg.seed + 7)
    loader = iter(
        infinite_loader(
            pasted, cfg.batch_size // world, cfg.seed, start * cfg.batch_size, cfg.num_workers, device, positions=True
        )
    )
    log = CsvLog(out / "log.csv", resume_from=start) if distributed.is_main() else None
    net.train()
    freeze_bn(student, cfg.freeze_bn)
    bar = tqdm(
        total=cfg.iterations,
        initial=start,
        desc=Path(cfg.out).name,
        disable=not (cfg.progress and distributed.is_main()),
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    stop = cfg.iterations if cfg.stop_after is None else min(cfg.iterations, start + cfg.stop_after)
    for it in range(start, stop):
        batch = next(loader)
        imgs, labels, provenance = (batch[k].to(device) for k in ("image", "label", "provenance"))  # HPLA applied

        f = set_lr(opt, base_lrs, lr_factor(it, cfg.iterations, cfg.schedule, cfg.warmup))
        loss, terms = self_training_step(net, teacher, imgs, labels, provenance, cfg, gen, device)
        if not np.isfinite(terms["loss"]):
            raise RuntimeError(f"iteration {it}: loss is {terms['loss']}; terms {terms}")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        ema_update(teacher, student, cfg.ema_gamma)  # after the step, before the LR schedule (SPEC 5.2)

        bar.update(1)
        bar.set_postfix(loss=f"{terms['loss']:.3f}", ce=f"{terms['ce']:.3f}", cst=f"{terms['consistency']:.3f}")
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
                    "student": student.state_dict(),
                    "teacher": teacher.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scaler": scaler.state_dict(),
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
            "round_config": cfg.out,
            "iterations": cfg.iterations,
            "seconds_per_iteration": (time.perf_counter() - t0) / max(cfg.iterations - start, 1),
        }
        save_checkpoint(out / "student_final.pt", student, {**meta, "role": "student"})
        save_checkpoint(out / "teacher_final.pt", teacher, {**meta, "role": "teacher"})
    distributed.barrier()
    return out
