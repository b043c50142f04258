"""One HIAST self-training round (docs/method.md §3–§5, §6.2–§6.3): ``hias-nb self-train``.

`hiast_step` is one iteration, top to bottom: pseudo-labelled target batch (HPLA already applied in the data
pipeline by `HPLATarget`) → weak view (flip + random-sized crop; label and provenance moved with it) → strong view
(CCA colour ops on the weak view) → teacher (EMA, eval mode) on the weak view, student on the strong view →
``L = λce·CE(Ωc) + λkld·R_c(Ωc) + λent·R_i(Ωig) + λcst·consistency(Ωig)`` → optimiser step → EMA update.

Training is target-only. The student starts from `init_checkpoint`; the teacher is a copy of it at the start of
the round (§1.1). Both are saved at the end (``student_final.pt``, ``teacher_final.pt``); folders, resumption,
logging and checkpoints are the shared `hias_nb.runner.run_stage`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hias_nb import augment, distributed, losses
from hias_nb.classes import IGNORE
from hias_nb.config import check_ranges
from hias_nb.data import SegDataset, resize_label
from hias_nb.errors import InputError
from hias_nb.hpla import HPLA, donor_lists, hard_classes
from hias_nb.io import read_json, read_label
from hias_nb.models import checkpoint_meta, freeze_bn, save_checkpoint
from hias_nb.pseudo_label import load_pseudo_summary
from hias_nb.runner import (
    RunSettings,
    autocast_context,
    dataset_identity,
    lr_factor,
    make_optimizer,
    make_scaler,
    rank_generator,
    run_stage,
    set_lr,
    stage_batches,
)
from hias_nb.train import ema_update, load_model

__all__ = [
    "SelfTrainConfig",
    "PseudoLabelledTarget",
    "HPLATarget",
    "check_pseudo_origin",
    "build_hpla",
    "hpla_inputs",
    "round_views",
    "hiast_step",
    "SelfTraining",
    "self_train",
]


@dataclass
class SelfTrainConfig(RunSettings):
    """``hias-nb self-train``: one round. Defaults are toytown's round 1 (what ``hias-nb demo`` runs,
    docs/toytown.md); ``configs/hiast_gta5_round1.yaml`` has the paper's, and comments give the paper's value
    where it differs."""

    out: str = "runs/round_1"
    pseudo_dir: str = "runs/pseudo_1"  # output of `hias-nb pseudo-label`
    init_checkpoint: str = "runs/source_only/model_final.pt"  # the student's start (and the teacher's)
    dataset: str = "toytown"
    data_root: str = "data/toytown"
    split: str = "target_train"
    resize: tuple[int, int] | None = None  # image size during training (labels nearest-resized to it, B14)
    iterations: int = 120  # paper: 8000; longer toytown rounds drift (the EMA teacher peaks early)
    batch_size: int = 16
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"  # docs/method.md §6.3: Adam, coupled weight decay 5e-4
    lr: float = 2e-4  # backbone; head ×head_lr_mult (paper: 3e-6, 2e-6, 1e-6 per round)
    head_lr_mult: float = 1.0  # paper: 10 (an ImageNet backbone); toytown's is trained from scratch
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "poly", "constant"] = "cosine"
    warmup: int = 0
    freeze_bn: Literal["none", "affine", "full"] = "affine"  # reference: affine frozen, statistics still update
    ema_gamma: float = 0.99  # paper: 0.999, for 8000-iteration rounds; toytown's are ~70× shorter
    lambda_ce: float = 1.0
    lambda_kld: float = 0.1  # R_c on the confident region
    lambda_ent: float = 1.0  # R_i on the ignored region
    lambda_cst: float = 0.5  # consistency with the teacher
    cst_region: Literal["ignored", "confident", "all"] = "ignored"
    normalisation: Literal["reference", "pixel"] = (
        "reference"  # docs/method.md §4 / §5.3 (the 1/C factors) or per pixel
    )
    hpla: bool = True
    hpla_mode: Literal["reference", "intended"] = "reference"
    num_hard: int = 14
    donor_drop_fraction: float = 0.1
    ignored_classes: tuple[int, ...] = ()  # never hard: (9, 14, 16) for SYNTHIA
    strong: bool = True  # the student sees the CCA strong view (False: the weak view)
    # Gaussian-blur kernel sizes of the strong view, odd (lo, hi) in pixels; the paper: (3, 41) whatever the crop.
    # None: the paper's range scaled by crop height / 512 (`augment.scaled_blur_limit`; (3, 5) at toytown's 64 rows).
    blur_limit: tuple[int, int] | None = None
    crop_size: tuple[int, int] | None = None
    crop_height_range: tuple[int, int] | None = None  # crop height in pixels (docs/method.md §5.5); None: crop_scale
    crop_scale: tuple[float, float] = (0.6, 1.0)  # crop height as a fraction of the input height
    crop_ratio: float = 2.0
    num_workers: int = 0  # DataLoader workers (image reads and HPLA pastes run there)

    def validate(self) -> None:
        super().validate()
        check_ranges(
            self,
            positive=("head_lr_mult", "crop_ratio"),
            non_negative=("weight_decay", "warmup", "num_workers", "num_hard")
            + ("lambda_ce", "lambda_kld", "lambda_ent", "lambda_cst"),
            unit=("ema_gamma", "donor_drop_fraction"),
            sizes=("resize", "crop_size", "crop_height_range"),
            scale_ranges=("crop_scale",),
        )
        augment.check_crop_fits(self.resize, self.crop_height_range, self.crop_ratio)
        if self.blur_limit is not None:
            lo, hi = self.blur_limit
            if lo < 1 or lo > hi or lo % 2 == 0 or hi % 2 == 0:
                raise InputError(f"blur_limit: expected two odd kernel sizes 1 <= lo <= hi, got {[lo, hi]}")


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
        path = self.folder / f"{name}.png"
        label = torch.from_numpy(read_label(path))
        classes = self.images.protocol.num_classes
        bad = (label >= classes) & (label != IGNORE)
        if bad.any():  # else an index error deep in the loss, or a CUDA device assert
            raise InputError(f"{path}: label: value {int(label[bad][0])} is neither a class (0..{classes - 1}) nor 255")
        if label.shape != item["image"].shape[1:]:
            label = resize_label(label, tuple(item["image"].shape[1:]))
        return item["image"], label

    def __getitem__(self, i: int) -> dict:
        name = self.images.samples[i].id
        image, label = self.load(name)
        return {"image": image, "label": label, "name": name, "index": i}


class HPLATarget(torch.utils.data.Dataset):
    """`PseudoLabelledTarget` items with HPLA applied in the data pipeline, as the reference does in its dataset
    (docs/method.md §3.5: per sample, at full resolution, before the views), so that with ``num_workers > 0`` the donor
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


