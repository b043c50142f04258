"""Evaluation on a labelled split: confusion-matrix mIoU, per-class IoU, ``report.json`` (its layout:
docs/architecture.md, “report.json”).

Prediction (docs/method.md §6.4): the normalised image is resized (bilinear, align_corners=True) to each evaluation
scale, the logits are upsampled back to the label size and their softmaxes summed over scales; ``flip`` adds the
softmax of the mirrored image. With one scale of 1.0 and no flip this is a plain forward pass.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hias_nb import __version__, augment, distributed
from hias_nb.classes import IGNORE, Protocol, get_protocol
from hias_nb.errors import InputError
from hias_nb.io import file_sha256, read_json, write_json
from hias_nb.metrics import ConfusionMatrix, iou_per_class, iou_table, mean_iou
from hias_nb.model_selection import LabelFreeScores
from hias_nb.runner import dataset_identity
from hias_nb.train import load_model

__all__ = [
    "EvalResult",
    "predict_probs",
    "evaluate",
    "evaluate_by_severity",
    "stage_entry",
    "evaluate_stage",
    "protocol_mious",
    "check_protocols",
    "default_eval_size",
    "CITYSCAPES_EVAL_SIZE",
    "write_report",
    "versions",
    "report_table",
]


# The reference evaluates Cityscapes at one scale of 768×1536 (logits upsampled to the 1024×2048 labels).
CITYSCAPES_EVAL_SIZE: tuple[int, int] = (768, 1536)


def default_eval_size(dataset: str) -> tuple[int, int] | None:
    """The base evaluation size of `dataset` when none is given: Cityscapes the reference's, others full size."""
    return CITYSCAPES_EVAL_SIZE if dataset == "cityscapes" else None


@dataclass
class EvalResult:
    """A split's confusion matrix and what follows from it (IoU in percent, None for absent classes)."""

    protocol: Protocol
    matrix: np.ndarray
    seconds: float
    label_free: dict[str, float] = field(default_factory=dict)  # hias_nb.model_selection scores (no labels used)

    @property
    def per_class(self) -> list[float | None]:
        return iou_per_class(self.matrix)

    @property
    def miou(self) -> float:
        return mean_iou(self.per_class, self.protocol.evaluated)

    def table(self, name: str = "IoU") -> pd.DataFrame:
        return iou_table({name: self.per_class}, self.protocol)


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    images: torch.Tensor,
    scales: tuple[float, ...] = (1.0,),
    flip: bool = False,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Softmax summed over scales (and flips) for uint8-valued ``[B,3,H,W]`` images → ``[B,C,H,W]`` at the input size.

    `size` (H, W) is the base evaluation size the scales multiply (default: the input size).
    """
    x = augment.normalize(images)
    h, w = x.shape[-2:]
    bh, bw = size if size is not None else (h, w)
    total = None
    for s in scales:
        sh, sw = max(8, round(bh * s)), max(8, round(bw * s))
        xs = x if (sh, sw) == (h, w) else F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=True)
        for flipped in (False, True) if flip else (False,):
            inp = xs.flip(-1) if flipped else xs
            logits = model(inp).float()
            if flipped:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=True)
            p = logits.softmax(1)
            total = p if total is None else total + p
    return total / (len(scales) * (2 if flip else 1))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    protocol: Protocol,
    device: str,
    batch_size: int = 16,
    scales: tuple[float, ...] = (1.0,),
    flip: bool = False,
    size: tuple[int, int] | None = None,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "evaluate",
) -> EvalResult:
    """Accumulate the confusion matrix of `model` over `dataset` (items with ``image`` and ``label``)."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(protocol.num_classes)
    scores = LabelFreeScores(seed=distributed.rank())
    if distributed.world_size() > 1:  # every image exactly once: rank r takes r, r + world, ... (no padding)
        dataset = torch.utils.data.Subset(dataset, range(distributed.rank(), len(dataset), distributed.world_size()))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for batch in tqdm(
        loader, desc=desc, disable=not (progress and distributed.is_main()), leave=False, dynamic_ncols=True
    ):
        images = batch["image"].to(device)
        probs = predict_probs(model, images, scales, flip, size)
        cm.update(probs.argmax(1), batch["label"].to(device))
        scores.update(probs)
    matrix = torch.from_numpy(cm.matrix).to(device)
    cm.matrix = distributed.all_reduce_sum(matrix).cpu().numpy()
    label_free = LabelFreeScores.from_totals(distributed.all_reduce_sum(scores.totals().to(device)).cpu())
    model.train(was_training)
    return EvalResult(protocol, cm.matrix, time.perf_counter() - t0, label_free)


