"""Figures of the notebook series: plotting only (matplotlib object API: importable and usable without a
display; no `matplotlib.use`, no pyplot state).

Every function here returns a ``Figure`` (or draws on an ``Axes``); the numbers they show are computed in
`hias_nb.analysis` (tables, calibration, thresholds, evaluation) and in the components themselves
(`hias_nb.losses.loss_maps`), so the notebooks hold narrative and calls only. Sections follow the notebooks:
1 source training and the domain gap (calibration), 2 pseudo-labels and the IAS thresholds (docs/method.md
§2.2-§2.3), 3 hard classes (docs/method.md §3.1-§3.2), 4 region-adaptive regularisation and consistency
(docs/method.md §4, §5.3), 5 stages side by side.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import EngFormatter
from torch.utils.data import Dataset

from hias_nb.analysis import checkpoint_predictions, expected_calibration_error, overlay, selection_map
from hias_nb.classes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
from hias_nb.data import SegDataset
from hias_nb.errors import InputError
from hias_nb.io import read_label, read_rgb
from hias_nb.losses import LOSS_TERMS, total_loss_map

__all__ = [
    "toytown_grid",
    "stage_iou_bars",
    # notebook 1
    "class_frequency_bars",
    "loss_curves",
    "reliability_diagram",
    # notebook 2
    "draw_threshold_curves",
    "threshold_curves",
    "keep_fraction_plot",
    "pseudo_quality_bars",
    "pseudo_label_gallery",
    # notebook 3
    "class_value_bars",
    "class_legend",
    # notebook 4
    "loss_map_figure",
    "LossMapFigure",
    "ablation_plot",
    # notebook 5
    "confusion_panel",
    "ConfusionPanel",
    "row_normalised",
    "prediction_gallery",
]


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
    handles = class_legend(range(len(CITYSCAPES_CLASSES)))
    fig.legend(handles=handles, loc="outside lower center", ncol=7, fontsize=7, frameon=False)
    fig.suptitle(f"toytown samples ({root.name}, {split})", fontsize=10)
    return fig


def class_legend(ids: Sequence[int], classes: Sequence[str] = CITYSCAPES_CLASSES) -> list[Patch]:
    """Legend handles for class ids in the label maps' palette (the colours `overlay` draws)."""
    return [Patch(facecolor=CITYSCAPES_PALETTE[c] / 255.0, label=classes[c]) for c in ids]