def check_pseudo_origin(cfg: SelfTrainConfig) -> None:
    """Pseudo-labels are matched to images by name, so they must come from the images this round trains on: the
    same dataset, split and data folder (the pseudo-label folder records them); else `InputError`."""
    made = load_pseudo_summary(cfg.pseudo_dir)
    where = f"pseudo_dir: {cfg.pseudo_dir} holds labels of"
    for key in ("dataset", "split"):
        if made["config"][key] != getattr(cfg, key):
            raise InputError(f"{where} {key} {made['config'][key]!r}, this round trains on {getattr(cfg, key)!r}")
    recorded = made.get("inputs", {})  # what the folder recorded (older folders: data_root only, or nothing)
    now = dataset_identity(cfg.dataset, cfg.data_root, [cfg.split])  # what the labelling recorded, measured again
    if recorded.get("data_root", now["data_root"]) != now["data_root"]:
        root = recorded["data_root"]
        raise InputError(f"{where} the images in {root}, this round trains on those in {cfg.data_root}")
    if recorded.get("data_sha256", now["data_sha256"]) != now["data_sha256"]:  # the same names, other scenes
        raise InputError(f"{where} other images under the same names: {cfg.data_root} changed since they were made")


def build_hpla(
    pseudo_dir: str | Path,
    target: PseudoLabelledTarget,
    num_hard: int,
    ignored: tuple[int, ...],
    mode: str,
    drop_fraction: float,
    generator: torch.Generator | None,
) -> HPLA:
    """HPLA for a round, fixed from the round's generation statistics (docs/method.md §3.1–3.3)."""
    hard, probs, donors = hpla_inputs(pseudo_dir, num_hard, ignored, drop_fraction)
    return HPLA(hard, probs, donors, target.load, mode=mode, generator=generator)


