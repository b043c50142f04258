"""Figures and the computations behind the notebook series (matplotlib object API only: importable and usable
without a display; no `matplotlib.use`, no pyplot state).

Each function reads the files a run writes (``report.json``, ``log.csv``, the pseudo-label folder of SPEC.md
section 2.6, checkpoints) or takes arrays, and returns a ``Figure`` or a pandas table, so the notebooks hold
narrative and calls only. Sections follow the notebooks: 1 source training and the domain gap (calibration),
2 pseudo-labels and the IAS thresholds (SPEC 2.2-2.3), 3 hard classes (SPEC 3.1-3.2), 4 region-adaptive
regularisation and consistency (SPEC 4, 5.3), 5 stages side by side, 6 datasets and published checkpoints
(SPEC 6.6).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from hias_nb import augment, losses
from hias_nb.classes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, IGNORE, colorize
from hias_nb.data import SegDataset, list_manifests, load_manifest
from hias_nb.errors import InputError
from hias_nb.evaluate import EvalResult, evaluate, predict_probs, stage_entry
from hias_nb.io import atomic_path, read_label, read_rgb
from hias_nb.pseudo_label import summary_table
from hias_nb.train import load_model

__all__ = [
    "overlay",
    "toytown_grid",
    "stage_iou_bars",
    # notebook 1
    "class_frequencies",
    "class_frequency_bars",
    "read_log",
    "loss_curves",
    "collect_predictions",
    "calibration_table",
    "expected_calibration_error",
    "class_calibration",
    "reliability_diagram",
    "split_iou_report",
    # notebook 2
    "threshold_matrix",
    "draw_threshold_curves",
    "threshold_curves",
    "keep_fraction_table",
    "keep_fraction_plot",
    "pseudo_label_table",
    "pseudo_quality_bars",
    "selection_map",
    "pseudo_label_gallery",
    # notebook 3
    "class_value_bars",
    # notebook 4
    "LOSS_TERMS",
    "loss_maps",
    "total_loss_map",
    "loss_map_figure",
    "ABLATION_COLUMNS",
    "load_ablation",
    "ablation_summary",
    "ablation_plot",
    # notebook 5
    "stage_checkpoints",
    "stage_confusions",
    "checkpoint_report",
    "confusion_figure",
    "prediction_gallery",
    "gap_table",
    "student_teacher_table",
    # notebook 6
    "manifest_table",
    "write_published_layout",
]


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5, palette: np.ndarray = CITYSCAPES_PALETTE):
    """Blend a label map `[H,W]` (class colours; ignored pixels stay unblended) over an image `[H,W,3]`."""
    colours = colorize(label, palette).astype(np.float32)
    keep = (np.asarray(label) < len(palette))[..., None]
    out = np.where(keep, (1 - alpha) * image.astype(np.float32) + alpha * colours, image.astype(np.float32))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def toytown_grid(root: str | os.PathLike, n: int = 4, split: str = "train") -> Figure:
    """`n` rows of toytown samples: source image, its label overlay, target image, its label overlay.

    Reads `root/{source,target}/{split}/{images,labels}/*.png` (the first `n` of each); shows the class-colour
    legend of the 19 classes below the grid.
    """
    root = Path(root)
    rows = []
    for domain in ("source", "target"):
        folder = root / domain / split
        names = sorted(p.name for p in (folder / "images").glob("*.png"))[:n]
        if len(names) < n:
            raise InputError(f"{folder / 'images'}: expected at least {n} toytown images, found {len(names)}")
        rows.append([(read_rgb(folder / "images" / k), read_label(folder / "labels" / k)) for k in names])
    h, w = rows[0][0][0].shape[:2]
    fig = Figure(figsize=(4 * 2.2 * w / h * 0.55, n * 1.2 + 1.1), dpi=100, layout="constrained")
    axes = fig.subplots(n, 4, squeeze=False)
    titles = ("source (game-like)", "source labels", "target (photo-like)", "target labels")
    for r in range(n):
        for c, (domain_rows, show_label) in enumerate(((rows[0], False), (rows[0], True), (rows[1], False),
                                                       (rows[1], True))):  # fmt: skip
            image, label = domain_rows[r]
            ax = axes[r, c]
            ax.imshow(overlay(image, label, 0.6) if show_label else image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
    handles = [Patch(facecolor=CITYSCAPES_PALETTE[k] / 255.0, label=name) for k, name in enumerate(CITYSCAPES_CLASSES)]
    fig.legend(handles=handles, loc="outside lower center", ncol=7, fontsize=7, frameon=False)
    fig.suptitle(f"toytown samples ({root.name}, {split})", fontsize=10)
    return fig


def stage_iou_bars(report: dict, stages: list[str] | None = None, title: str | None = None) -> Figure:
    """Grouped bars of per-class IoU, one bar per stage of a ``report.json`` (CONTRACT.md), mIoU in the legend.

    Bars of a class absent from both prediction and ground truth (IoU ``None``) are left empty.
    """
    entries = [s for s in report["stages"] if stages is None or s["name"] in stages]
    classes = report["classes"]
    fig = Figure(figsize=(max(8, 0.55 * len(classes)), 4.2))
    ax = fig.subplots()
    width = 0.8 / max(len(entries), 1)
    x = np.arange(len(classes))
    for i, s in enumerate(entries):
        vals = [np.nan if s["per_class"][c] is None else s["per_class"][c] for c in classes]
        ax.bar(x + (i - (len(entries) - 1) / 2) * width, vals, width, label=f"{s['name']} ({s['miou']:.1f})")
    ax.set_xticks(x, classes, rotation=60, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    default = f"Per-class IoU on the target validation split ({report['protocol']}); mIoU in brackets"
    ax.set_title(title or default)
    ax.legend(fontsize=8, ncols=min(len(entries), 4), loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers


def _class_colours(classes: Sequence[str], palette: np.ndarray = CITYSCAPES_PALETTE) -> list[tuple[float, ...]]:
    """Matplotlib colours of the classes (the protocol palette, cycled if a protocol has more classes)."""
    return [tuple(palette[k % len(palette)] / 255.0) for k in range(len(classes))]


def _no_ticks(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _nan_if_none(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------------
# Notebook 1: the two domains, training curves, domain gap, calibration


def class_frequencies(
    root: str | os.PathLike,
    splits: Sequence[str] = ("source_train", "target_train"),
    max_images: int = 200,
    dataset: str = "toytown",
) -> pd.DataFrame:
    """Share of labelled pixels per class (0..1) in the first ``max_images`` labels of each split.

    Returns a DataFrame indexed by class name with one column per split (each column sums to 1 unless the
    split has no labelled pixel, then it is all NaN).
    """
    columns = {}
    classes: tuple[str, ...] = ()
    for split in splits:
        ds = SegDataset(dataset, root, split)
        classes = ds.protocol.classes
        counts = np.zeros(len(classes), dtype=np.int64)
        for i in range(min(max_images, len(ds))):
            label = ds[i]["label"].reshape(-1)
            counts += torch.bincount(label[label != IGNORE], minlength=len(classes)).numpy()[: len(classes)]
        total = counts.sum()
        columns[split] = counts / total if total else np.full(len(classes), np.nan)
    return pd.DataFrame(columns, index=pd.Index(list(classes), name="class"))


def class_frequency_bars(freq: pd.DataFrame) -> Figure:
    """Grouped bars of ``class_frequencies`` (log scale: the rare classes are the interesting ones)."""
    fig = Figure(figsize=(max(8, 0.5 * len(freq)), 3.8), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(freq))
    width = 0.8 / max(len(freq.columns), 1)
    for i, split in enumerate(freq.columns):
        ax.bar(x + (i - (len(freq.columns) - 1) / 2) * width, freq[split].to_numpy() * 100, width, label=split)
    ax.set_xticks(x, list(freq.index), rotation=60, ha="right")
    for tick, colour in zip(ax.get_xticklabels(), _class_colours(list(freq.index)), strict=True):
        tick.set_color(tuple(0.8 * c for c in colour))
    ax.set_yscale("log")
    ax.set_ylabel("share of labelled pixels (%)")
    ax.set_title("Class frequencies per domain (log scale)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def read_log(path: str | os.PathLike) -> pd.DataFrame:
    """A run's ``log.csv`` (one row per iteration) as a DataFrame; `InputError` when it is missing."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no training log here")
    return pd.read_csv(path)