def stage_iou_bars(report: dict, stages: list[str] | None = None, title: str | None = None) -> Figure:
    """Grouped bars of per-class IoU, one bar per stage of a ``report.json``, mIoU in the legend.

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


def _no_ticks(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


# ---------------------------------------------------------------------------------------------------------------
# Notebook 1: the two domains, training curves, domain gap, calibration


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
        # a white-edged black diamond stays visible on a dark bar
        ax.plot(x, per_class["accuracy"], "D", color="k", mec="white", mew=1.2, ms=6, label="accuracy (precision)")
        if "pixels" in per_class:  # a rate from a handful of pixels says little: the count is written on top
            for i, n in enumerate(per_class["pixels"]):
                ax.text(i, 1.01, _count(int(n)), ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_xticks(x, list(per_class.index), rotation=60, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("per predicted class")
        ax.set_title("Confidence vs accuracy per class (pixels on top): bar above its marker = over-confident",
                     fontsize=9, pad=24)  # fmt: skip
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _count(n: int) -> str:
    """A pixel count in 3 characters or so: 7, 950, 12k, 3.4M."""
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 10_000:
        return f"{n / 1e3:.0f}k"
    if n >= 1000:
        return f"{n / 1e3:.1f}k"
    return str(n)


# ---------------------------------------------------------------------------------------------------------------
# Notebook 2: pseudo-labels and the evolution of the IAS thresholds


def draw_threshold_curves(
    ax: Axes,
    thresholds: np.ndarray,
    classes: Sequence[str],
    hard: Sequence[int] = (),
    cbst: np.ndarray | None = None,
    constant: float | None = None,
    instance: str = "batch",
) -> list[Line2D]:
    """Draw one IAS threshold line per class on `ax` (hard classes bold, others faint), CBST thresholds as
    dotted levels at the right edge (placed in axes coordinates, so they stay there whatever the number of
    instances) and the constant threshold as a dashed line. Returns the IAS lines (one per class, in class
    order), so a widget can update them with ``set_data``."""
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
            ax.plot([1.005, 1.05], [cbst[c]] * 2, color=colours[c], lw=2, ls=":", transform=ax.get_yaxis_transform(),
                    clip_on=False)  # fmt: skip
    if constant is not None:
        ax.axhline(constant, color="k", ls="--", lw=1, label=f"constant {constant:g}")
    ax.set_xlabel(instance_label(instance))
    ax.set_xlim(0, max(n, 1) + 0.5)
    ax.set_ylabel("threshold θ_c")
    ax.set_ylim(min(0.0, float(np.nanmin(thresholds)) - 0.02) if thresholds.size else 0, 1.0)
    ax.grid(alpha=0.3)
    return lines


def instance_label(instance: str) -> str:
    """The x label of a threshold plot: what one IAS instance is."""
    what = "target image" if instance == "image" else "pseudo-label batch"
    return f"instance ({what}, in visiting order)"


def threshold_curves(
    thresholds: np.ndarray,
    classes: Sequence[str],
    hard: Sequence[int] = (),
    cbst: np.ndarray | None = None,
    constant: float | None = None,
    title: str = "IAS thresholds over the target stream",
    instance: str = "batch",
) -> Figure:
    """Small multiples: one panel per class with its IAS threshold over the stream ``thresholds`` ``[n, C]``,
    its CBST level dotted and the constant threshold dashed, on shared axes; hard classes' names in bold red."""
    n, num = thresholds.shape[0], len(classes)
    cols = 5
    rows = -(-num // cols)
    fig = Figure(figsize=(12, 1.9 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    colours = _class_colours(classes)
    hard = set(int(h) for h in hard)
    x = np.arange(1, n + 1)
    low = min(0.0, float(np.nanmin(thresholds)) - 0.02) if thresholds.size else 0.0
    for c, ax in enumerate(axes[:num]):
        ax.plot(x, thresholds[:, c], color=colours[c], lw=1.6, label=classes[c])
        if cbst is not None and cbst[c] < 1.0:
            ax.axhline(cbst[c], color="k", ls=":", lw=1.2)
        if constant is not None:
            ax.axhline(constant, color="0.5", ls="--", lw=0.8)
        ax.set_title(classes[c] + (" (hard)" if c in hard else ""), fontsize=9,
                     color="crimson" if c in hard else "k", fontweight="bold" if c in hard else "normal")  # fmt: skip
        ax.set_ylim(low, 1.0)
        ax.grid(alpha=0.3)
    for ax in axes[num:]:
        ax.set_visible(False)
    fig.supxlabel(instance_label(instance), fontsize=9)
    fig.supylabel("threshold θ_c", fontsize=9)
    parts = (
        ["solid: IAS"]
        + (["dotted: CBST"] if cbst is not None else [])
        + ([f"dashed: constant {constant:g}"] if constant is not None else [])
    )
    fig.suptitle(f"{title} ({', '.join(parts)})", fontsize=10)
    return fig


def keep_fraction_plot(table: pd.DataFrame, classes: Sequence[str]) -> Figure:
    """Realised keep fraction against ``alpha * theta**gamma`` per (instance, class), class colours with a
    legend; the title gives how closely the two agree (Pearson's r over the points) — IAS's quantile is taken
    over one instance's pixels, so a class with few pixels there scatters far from the line."""
    fig = Figure(figsize=(7.6, 4.6), layout="constrained")
    ax = fig.subplots()
    colours = np.array(_class_colours(classes))
    for c in sorted(set(table["class"].tolist())):
        t = table[table["class"] == c]
        ax.scatter(t["target_keep"], t["kept"], s=6, color=colours[c], alpha=0.6, label=classes[c])
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="kept = α·θ^γ")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("target keep fraction α·θ^γ")
    ax.set_ylabel("kept fraction (selected / predicted)")
    r = float(np.corrcoef(table["target_keep"], table["kept"])[0, 1]) if len(table) > 1 else float("nan")
    ax.set_title(f"Kept share against IAS's target α·θ^γ, per instance and class (r = {r:.2f})", fontsize=10)
    ax.legend(fontsize=7, ncols=1, loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=2)
    return fig


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


def pseudo_label_gallery(
    data_root: str | os.PathLike,
    pseudo_dir: str | os.PathLike,
    n: int = 4,
    names: Sequence[str] | None = None,
    dataset: str = "toytown",
    split: str = "target_train",
) -> Figure:
    """Rows of target images: image, pseudo-label overlay (ignored pixels unblended), ground-truth overlay and
    the ``selection_map`` (correct / wrong / ignored), at the pseudo-labels' size."""
    ds = SegDataset(dataset, data_root, split)
    index = {s.id: i for i, s in enumerate(ds.samples)}
    names = list(names) if names is not None else [s.id for s in ds.samples[:n]]
    fig = Figure(figsize=(11, 1.5 * len(names) + 0.6), layout="constrained")
    axes = fig.subplots(len(names), 4, squeeze=False)
    titles = ("target image", "pseudo-label", "held-back label", "green ok / red wrong / grey ignored")
    for r, name in enumerate(names):
        if name not in index:
            raise InputError(f"{pseudo_dir}: image {name!r} is not in {dataset}/{split}")
        pseudo = read_label(Path(pseudo_dir) / "labels" / f"{name}.png")
        ds.size = tuple(pseudo.shape)  # labels made at pseudo.resize (a paper run: 512x1024): read at that size
        item = ds[index[name]]
        image, gt = item["image"].permute(1, 2, 0).numpy(), item["label"].numpy()
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
    class_values: Sequence[float],
    hard: Sequence[int],
    probs: Sequence[float],
    classes: Sequence[str],
    used: Sequence[float] | None = None,
    donor_counts: Sequence[int] | None = None,
    kept_pixels: Sequence[int] | None = None,
) -> Figure:
    """Left: class values v_c (mean confidence of pseudo-labelled pixels), hard classes hatched, classes with no
    kept pixel marked "no px" (their value 0 makes them the hardest). Right: HPLA's class probabilities — the
    formula's (1 − v)² normalised over the hard set as outlines and, filled, the probabilities a draw actually
    uses (`hias_nb.hpla.draw_probabilities`: hard classes without donors dropped, the rest renormalised; pass
    `used`), hard classes with no donor marked "0 donors". Without `used` the formula's bars are filled."""
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    x = np.arange(len(classes))
    colours = _class_colours(classes)
    hard = set(int(h) for h in hard)
    bars = ax1.bar(x, class_values, color=colours, edgecolor="k", lw=0.4)
    for c, bar in enumerate(bars):
        if c in hard:
            bar.set_hatch("//")
    for c, n in enumerate(kept_pixels if kept_pixels is not None else []):
        if n == 0:
            ax1.text(c, 0.02, "no px", rotation=90, ha="center", va="bottom", fontsize=8, color="crimson")
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("class value v_c")
    ax1.set_title(f"Class values; hatched: the {len(hard)} hard classes")
    if used is None:
        ax2.bar(x, probs, color=colours, edgecolor="k", lw=0.4)
        ax2.set_title("HPLA class sampling probabilities (1 − v)² / Σ_hard")
    else:
        ax2.bar(x, used, color=colours, edgecolor="k", lw=0.4, label="used by a draw")
        ax2.bar(x, probs, fill=False, edgecolor="k", lw=0.8, ls="--", label="(1 − v)² / Σ_hard")
        ax2.legend(loc="upper right", fontsize=8)
        ax2.set_title("HPLA: probability a draw picks each class")
    top = max([*probs, *(used if used is not None else [])], default=0.0)
    for c, n in enumerate(donor_counts if donor_counts is not None else []):
        if c in hard and n == 0:
            ax2.text(c, 0.02 * max(top, 1e-9), "0 donors", rotation=90, ha="center", va="bottom", fontsize=8,
                     color="crimson")  # fmt: skip
    ax2.set_ylabel("probability")
    for ax in (ax1, ax2):
        ax.set_xticks(x, list(classes), rotation=60, ha="right")
        ax.grid(axis="y", alpha=0.3)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Notebook 4: region-adaptive regularisation, consistency, ablations


def loss_map_figure(maps: dict, index: int = 0, weights: dict[str, float] | None = None) -> Figure:
    """One image of a ``loss_maps`` batch: the weak and strong views, the pseudo-label, each term's map and
    (with `weights`) the weighted total; colour = contribution per pixel (×1e6 for readability)."""
    return LossMapFigure(maps, with_total=weights is not None).update(index, weights)


class LossMapFigure:
    """`loss_map_figure`'s panels built once and redrawn in place: ``update(index, weights)`` sets each panel's
    pixels, colour map, colour limits and title (the colour bars follow), so a widget redraw costs one draw of
    the figure, not a new one (``benchmarks/bench_widgets.py``). `maps` as ``losses.loss_maps`` returns it."""

    def __init__(self, maps: dict, with_total: bool = True) -> None:
        self.maps, self.with_total = maps, with_total
        self.figure = Figure(figsize=(12, 4.6), layout="constrained")
        axes = self.figure.subplots(2, 4).ravel()
        panels = self._panels(0, {} if with_total else None)
        self.images = []
        for ax, (title, data, cmap) in zip(axes, panels, strict=False):
            im = ax.imshow(data, cmap=cmap, interpolation="nearest")
            if cmap is not None:  # tick labels of a bounded width ("350", "12k"): the frozen layout holds them all
                self.figure.colorbar(im, ax=ax, shrink=0.7, format=EngFormatter(places=0, sep=""))
            ax.set_title(title, fontsize=9)
            _no_ticks(ax)
            self.images.append(im)
        for ax in axes[len(panels) :]:
            ax.set_visible(False)
        title = ("Per-pixel loss contributions (colour: value × 10⁶, unweighted); a term's map sums over the batch to "
                 "its value, the total's to Σ λ·term")  # fmt: skip
        self.figure.suptitle(title, fontsize=10)

    def _panels(self, index: int, weights: dict[str, float] | None) -> list[tuple[str, np.ndarray, str | None]]:
        maps = self.maps
        weak, strong = maps["weak"][index], maps["strong"][index]
        panels = [
            ("weak view (teacher)", weak, None),
            ("strong view (student)", strong, None),
            ("pseudo-label", overlay(weak, maps["label"][index], 0.7), None),
        ]
        for t in LOSS_TERMS:
            value = maps["scalars"][t]
            if weights is None:
                panels.append((f"{t}: {value:.3f} (unweighted)", maps[t][index] * 1e6, "magma"))
            elif weights.get(t, 0.0) == 0:  # left out of the total: drawn grey, so it does not read as a part of it
                panels.append((f"{t}: off (λ 0; unweighted {value:.3f})", maps[t][index] * 1e6, "Greys"))
            else:
                lam = weights[t]
                panels.append((f"{t}: {value:.3f} × λ {lam:g} = {lam * value:.3f}", maps[t][index] * 1e6, "magma"))
        if weights is not None:
            total = total_loss_map(maps, weights)
            panels.append((f"total Σ λ·term = {float(total.sum()):.3f}", total[index] * 1e6, "viridis"))
        return panels

    def update(self, index: int, weights: dict[str, float] | None = None) -> Figure:
        """Show image `index` of the batch under `weights` (None: unweighted terms, no total)."""
        if (weights is not None) != self.with_total:
            built = "with" if self.with_total else "without"
            raise InputError(f"weights: this figure was built {built} a total (give weights exactly when it has one)")
        for im, (title, data, cmap) in zip(self.images, self._panels(index, weights), strict=True):
            im.set_data(data)
            if cmap is not None:  # each change redraws the colour bar: change only what differs, limits at once
                if im.get_cmap().name != cmap:
                    im.set_cmap(cmap)
                im.set_clim(float(data.min()), float(data.max()))
            im.axes.set_title(title, fontsize=9)
        return self.figure


def ablation_plot(diffs: pd.DataFrame) -> Figure:
    """Paired differences of an ablation (`analysis.ablation_differences`): per variant its final mIoU minus the
    full method's on the same seed — a bar at the mean, a dot per seed, the standard deviation as a whisker — so
    a one-point effect is as visible as its spread. The full method is the line at 0; the equal-compute control
    (``control_adabn``), when present, a dashed line; the ``warmup`` row is the start (minus the rounds' gain)."""
    if diffs.empty:
        raise InputError("ablation: no paired differences (does every seed have the full variant?)")
    control = diffs[diffs["variant"] == "control_adabn"]
    data = diffs[diffs["variant"] != "control_adabn"]
    order = list(dict.fromkeys(data["variant"]))
    fig = Figure(figsize=(8, 0.45 * len(order) + 1.6), layout="constrained")
    ax = fig.subplots()
    g = data.groupby("variant", sort=False)["diff"]
    mean, std = g.mean().reindex(order), g.std(ddof=1).reindex(order).fillna(0)
    y = np.arange(len(order))
    colours = ["tab:blue" if m >= 0 else "tab:red" for m in mean]
    ax.barh(y, mean, xerr=std, color=colours, alpha=0.45, capsize=3)
    for i, v in enumerate(order):
        d = data.loc[data["variant"] == v, "diff"].to_numpy()
        ax.scatter(d, np.full(len(d), i), color="k", s=14, zorder=3)
    ax.axvline(0, color="k", lw=1, label="full method")
    if len(control):
        ax.axvline(control["diff"].mean(), color="tab:purple", ls="--", lw=1.2,
                   label=f"equal-compute control, BN re-estimated ({control['diff'].mean():+.1f})")  # fmt: skip
    ax.set_yticks(y, order)
    ax.invert_yaxis()
    ax.set_xlabel("final mIoU minus the full method's, same seed (points)")
    n = data["seed"].nunique()
    ax.set_title(f"Ablation as paired differences: bar = mean, dots = {n} seed(s), whisker = std", fontsize=10)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Notebook 5: stages side by side


def row_normalised(m: np.ndarray) -> np.ndarray:
    """A confusion matrix ``[C,C]`` (rows: ground truth) with each row divided by its sum (empty rows stay 0)."""
    rows = m.sum(1, keepdims=True)
    return np.divide(m, rows, out=np.zeros(m.shape, dtype=np.float64), where=rows > 0)


def confusion_panel(
    matrix: np.ndarray, classes: Sequence[str], title: str, reference: np.ndarray | None = None
) -> Figure:
    """One row-normalised confusion matrix, readable at a notebook's width, shares ≥ 0.05 written in the cells;
    with `reference`, the difference ``matrix − reference`` (both row-normalised) on a diverging scale: blue
    on the diagonal is recall gained, red off it is confusion added."""
    return ConfusionPanel(classes).update(matrix, title, reference)


class ConfusionPanel:
    """`confusion_panel` built once for a class list and redrawn in place by ``update`` (pixels, colour map and
    limits, colour-bar label, title, and the cell numbers: one text per cell made at start, shown where the
    share is ≥ 0.05), so a widget's change costs one draw (``benchmarks/bench_widgets.py``)."""

    def __init__(self, classes: Sequence[str]) -> None:
        n = len(classes)
        self.figure = Figure(figsize=(8.2, 7.2), layout="constrained")
        self.ax = ax = self.figure.subplots()
        self.image = ax.imshow(np.zeros((n, n)), cmap="Blues", vmin=0.0, vmax=1.0)
        self.texts = [[ax.text(j, i, "", ha="center", va="center", fontsize=6, visible=False) for j in range(n)]
                      for i in range(n)]  # fmt: skip
        ax.set_xticks(range(n), list(classes), rotation=90, fontsize=8)
        ax.set_yticks(range(n), list(classes), fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("ground truth")
        # signed, two decimals: every tick label as wide as any other, so the frozen layout holds each choice
        self.colorbar = self.figure.colorbar(self.image, ax=ax, shrink=0.8, label="gain (blue) / loss (red)",
                                             format="{x:+.2f}")  # fmt: skip

    def update(self, matrix: np.ndarray, title: str, reference: np.ndarray | None = None) -> Figure:
        """Show `matrix` ``[C,C]`` (counts; rows ground truth), or its difference from `reference`, titled `title`."""
        n = len(self.texts)
        for name, m in (("matrix", matrix), ("reference", reference)):
            if m is not None and np.shape(m) != (n, n):
                raise InputError(f"{name}: a confusion matrix of {n} classes is {n}x{n}, got {np.shape(m)}")
        norm = row_normalised(matrix)
        if reference is None:
            values = shown = norm
            cmap, lo, hi, label = "Blues", 0.0, 1.0, "share of the ground-truth class"
        else:
            values = norm - row_normalised(reference)
            hi = max(0.05, float(np.abs(values).max()))
            shown = -values * (1 - 2 * np.eye(len(values)))  # diagonal up and off-diagonal down both count as gain
            cmap, lo, label = "RdBu", -hi, "gain (blue) / loss (red)"
        self.image.set_data(shown)
        if self.image.get_cmap().name != cmap:
            self.image.set_cmap(cmap)
        self.image.set_clim(lo, hi)
        self.colorbar.set_label(label)
        for i, row in enumerate(self.texts):
            for j, text in enumerate(row):
                visible = bool(abs(values[i, j]) >= 0.05)
                text.set_visible(visible)
                if visible:
                    text.set_text(f"{100 * values[i, j]:.0f}")
                    text.set_color("white" if abs(shown[i, j]) > 0.6 * hi else "black")
        self.ax.set_title(title, fontsize=10)
        return self.figure


def prediction_gallery(
    checkpoints: dict[str, Path],
    dataset: Dataset,
    indices: Sequence[int],
    device: str,
    cols: int = 4,
    size: tuple[int, int] | None = None,
    scales: tuple[float, ...] = (1.0,),
    flip: bool = False,
) -> Figure:
    """For each image of `dataset` at `indices`: the image, its label and each checkpoint's prediction
    (overlays from ``analysis.checkpoint_predictions``, predicted with `size`, `scales`, `flip`), `cols` panels
    to a row so each stays readable at a notebook's width, and a colour legend of the classes shown."""
    images, labels, predictions = checkpoint_predictions(checkpoints, dataset, indices, device, size, scales, flip)
    per_image = 2 + len(predictions)
    rows_per = -(-per_image // cols)
    fig = Figure(figsize=(3.0 * cols, (1.65 * rows_per + 0.15) * len(indices) + 0.9), layout="constrained")
    axes = fig.subplots(rows_per * len(indices), cols, squeeze=False)
    present: set[int] = set()
    for r, image in enumerate(images):
        shown = [(f"image {indices[r]}", image, None), ("label", overlay(image, labels[r], 0.7), labels[r])]
        shown += [(name, overlay(image, pred[r], 0.7), pred[r]) for name, pred in predictions.items()]
        cells = axes[r * rows_per : (r + 1) * rows_per].ravel()
        for ax, (title, data, class_map) in zip(cells, shown, strict=False):
            ax.imshow(data, interpolation="nearest")
            _no_ticks(ax)
            ax.set_title(title, fontsize=8)
            if class_map is not None:
                present |= {int(c) for c in np.unique(class_map) if c < len(CITYSCAPES_CLASSES)}
        for ax in cells[len(shown) :]:
            ax.set_visible(False)
    handles = class_legend(sorted(present))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(7, len(handles)), fontsize=7)
    return fig