def hpla_inputs(
    pseudo_dir: str | Path, num_hard: int, ignored: tuple[int, ...], drop_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, dict[int, list[str]]]:
    """A round's hard classes ``[K]``, their probabilities ``[C]`` (`hard_classes`) and donor lists
    (`donor_lists`), from its pseudo-label folder's statistics: what `build_hpla` and the notebooks use."""
    summary = load_pseudo_summary(pseudo_dir)
    hard, probs = hard_classes(np.asarray(summary["class_values"]), num_hard, ignored=ignored)
    raw = read_json(Path(pseudo_dir) / "donors.json")
    donors = donor_lists({int(c): [(n, int(k)) for n, k in v] for c, v in raw.items()}, drop_fraction)
    return hard, probs, donors


def round_views(
    cfg: SelfTrainConfig,
    images: torch.Tensor,
    pseudo: torch.Tensor,
    provenance: torch.Tensor | None,
    generator: torch.Generator,
) -> augment.Views:
    """The views of a round (`cfg`'s crop and strong-view settings): what `hiast_step`, the HPLA preview and the
    loss maps see. Shapes as `augment.make_views`."""
    return augment.make_views(
        images, pseudo, provenance, generator=generator, crop_size=cfg.crop_size,
        crop_height_range=cfg.crop_height_range, crop_scale=cfg.crop_scale, crop_ratio=cfg.crop_ratio,
        strong=cfg.strong, blur_limit=cfg.blur_limit,
    )  # fmt: skip


def hiast_step(
    student: nn.Module,
    teacher: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batch: dict[str, torch.Tensor],
    cfg: SelfTrainConfig,
    generator: torch.Generator,
    device: str,
) -> dict[str, float]:
    """One HIAST iteration, top to bottom (docs/method.md §3–§5): views, teacher, student, the four loss terms
    with their regions and normalisers, backward, optimiser step, EMA teacher. Returns every logged term.

    `batch` holds ``image`` uint8 ``[B,3,H,W]``, ``label`` (pseudo-label, 255 = ignored) and ``provenance``
    (HPLA's pasted class, 255 elsewhere) int64 ``[B,H,W]``; `student` may be DDP-wrapped, `teacher` is in eval
    mode with ``requires_grad`` off. The terms equal `losses.target_cross_entropy`, `losses.region_regularization`
    and `losses.consistency` on the same views (tests/test_self_train.py); written out here so a reader sees which
    pixels each term sees and what it is divided by.
    """
    # 1. Batch in. HPLA already pasted hard-class pixels at full resolution in the data pipeline (`HPLATarget`,
    #    run by DataLoader workers), so `images`/`pseudo` are the pasted ones and `provenance` says where.
    images, pseudo, provenance = (batch[k].to(device) for k in ("image", "label", "provenance"))
    # 2. Views: weak (flip + random-sized crop) for the teacher, strong (CCA colour ops on the weak view) for the
    #    student; the pseudo-label and the provenance move with the weak view's geometry.
    v = round_views(cfg, images, pseudo, provenance, generator)
    # 3. Teacher (EMA, eval mode) on the weak view: soft targets q, no graph.
    with torch.no_grad(), autocast_context(device, cfg.amp):
        q = teacher(augment.normalize(v.weak)).float().softmax(1)  # [B,C,h,w]
    # 4. Student on the strong view; one log-softmax in fp32 (autocast would lose the small probabilities).
    with autocast_context(device, cfg.amp):
        logits = student(augment.normalize(v.strong))  # [B,C,h,w]
    log_p = F.log_softmax(logits.float(), dim=1)  # [B,C,h,w]
    num_classes = log_p.shape[1]
    # 5. Regions: Ωc = pixels IAS kept (a pseudo-label), Ωig = pixels it left out; consistency on `cst_region`.
    confident = v.label != IGNORE  # Ωc  [B,h,w]
    ignored = ~confident  # Ωig [B,h,w]
    cst_mask = losses.region_mask(v.label, cfg.cst_region)  # [B,h,w]
    per_class = num_classes if cfg.normalisation == "reference" else 1  # the published code's extra 1/C (§4)
    zero = log_p.new_zeros(())
    # 6. Each term: a masked sum over its region divided by an explicit count (an empty region gives 0, B10).
    nll = -log_p.gather(1, v.label.masked_fill(ignored, 0)[:, None])[:, 0]  # −log p(ŷ_i)  [B,h,w]
    ce = losses.safe_divide(torch.where(confident, nll, zero).sum(), confident.sum())
    kld_map = -log_p.sum(1) / num_classes  # KL(uniform ‖ p_i) up to a constant  [B,h,w]
    kld = losses.safe_divide(torch.where(confident, kld_map, zero).sum(), confident.sum() * per_class)
    entropy_map = -(log_p.exp() * log_p).sum(1)  # H(p_i)  [B,h,w]
    entropy = losses.safe_divide(torch.where(ignored, entropy_map, zero).sum(), ignored.sum() * per_class)
    soft_ce = torch.where(cst_mask[:, None], -q * log_p, zero)  # −q_ic·log p_ic  [B,C,h,w]
    n_cst = (soft_ce != 0).sum() if cfg.normalisation == "reference" else cst_mask.sum()  # §5.3
    consistency = losses.safe_divide(soft_ce.sum(), n_cst)
    loss = cfg.lambda_ce * ce + cfg.lambda_kld * kld + cfg.lambda_ent * entropy + cfg.lambda_cst * consistency
    # 7. Backward and step: only the student has a graph (q was computed without one).
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    # 8. Mean teacher: after the step, before the next learning-rate change (§5.2).
    ema_update(teacher, student, cfg.ema_gamma)
    return {
        "loss": loss.item(),
        "ce": ce.item(),
        "kld": kld.item(),
        "entropy": entropy.item(),
        "consistency": consistency.item(),
        "confident_fraction": confident.float().mean().item(),
        "pasted_fraction": (v.provenance != IGNORE).float().mean().item(),
    }