@torch.no_grad()
def evaluate_by_severity(
    model: nn.Module,
    severities: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
    images: int = 100,
    size: tuple[int, int] = (64, 128),
    seed: int = 10_000,
    confident: float = 0.9,
    device: str = "cpu",
    batch_size: int = 25,
) -> pd.DataFrame:
    """How a model fares on toytown target scenes rendered at fixed shift severities (a diagnostic of where the
    domain gap lives: self-training can only learn from pixels it labels correctly and confidently).

    The same `images` scenes (seeds ``seed .. seed+images-1``, not in any toytown split) are rendered at each
    severity, so rows differ only in the appearance shift. Returns one row per severity: ``miou``,
    ``pixel_accuracy``, ``confident_fraction`` (labelled pixels with max-probability ≥ `confident`) and
    ``confident_accuracy`` (accuracy on those; NaN when there are none), in percent.
    """
    from hias_nb.classes import get_protocol
    from hias_nb.data.toytown import render_scene

    protocol = get_protocol("cityscapes19")
    was_training = model.training
    model.eval()
    rows = []
    for severity in severities:
        cm = ConfusionMatrix(protocol.num_classes)
        n_valid = n_right = n_conf = n_conf_right = 0
        for start in range(0, images, batch_size):
            scenes = [
                render_scene(np.random.default_rng(seed + i), "target", size, severity=float(severity))
                for i in range(start, min(images, start + batch_size))
            ]
            x = torch.from_numpy(np.stack([im for im, _ in scenes])).permute(0, 3, 1, 2).to(device)
            y = torch.from_numpy(np.stack([lb for _, lb in scenes]).astype(np.int64)).to(device)
            conf, pred = predict_probs(model, x).max(1)
            cm.update(pred, y)
            valid = y != IGNORE
            right = (pred == y) & valid
            sure = (conf >= confident) & valid
            n_valid += int(valid.sum())
            n_right += int(right.sum())
            n_conf += int(sure.sum())
            n_conf_right += int((right & sure).sum())
        rows.append(
            {
                "severity": float(severity),
                "miou": mean_iou(iou_per_class(cm.matrix), protocol.evaluated),
                "pixel_accuracy": 100.0 * n_right / max(n_valid, 1),
                "confident_fraction": 100.0 * n_conf / max(n_valid, 1),
                "confident_accuracy": 100.0 * n_conf_right / n_conf if n_conf else float("nan"),
            }
        )
    model.train(was_training)
    return pd.DataFrame(rows)


def stage_entry(name: str, result: EvalResult, **extra: Any) -> dict[str, Any]:
    """One element of ``report["stages"]`` (docs/architecture.md, “report.json”): name, mIoU and per-class IoU
    in percent."""
    per = result.per_class
    entry = {
        "name": name,
        "miou": round(result.miou, 2),
        "per_class": {
            result.protocol.classes[c]: None if per[c] is None else round(per[c], 2) for c in result.protocol.evaluated
        },
        "label_free": result.label_free,
    }
    entry.update(extra)
    return entry


def check_protocols(names: Sequence[str], base: Protocol) -> list[Protocol]:
    """The named protocols, each over `base`'s class list (e.g. synthia16 and synthia13 over Cityscapes' 19
    classes); an unknown name or another class list is an `InputError` naming the protocol."""
    out = []
    for name in names:
        p = get_protocol(name)
        if p.classes != base.classes:
            raise InputError(
                f"protocol: {name} is over {p.num_classes} classes ({p.classes[0]}, ...), the model and the "
                f"dataset ({base.name}) over {base.num_classes} ({base.classes[0]}, ...)"
            )
        out.append(p)
    return out


def protocol_mious(result: EvalResult, names: Sequence[str]) -> dict[str, float]:
    """The mean IoU of `result`'s confusion matrix under each named protocol (`check_protocols`): SYNTHIA→
    Cityscapes reports its 16- and 13-class means from one 19-class evaluation."""
    return {p.name: round(mean_iou(result.per_class, p.evaluated), 2) for p in check_protocols(names, result.protocol)}


def evaluate_stage(
    path: str | Path,
    name: str,
    checkpoint: str | Path,
    ds,
    device: str,
    protocols: Sequence[str] = (),
    **settings: Any,
) -> dict[str, Any]:
    """Evaluate the model in `checkpoint` on `ds` and cache its `stage_entry` as JSON at `path`, so that a resumed
    run does not evaluate again; `protocols` add ``miou_by_protocol``; `settings` go to `evaluate` (batch_size,
    scales, ...). The cache records what it was computed from (the checkpoint's sha256, the data's identity, the
    protocols and settings) and is used only when all of them are the same: a checkpoint replaced or data
    regenerated since is evaluated again, never reported from the old file."""
    path = Path(path)
    key = {
        "checkpoint_sha256": file_sha256(checkpoint),
        **dataset_identity(ds.manifest, ds.root, [ds.split]),
        "split": ds.split,
        "size": ds.size,
        "protocols": list(protocols),
        "settings": settings,
    }
    key = json.loads(json.dumps(key))  # tuples as lists, as the cache file holds them
    if path.exists():
        cached = read_json(path)
        if isinstance(cached, dict) and cached.pop("cache_key", None) == key:
            return cached
        if distributed.is_main():
            print(f"{path}: computed from another checkpoint, data or settings; evaluating {name} again")
    protocol = check_protocols(protocols, ds.protocol)[0] if protocols else ds.protocol  # the first leads
    model = load_model(checkpoint, device)
    result = evaluate(model, ds, protocol, device, desc=f"evaluate {name}", **settings)
    extra = {"miou_by_protocol": protocol_mious(result, protocols)} if protocols else {}
    entry = stage_entry(name, result, **extra)
    if distributed.is_main():  # under torchrun every process holds the summed result; one writes it
        write_json(path, {**entry, "cache_key": key})
    return entry


def versions() -> dict[str, str]:
    import timm  # local: importing timm costs a second

    return {
        "hias_nb": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def write_report(
    path: str | Path,
    protocol: Protocol,
    stages: list[dict[str, Any]],
    wall_seconds: float,
    config: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """Write ``report.json`` atomically in the layout of docs/architecture.md (“report.json”) and return it."""
    report = {
        "protocol": protocol.name,
        "classes": [protocol.classes[c] for c in protocol.evaluated],
        "stages": stages,
        "wall_seconds": round(wall_seconds, 1),
        "config": config,
        "versions": versions(),
    }
    report.update(extra)
    write_json(path, report)
    return report


def report_table(report: dict[str, Any]) -> pd.DataFrame:
    """Per-class IoU table of a report: one row per class plus ``mIoU``, one column per stage."""
    df = pd.DataFrame({s["name"]: pd.Series(s["per_class"], dtype=float) for s in report["stages"]})
    df.loc["mIoU"] = [s["miou"] for s in report["stages"]]
    return df