def loss_curves(
    log: pd.DataFrame, columns: Sequence[str] | None = None, smooth: int = 1, title: str = "Training loss"
) -> Figure:
    """Loss terms against ``iteration`` (one line per column; default every column named like a loss term).

    ``smooth`` > 1 draws a centred rolling mean over that many iterations on top of the faint raw values.
    """
    if columns is None:
        skip = {"iteration", "lr", "seconds", "confident_fraction", "pasted_fraction"}
        columns = [c for c in log.columns if c not in skip]
    missing = [c for c in columns if c not in log.columns]
    if missing:
        raise InputError(f"log: no column(s) {missing}; available: {list(log.columns)}")
    fig = Figure(figsize=(7, 3.4), layout="constrained")
    ax = fig.subplots()
    for c in columns:
        (line,) = ax.plot(log["iteration"], log[c], alpha=0.35 if smooth > 1 else 1.0, lw=1, label=c)
        if smooth > 1:
            ax.plot(log["iteration"], log[c].rolling(smooth, center=True, min_periods=1).mean(), color=line.get_color())
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=8, ncols=min(len(columns), 4))
    ax.grid(alpha=0.3)
    return fig


@torch.no_grad()
def collect_predictions(
    model: torch.nn.Module, dataset, device: str, max_images: int = 64, batch_size: int = 16
) -> dict[str, np.ndarray]:
    """Confidence, prediction and ground truth of `model` on the first ``max_images`` items of `dataset`.

    Returns ``conf`` float32 ``[N,H,W]`` (max softmax), ``pred`` and ``gt`` int64 ``[N,H,W]`` and ``image``
    uint8 ``[N,H,W,3]``.
    """
    model.eval()
    out: dict[str, list[np.ndarray]] = {"conf": [], "pred": [], "gt": [], "image": []}
    n = min(max_images, len(dataset))
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, n))]
        images = torch.stack([it["image"] for it in items]).to(device)
        conf, pred = predict_probs(model, images).max(1)
        out["conf"].append(conf.float().cpu().numpy())
        out["pred"].append(pred.cpu().numpy())
        out["gt"].append(torch.stack([it["label"] for it in items]).numpy())
        out["image"].append(images.permute(0, 2, 3, 1).cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def calibration_table(conf: np.ndarray, pred: np.ndarray, gt: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Reliability table over pixels with a label: per confidence bin ``[lo, hi)`` (the last bin closed),
    ``pixels``, ``mean_conf`` and ``accuracy`` (share of pixels whose prediction equals the label).
    The expected calibration error is ``sum(pixels * |accuracy - mean_conf|) / sum(pixels)``."""
    conf, pred, gt = (np.asarray(a).reshape(-1) for a in (conf, pred, gt))
    valid = gt != IGNORE
    conf, correct = conf[valid].astype(np.float64), (pred[valid] == gt[valid])
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, bins - 1)
    pixels = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=bins) / pixels
        accuracy = np.bincount(idx, weights=correct, minlength=bins) / pixels
    return pd.DataFrame({"lo": edges[:-1], "hi": edges[1:], "pixels": pixels, "mean_conf": mean_conf,
                         "accuracy": accuracy})  # fmt: skip


def expected_calibration_error(table: pd.DataFrame) -> float:
    """ECE of a ``calibration_table`` (pixel-weighted mean gap between accuracy and confidence)."""
    used = table["pixels"] > 0
    t = table[used]
    return float((t["pixels"] * (t["accuracy"] - t["mean_conf"]).abs()).sum() / max(t["pixels"].sum(), 1))


def class_calibration(
    conf: np.ndarray, pred: np.ndarray, gt: np.ndarray, classes: Sequence[str], bins: int = 10
) -> pd.DataFrame:
    """Per *predicted* class (pixels with a label): ``pixels``, ``mean_conf``, ``accuracy`` (precision of the
    prediction) and ``ece`` (of that class's own reliability table); NaN for a class never predicted."""
    conf, pred, gt = (np.asarray(a).reshape(-1) for a in (conf, pred, gt))
    rows = []
    for c, name in enumerate(classes):
        sel = pred == c
        t = calibration_table(conf[sel], pred[sel], gt[sel], bins)
        n = int(t["pixels"].sum())
        valid = sel & (gt != IGNORE)
        rows.append({
            "class": name,
            "pixels": n,
            "mean_conf": float(conf[valid].mean()) if n else np.nan,
            "accuracy": float((gt[valid] == c).mean()) if n else np.nan,
            "ece": expected_calibration_error(t) if n else np.nan,
        })  # fmt: skip
    return pd.DataFrame(rows).set_index("class")


def reliability_diagram(table: pd.DataFrame, per_class: pd.DataFrame | None = None, title: str = "") -> Figure:
    """Left: accuracy per confidence bin against the diagonal (ECE in the title). Right (with `per_class`):
    mean confidence vs accuracy per predicted class: bars above their marker are over-confident classes."""
    fig = Figure(figsize=(12 if per_class is not None else 4.5, 4), layout="constrained")
    axes = fig.subplots(1, 2 if per_class is not None else 1, squeeze=False, width_ratios=None)[0]
    ax = axes[0]
    centres = (table["lo"] + table["hi"]) / 2
    ax.bar(centres, table["accuracy"].fillna(0), width=(table["hi"] - table["lo"]) * 0.9, color="#4c72b0",
           label="accuracy")  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.plot(centres, table["mean_conf"], "o", color="#dd8452", ms=4, label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max softmax)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability {title} (ECE {100 * expected_calibration_error(table):.1f}%)".replace("  ", " "))
    ax.legend(fontsize=8, loc="upper left")
    if per_class is not None:
        ax = axes[1]
        x = np.arange(len(per_class))
        ax.bar(x, per_class["mean_conf"], color=_class_colours(list(per_class.index)), edgecolor="k", lw=0.3,
               label="mean confidence")  # fmt: skip
        ax.plot(x, per_class["accuracy"], "k_", ms=12, mew=2, label="accuracy (precision)")
        ax.set_xticks(x, list(per_class.index), rotation=60, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("per predicted class")
        ax.set_title("Confidence vs accuracy per class: bar above the marker = over-confident")
        ax.legend(fontsize=8, loc="lower right")
    return fig


def split_iou_report(
    model: torch.nn.Module,
    root: str | os.PathLike,
    splits: Sequence[str],
    device: str,
    dataset: str = "toytown",
    max_images: int | None = None,
) -> dict:
    """Evaluate `model` on several splits (the first ``max_images`` of each when given); a report-like dict
    (``classes``, ``protocol``, one stage per split) that ``stage_iou_bars`` draws (e.g. source_val vs
    target_val: the domain gap)."""
    stages, protocol = [], None
    for split in splits:
        ds = SegDataset(dataset, root, split)
        protocol = ds.protocol
        part = ds if max_images is None else torch.utils.data.Subset(ds, range(min(max_images, len(ds))))
        stages.append(stage_entry(split, evaluate(model, part, protocol, device, progress=False)))
    return {"protocol": protocol.name, "classes": list(protocol.classes), "stages": stages}


# ---------------------------------------------------------------------------------------------------------------
# Notebook 2: pseudo-labels and the evolution of the IAS thresholds


def threshold_matrix(pseudo_dir: str | os.PathLike) -> np.ndarray:
    """IAS thresholds after each instance, float64 ``[n_instances, C]``, from ``thresholds.parquet``."""
    path = Path(pseudo_dir) / "thresholds.parquet"
    if not path.exists():
        raise InputError(f"{path}: no threshold history (only the IAS policy writes one)")
    hist = pd.read_parquet(path)
    return hist.pivot(index="instance", columns="class", values="threshold").sort_index().to_numpy(np.float64)


def draw_threshold_curves(
    ax,
    thresholds: np.ndarray,
    classes: Sequence[str],
    hard: Sequence[int] = (),
    cbst: np.ndarray | None = None,
    constant: float | None = None,
) -> list:
    """Draw one IAS threshold line per class on `ax` (hard classes bold, others faint), CBST thresholds as
    dotted levels at the right edge and the constant threshold as a dashed line. Returns the IAS lines (one
    per class, in class order), so a widget can update them with ``set_data``."""
    n = thresholds.shape[0]
    x = np.arange(1, n + 1)
    colours = _class_colours(classes)
    hard = set(int(h) for h in hard)
    lines = []
    for c, name in enumerate(classes):
        is_hard = c in hard
        (line,) = ax.plot(x, thresholds[:, c], color=colours[c], lw=2.0 if is_hard else 0.9,
                          alpha=1.0 if is_hard else 0.45, label=name + (" (hard)" if is_hard else ""))  # fmt: skip
        lines.append(line)
        if cbst is not None and cbst[c] < 1.0:
            ax.plot([n * 1.01, n * 1.06], [cbst[c]] * 2, color=colours[c], lw=2, ls=":")
    if constant is not None:
        ax.axhline(constant, color="k", ls="--", lw=1, label=f"constant {constant:g}")
    ax.set_xlabel("instance (pseudo-label batch, in visiting order)")
    ax.set_ylabel("threshold θ_c")
    ax.set_ylim(min(0.0, float(np.nanmin(thresholds)) - 0.02) if thresholds.size else 0, 1.0)
    ax.grid(alpha=0.3)
    return lines


def threshold_curves(
    thresholds: np.ndarray,
    classes: Sequence[str],
    hard: Sequence[int] = (),
    cbst: np.ndarray | None = None,
    constant: float | None = None,
    title: str = "IAS thresholds over the target stream",
) -> Figure:
    """Figure of ``draw_threshold_curves`` with a class legend (CBST levels dotted at the right edge)."""
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ax = fig.subplots()
    draw_threshold_curves(ax, thresholds, classes, hard, cbst, constant)
    suffix = "; dotted ticks at the right: CBST" if cbst is not None else ""
    ax.set_title(title + suffix)
    ax.legend(fontsize=7, ncols=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def keep_fraction_table(history: pd.DataFrame, alpha: float, gamma: float, init: float = 0.9) -> pd.DataFrame:
    """Per (instance, class) with predicted pixels: the threshold before the instance (``prev_threshold``),
    the keep fraction IAS aims at, ``alpha * prev**gamma`` (``target_keep``), and the realised one,
    ``selected_pixels / predicted_pixels`` (``kept``). `history` is ``IAS.history`` / ``thresholds.parquet``."""
    h = history.sort_values(["class", "instance"]).copy()
    h["prev_threshold"] = h.groupby("class")["threshold"].shift(1).fillna(init)
    h = h[h["predicted_pixels"] > 0].copy()
    h["target_keep"] = np.minimum(alpha * h["prev_threshold"] ** gamma, 1.0)
    h["kept"] = h["selected_pixels"] / h["predicted_pixels"]
    return h.sort_values(["instance", "class"]).reset_index(drop=True)


def keep_fraction_plot(table: pd.DataFrame, classes: Sequence[str]) -> Figure:
    """Realised keep fraction against ``alpha * theta**gamma`` per (instance, class), class colours."""
    fig = Figure(figsize=(5.2, 4.4), layout="constrained")
    ax = fig.subplots()
    colours = np.array(_class_colours(classes))
    ax.scatter(table["target_keep"], table["kept"], s=6, c=colours[table["class"].to_numpy()], alpha=0.6)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("target keep fraction α·θ^γ")
    ax.set_ylabel("kept fraction (selected / predicted)")
    ax.set_title("IAS keeps about α·θ^γ of each class's pixels")
    return fig


def pseudo_label_table(pseudo_dir: str | os.PathLike) -> pd.DataFrame:
    """Per-class table of a pseudo-label folder: ``summary_table`` (threshold, class value, predicted pixels,
    kept fraction, precision, recall against the held-back labels) plus ``selected_px`` and ``gt_px``."""
    folder = Path(pseudo_dir)
    table = summary_table(folder)
    stats = pd.read_parquet(folder / "stats.parquet")
    per = stats.groupby("class").sum(numeric_only=True).reindex(range(len(table)), fill_value=0)
    table.insert(3, "selected_px", per["selected_pixels"].to_numpy())
    if "gt_pixels" in per:
        table["gt_px"] = per["gt_pixels"].to_numpy()
    return table


def pseudo_quality_bars(table: pd.DataFrame) -> Figure:
    """Precision and recall of the pseudo-labels per class (needs a ``pseudo_label_table`` with ground truth),
    and the kept fraction of the predicted pixels."""
    if "precision" not in table:
        raise InputError("pseudo-label table has no precision column: the split has no held-back labels")
    fig = Figure(figsize=(max(8, 0.5 * len(table)), 3.8), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(table))
    ax.bar(x - 0.27, table["precision"] * 100, 0.27, color=_class_colours(list(table.index)), edgecolor="k", lw=0.3,
           label="precision (bars in class colour)")  # fmt: skip
    ax.bar(x, table["recall"] * 100, 0.27, color="#999999", label="recall")
    ax.bar(x + 0.27, table["kept_fraction"] * 100, 0.27, color="#4c72b0", label="kept fraction of predicted")
    ax.set_xticks(x, list(table.index), rotation=60, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title("Pseudo-label quality per class (against held-back target labels)")
    ax.legend(fontsize=8, ncols=3)
    ax.grid(axis="y", alpha=0.3)
    return fig


def selection_map(pseudo: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """RGB ``[H,W,3]`` uint8: green = pseudo-label correct, red = wrong, grey = ignored by the selector,
    black = no ground truth."""
    pseudo, gt = np.asarray(pseudo), np.asarray(gt)
    out = np.zeros((*pseudo.shape, 3), dtype=np.uint8)
    has_gt = gt != IGNORE
    kept = pseudo != IGNORE
    out[~kept & has_gt] = (150, 150, 150)
    out[kept & has_gt & (pseudo == gt)] = (40, 170, 60)
    out[kept & has_gt & (pseudo != gt)] = (220, 40, 40)
    return out


def pseudo_label_gallery(
    data_root: str | os.PathLike,
    pseudo_dir: str | os.PathLike,
    n: int = 4,
    names: Sequence[str] | None = None,
    dataset: str = "toytown",
    split: str = "target_train",
) -> Figure:
    """Rows of target images: image, pseudo-label overlay (ignored pixels unblended), ground-truth overlay and
    the ``selection_map`` (correct / wrong / ignored)."""
    ds = SegDataset(dataset, data_root, split)
    index = {s.id: i for i, s in enumerate(ds.samples)}
    names = list(names) if names is not None else [s.id for s in ds.samples[:n]]
    fig = Figure(figsize=(11, 1.5 * len(names) + 0.6), layout="constrained")
    axes = fig.subplots(len(names), 4, squeeze=False)
    titles = ("target image", "pseudo-label", "held-back label", "green ok / red wrong / grey ignored")
    for r, name in enumerate(names):
        if name not in index:
            raise InputError(f"{pseudo_dir}: image {name!r} is not in {dataset}/{split}")
        item = ds[index[name]]
        image, gt = item["image"].permute(1, 2, 0).numpy(), item["label"].numpy()
        pseudo = read_label(Path(pseudo_dir) / "labels" / f"{name}.png")
        for c, shown in enumerate((image, overlay(image, pseudo, 0.7), overlay(image, gt, 0.7),
                                   selection_map(pseudo, gt))):  # fmt: skip
            axes[r, c].imshow(shown, interpolation="nearest")
            _no_ticks(axes[r, c])
            if r == 0:
                axes[r, c].set_title(titles[c], fontsize=9)
        axes[r, 0].set_ylabel(name, fontsize=7)
    fig.suptitle("Pseudo-labels and what the selector ignored", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Notebook 3: hard classes


def class_value_bars(
    class_values: Sequence[float], hard: Sequence[int], probs: Sequence[float], classes: Sequence[str]
) -> Figure:
    """Left: class values v_c (mean confidence of pseudo-labelled pixels), hard classes hatched. Right: the
    HPLA sampling probability of each class, (1 - v)^2 normalised over the hard set."""
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    x = np.arange(len(classes))
    colours = _class_colours(classes)
    hard = set(int(h) for h in hard)
    bars = ax1.bar(x, class_values, color=colours, edgecolor="k", lw=0.4)
    for c, bar in enumerate(bars):
        if c in hard:
            bar.set_hatch("//")
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("class value v_c")
    ax1.set_title(f"Class values; hatched: the {len(hard)} hard classes")
    ax2.bar(x, probs, color=colours, edgecolor="k", lw=0.4)
    ax2.set_ylabel("sampling probability")
    ax2.set_title("HPLA class sampling probabilities (1 − v)² / Σ_hard")
    for ax in (ax1, ax2):
        ax.set_xticks(x, list(classes), rotation=60, ha="right")
        ax.grid(axis="y", alpha=0.3)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Notebook 4: region-adaptive regularisation, consistency, ablations

LOSS_TERMS: tuple[str, ...] = ("ce", "kld", "entropy", "consistency")


@torch.no_grad()
def loss_maps(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator | None = None,
    strong: bool = True,
    cst_region: str = "ignored",
    normalisation: str = "reference",
) -> dict[str, np.ndarray]:
    """Per-pixel contributions of each self-training loss term on a batch (SPEC 4, 5.3).

    The teacher sees ``images`` (uint8 ``[B,3,H,W]``; the weak view), the student their CCA strong view
    (``strong=False``: the same images). Each map ``[B,H,W]`` is the term's per-pixel value divided by the
    term's normaliser, so that ``map.sum()`` is the scalar loss term of ``hias_nb.losses`` (``ce`` on the
    confident region, ``kld`` on the confident region, ``entropy`` and ``consistency`` on the ignored region).
    Returns those four maps plus ``weak`` and ``strong`` (uint8 ``[B,H,W,3]``), ``label`` and ``scalars``
    (the terms as computed by ``hias_nb.losses``, a dict of floats).
    """
    student.eval()
    teacher.eval()
    labels = labels.to(images.device)
    view = augment.strong_view(images, generator=generator)[0] if strong else images
    logits = student(augment.normalize(view)).float()
    teacher_probs = teacher(augment.normalize(images)).float().softmax(1)
    num_classes = logits.shape[1]
    confident = labels != IGNORE
    per_class = num_classes if normalisation == "reference" else 1
    n_conf, n_ign = max(int(confident.sum()), 1), max(int((~confident).sum()), 1)

    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none") / n_conf
    kld, ent = losses.region_regularization_maps(logits, labels)
    cst_terms = losses.consistency_map(logits, teacher_probs, labels, region=cst_region)
    if normalisation == "reference":  # the published count: non-zero entries of the masked [B,C,H,W] product
        log_p = F.log_softmax(logits, 1)
        region = losses.region_mask(labels, cst_region)
        cst_count = int(((-teacher_probs * log_p != 0) & region[:, None]).sum())
    else:
        cst_count = int(losses.region_mask(labels, cst_region).sum())
    kld_scalar, ent_scalar = losses.region_regularization(logits, labels, normalisation=normalisation)
    cst_scalar = losses.consistency(logits, teacher_probs, labels, cst_region, normalisation=normalisation)
    scalars = {
        "ce": float(losses.target_cross_entropy(logits, labels)),
        "kld": float(kld_scalar),
        "entropy": float(ent_scalar),
        "consistency": float(cst_scalar),
    }
    as_np = lambda t: t.detach().cpu().numpy()  # noqa: E731
    return {
        "ce": as_np(ce),
        "kld": as_np(kld / (per_class * n_conf)),
        "entropy": as_np(ent / (per_class * n_ign)),
        "consistency": as_np(cst_terms / max(cst_count, 1)),
        "weak": as_np(images.permute(0, 2, 3, 1)).astype(np.uint8),
        "strong": as_np(view.permute(0, 2, 3, 1)).astype(np.uint8),
        "label": as_np(labels),
        "scalars": scalars,
    }


def total_loss_map(maps: dict, weights: dict[str, float]) -> np.ndarray:
    """``sum_t weights[t] * maps[t]`` over the loss terms named in `weights` (``[B,H,W]``); its sum over pixels is
    the weighted total loss (terms left out count 0)."""
    unknown = [k for k in weights if k not in LOSS_TERMS]
    if unknown:
        raise InputError(f"loss weights: unknown term(s) {unknown}; known: {list(LOSS_TERMS)}")
    total = np.zeros_like(maps["ce"])
    for term, w in weights.items():
        total = total + w * maps[term]
    return total


def loss_map_figure(maps: dict, index: int = 0, weights: dict[str, float] | None = None) -> Figure:
    """One image of a ``loss_maps`` batch: the weak and strong views, the pseudo-label, each term's map and
    (with `weights`) the weighted total; colour = contribution per pixel (×1e6 for readability)."""
    weak, strong = maps["weak"][index], maps["strong"][index]
    panels = [
        ("weak view (teacher)", weak, None),
        ("strong view (student)", strong, None),
        ("pseudo-label", overlay(weak, maps["label"][index], 0.7), None),
    ]
    panels += [(f"{t} ({maps['scalars'][t]:.3f})", maps[t][index] * 1e6, "magma") for t in LOSS_TERMS]
    if weights is not None:
        total = total_loss_map(maps, weights)
        panels.append((f"total ({float(total.sum()):.3f})", total[index] * 1e6, "viridis"))
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    axes = fig.subplots(2, 4).ravel()
    for ax, (title, data, cmap) in zip(axes, panels, strict=False):
        im = ax.imshow(data, cmap=cmap, interpolation="nearest")
        if cmap is not None:
            fig.colorbar(im, ax=ax, shrink=0.7)
        ax.set_title(title, fontsize=9)
        _no_ticks(ax)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    title = "Per-pixel loss contributions (colour: value × 10⁶); each map sums over the batch to the term in brackets"
    fig.suptitle(title, fontsize=10)
    return fig


ABLATION_COLUMNS: tuple[str, ...] = ("variant", "seed", "stage", "miou")


def load_ablation(path: str | os.PathLike) -> pd.DataFrame | None:
    """The ablation CSV (long format: ``variant, seed, stage, miou`` plus one IoU column per class), or None
    when the file does not exist yet. A file without the required columns is an `InputError`."""
    path = Path(path)
    if not path.exists():
        return None
    df = pd.read_csv(path)
    missing = [c for c in ABLATION_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; expected {list(ABLATION_COLUMNS)} + class columns")
    return df


def ablation_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation and number of seeds of the mIoU per (variant, stage), in first-seen order."""
    g = df.groupby(["variant", "stage"], sort=False)["miou"]
    return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "seeds": g.count()})


def ablation_plot(df: pd.DataFrame, stage: str | None = None) -> Figure:
    """Seaborn bars of the mean mIoU per variant (hue: stage, or only `stage`) with every seed as a dot."""
    import seaborn as sns

    data = df if stage is None else df[df["stage"] == stage]
    if data.empty:
        raise InputError(f"ablation: no rows for stage {stage!r}; stages: {sorted(df['stage'].unique())}")
    fig = Figure(figsize=(max(6, 1.1 * data["variant"].nunique() + 2), 4), layout="constrained")
    ax = fig.subplots()
    order = list(dict.fromkeys(data["variant"]))
    sns.barplot(data=data, x="variant", y="miou", hue="stage", order=order, errorbar=None, alpha=0.6, ax=ax)
    sns.stripplot(data=data, x="variant", y="miou", hue="stage", order=order, dodge=True, palette="dark:k", size=4,
                  legend=False, ax=ax)  # fmt: skip
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0))  # outside: seven stages would hide bars
    ax.set_ylabel("mIoU (%)")
    ax.set_xlabel("variant")
    ax.set_title("Ablation on toytown: bars = mean over seeds, dots = single seeds")
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Notebook 5: stages side by side


def stage_checkpoints(run_dir: str | os.PathLike) -> dict[str, Path]:
    """The checkpoints of a demo run folder that exist, by stage name, in pipeline order: ``source_only``,
    ``source_only_adabn``, ``warmup``, ``round_k`` (EMA teacher), ``round_k_student``, ``oracle``."""
    run = Path(run_dir)
    found = {"source_only": run / "source_only" / "model_final.pt",
             "source_only_adabn": run / "source_only_adabn" / "model_final.pt",
             "warmup": run / "warmup" / "model_final.pt"}  # fmt: skip
    rounds = sorted((p for p in run.glob("round_*") if p.name[6:].isdigit()), key=lambda p: int(p.name[6:]))
    for r in rounds:
        found[r.name] = r / "train" / "teacher_final.pt"
        found[f"{r.name}_student"] = r / "train" / "student_final.pt"
    found["oracle"] = run / "oracle" / "model_final.pt"
    return {k: v for k, v in found.items() if v.exists()}


def stage_confusions(
    checkpoints: dict[str, Path], dataset, device: str, max_images: int | None = None
) -> dict[str, np.ndarray]:
    """Confusion matrix ``[C,C]`` (rows ground truth, columns prediction) of each checkpoint on `dataset`
    (the first ``max_images`` items when given)."""
    if max_images is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(max_images, len(dataset))))
    protocol = dataset.dataset.protocol if isinstance(dataset, torch.utils.data.Subset) else dataset.protocol
    return {
        name: evaluate(load_model(path, device), dataset, protocol, device, progress=False).matrix
        for name, path in checkpoints.items()
    }


def checkpoint_report(
    checkpoints: dict[str, os.PathLike | str], dataset, device: str, max_images: int | None = None
) -> dict:
    """Evaluate checkpoints on `dataset` (its first ``max_images`` items when given); a report-like dict
    (``protocol``, ``classes``, one stage per checkpoint) for ``stage_iou_bars`` and ``report_table``."""
    matrices = stage_confusions({k: Path(v) for k, v in checkpoints.items()}, dataset, device, max_images)
    protocol = dataset.protocol
    stages = [stage_entry(name, EvalResult(protocol, m, 0.0)) for name, m in matrices.items()]
    return {"protocol": protocol.name, "classes": list(protocol.classes), "stages": stages}


def confusion_figure(matrices: dict[str, np.ndarray], classes: Sequence[str]) -> Figure:
    """Row-normalised confusion matrices (recall per ground-truth class on the diagonal), one panel per stage."""
    n = len(matrices)
    fig = Figure(figsize=(4.6 * n, 4.8), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    im = None
    for ax, (name, m) in zip(axes, matrices.items(), strict=True):
        rows = m.sum(1, keepdims=True)
        norm = np.divide(m, rows, out=np.zeros(m.shape, dtype=np.float64), where=rows > 0)
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(classes)), list(classes), rotation=90, fontsize=6)
        ax.set_yticks(range(len(classes)), list(classes), fontsize=6)
        ax.set_xlabel("predicted")
        ax.set_ylabel("ground truth")
        ax.set_title(name, fontsize=10)
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.7, label="share of the ground-truth class")
    fig.suptitle("Confusion matrices on the target validation split (rows sum to 1)", fontsize=10)
    return fig


@torch.no_grad()
def prediction_gallery(checkpoints: dict[str, Path], dataset, indices: Sequence[int], device: str) -> Figure:
    """Rows of images of `dataset`: the image, its label and each checkpoint's prediction (overlays)."""
    models = {name: load_model(path, device).eval() for name, path in checkpoints.items()}
    cols = 2 + len(models)
    fig = Figure(figsize=(2.4 * cols, 1.35 * len(indices) + 0.5), layout="constrained")
    axes = fig.subplots(len(indices), cols, squeeze=False)
    for r, i in enumerate(indices):
        item = dataset[i]
        image = item["image"].permute(1, 2, 0).numpy()
        shown = [("image", image), ("label", overlay(image, item["label"].numpy(), 0.7))]
        for name, model in models.items():
            pred = predict_probs(model, item["image"][None].to(device)).argmax(1)[0].cpu().numpy()
            shown.append((name, overlay(image, pred, 0.7)))
        for c, (title, data) in enumerate(shown):
            axes[r, c].imshow(data, interpolation="nearest")
            _no_ticks(axes[r, c])
            if r == 0:
                axes[r, c].set_title(title, fontsize=8)
    return fig


def gap_table(report: dict) -> pd.DataFrame:
    """Per stage: ``miou``, ``gain`` over source_only and, when the report has an oracle that beats
    source_only, ``gap_closed``: the share of the source_only → oracle mIoU gap closed."""
    miou = {s["name"]: s["miou"] for s in report["stages"]}
    base, oracle = miou.get("source_only"), miou.get("oracle")
    rows = []
    for name, m in miou.items():
        row = {"stage": name, "miou": m, "gain": None if base is None else m - base}
        if base is not None and oracle is not None and oracle > base:
            row["gap_closed"] = (m - base) / (oracle - base)
        rows.append(row)
    return pd.DataFrame(rows).set_index("stage")


def student_teacher_table(report: dict) -> pd.DataFrame:
    """mIoU of each round's EMA teacher (the stage) and its student (``report["students"]``)."""
    students = {s["name"].removesuffix("_student"): s["miou"] for s in report.get("students", [])}
    rows = [{"round": s["name"], "teacher": s["miou"], "student": students.get(s["name"])}
            for s in report["stages"] if s["name"].startswith("round_")]  # fmt: skip
    return pd.DataFrame(rows, columns=["round", "teacher", "student"]).set_index("round")


# ---------------------------------------------------------------------------------------------------------------
# Notebook 6: your own data, published checkpoints


def manifest_table() -> pd.DataFrame:
    """One row per dataset split described in ``data_manifests/``: dataset, protocol, split, image pattern,
    expected count and size."""
    rows = []
    for name in list_manifests():
        m = load_manifest(name)
        for split, spec in m.splits.items():
            rows.append({"dataset": m.name, "protocol": m.protocol_name, "split": split, "image": spec.image,
                         "label": spec.label, "count": spec.count, "size": spec.size})  # fmt: skip
    return pd.DataFrame(rows)


def write_published_layout(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Rewrite a hias_nb checkpoint in the published HIAST layout (SPEC 6.6), for trying ``load_checkpoint``:
    a bare state dict whose keys carry the ``seg_model.`` prefix, plus the unused ``representation`` head and a
    discriminator key, which a loader must ignore."""
    obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not (isinstance(obj, dict) and "state_dict" in obj):
        raise InputError(f"{checkpoint}: not a hias_nb checkpoint (no state_dict)")
    state = {f"seg_model.{k}": v for k, v in obj["state_dict"].items()}
    state["seg_model.representation.0.weight"] = torch.zeros(4, 8, 1, 1)
    state["seg_model.representation.0.bias"] = torch.zeros(4)
    state["D.conv1.weight"] = torch.zeros(2, 2, 4, 4)
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    return Path(out)