class SelfTraining:
    """One round for `run_stage`: the student, its EMA teacher (a copy of the student at the start, §1.1) and
    the student's optimiser; the data stream is the pseudo-labelled target with HPLA applied."""

    postfix = ("loss", "ce", "consistency")

    def __init__(self, cfg: SelfTrainConfig, device: str, start: int) -> None:
        self.cfg, self.device = cfg, device
        images = SegDataset(cfg.dataset, cfg.data_root, cfg.split, size=cfg.resize)
        check_pseudo_origin(cfg)
        target = PseudoLabelledTarget(images, cfg.pseudo_dir)
        self.meta = checkpoint_meta(cfg.init_checkpoint)
        self.student = load_model(cfg.init_checkpoint, device, num_classes=images.protocol.num_classes)
        torch.manual_seed(cfg.seed)
        self.gen = rank_generator(device, cfg.seed)
        hpla = None
        if cfg.hpla:  # HPLATarget seeds a generator per sample, so HPLA gets none here
            args = (cfg.num_hard, tuple(cfg.ignored_classes), cfg.hpla_mode, cfg.donor_drop_fraction, None)
            hpla = build_hpla(cfg.pseudo_dir, target, *args)
        freeze_bn(self.student, cfg.freeze_bn)
        self.opt = make_optimizer(self.student, cfg.optimizer, cfg.lr, cfg.head_lr_mult, cfg.weight_decay)
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]  # before a resumed state overwrites them
        self.scaler = make_scaler(device, cfg.amp)
        self.teacher = copy.deepcopy(self.student)
        self.parts = {
            "student": self.student,
            "teacher": self.teacher,
            "optimizer": self.opt,
            "scaler": self.scaler,
            "generator": self.gen,
        }
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()  # always: BN uses the running statistics copied from the student
        self.net = distributed.wrap(self.student)
        self.net.train()
        freeze_bn(self.student, cfg.freeze_bn)
        pasted = HPLATarget(target, hpla, cfg.seed + 7)
        self.batches = stage_batches(pasted, cfg, start, device, cfg.seed, cfg.num_workers, positions=True)

    def step(self, it: int) -> dict[str, float]:
        cfg = self.cfg
        lr = set_lr(self.opt, self.base_lrs, lr_factor(it, cfg.iterations, cfg.schedule, cfg.warmup))
        terms = hiast_step(
            self.net, self.teacher, self.opt, self.scaler, next(self.batches), cfg, self.gen, self.device
        )
        return {**terms, "lr": lr}

    def finish(self, out: Path, timing: dict[str, Any]) -> None:
        meta = {**self.meta, "round_config": self.cfg.out, **timing}
        save_checkpoint(out / "student_final.pt", self.student, {**meta, "role": "student"})
        save_checkpoint(out / "teacher_final.pt", self.teacher, {**meta, "role": "teacher"})  # marks completion


def self_train(cfg: SelfTrainConfig) -> Path:
    """Run one round; returns the run folder (with ``student_final.pt`` and ``teacher_final.pt``). Resumable."""
    return run_stage(
        cfg, Path(cfg.out).name, "teacher_final.pt", lambda device, start: SelfTraining(cfg, device, start)
    )
