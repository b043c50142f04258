"""Interactive pieces of the notebook series (ipywidgets), usable and testable outside Jupyter.

Each widget class builds its controls, draws into a matplotlib ``Figure`` (object API) and shows it as a PNG in
an ``ipywidgets.Image``; setting a control's ``.value`` from code runs the same callback as moving it in the
browser, and the latest computed data stays on the object (``.thresholds``, ``.sample``, ``.total``) so that
tests and readers can check what is drawn. Display ``obj.widget`` in a notebook.

- `ThresholdReplay`: IAS (docs/method.md §2.2) replayed from a pseudo-label folder's recorded confidence
  histograms for any α, β, γ and instance mode, without the model (``selectors.replay_ias``).
- `hpla_preview` / `HPLAPreview`: one HPLA copy-paste (docs/method.md §3.4) and the weak and strong views built
  from its result by ``augment.make_views`` (docs/method.md §3.5, §5.5), as the teacher and the student see them.
- `LossMapExplorer`: per-pixel loss terms of self-training (docs/method.md §4, §5.3; ``losses.loss_maps``) with
  a checkbox per λ.
- `resolve_run`, `train_source_live`: the notebooks' run folder and a source training with a live loss curve.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ipywidgets as W
import numpy as np
import pandas as pd
import PIL.Image
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hias_nb import analysis, losses, viz
from hias_nb.classes import CITYSCAPES_CLASSES, IGNORE
from hias_nb.config import config_to_dict, load_config
from hias_nb.data import SegDataset
from hias_nb.errors import InputError
from hias_nb.experiment import evaluation_settings
from hias_nb.hpla import HPLA, Draw
from hias_nb.pseudo_label import PseudoLabelConfig, load_pseudo_summary
from hias_nb.selectors import ConfidenceHistogram, cbst_from_histograms, replay_correct, replay_ias
from hias_nb.self_train import PseudoLabelledTarget, SelfTrainConfig, build_hpla, round_views
from hias_nb.train import TrainConfig, load_model, train_source

__all__ = [
    "resolve_run",
    "figure_png",
    "RunTarget",
    "run_target",
    "train_source_live",
    "ThresholdReplay",
    "HPLASample",
    "hpla_preview",
    "hpla_preview_figure",
    "HPLAPreviewFigure",
    "describe_ops",
    "ConfusionPicker",
    "HPLAPreview",
    "loss_weights",
    "LossMapExplorer",
    "round_config",
]


# ---------------------------------------------------------------------------------------------------------------
# Run folder and rendering


@dataclass(frozen=True)
class RunTarget:
    """Where a run's target images are: what notebooks 2–5 read besides the run folder."""

    dataset: str  # a dataset name (data_manifests/) or a manifest YAML
    root: str
    train_split: str  # the pseudo-labelled split
    val_split: str  # the evaluated split
    # how the run scored its stages (`hias-nb run`: its ``evaluate`` section — size, batch_size, scales, flip —
    # and its leading protocol), for ``analysis.stage_confusions`` / ``checkpoint_report``, so that a notebook's
    # numbers are the report's; empty for a toytown demo (native size, the dataset's own protocol)
    eval_settings: dict[str, Any] = field(default_factory=dict)

    @property
    def eval_size(self) -> tuple[int, int] | None:
        """The network's input size when the run was scored (None: each image's own)."""
        return self.eval_settings.get("size")

    @property
    def predict_settings(self) -> dict[str, Any]:
        """What a prediction needs of `eval_settings` (``size``, ``scales``, ``flip``: `viz.prediction_gallery`)."""
        return {k: v for k, v in self.eval_settings.items() if k in ("size", "scales", "flip")}

    def train(self) -> SegDataset:
        return SegDataset(self.dataset, self.root, self.train_split)

    def val(self) -> SegDataset:
        return SegDataset(self.dataset, self.root, self.val_split)


def run_target(report: dict, data_root: str | os.PathLike = "../data/toytown") -> RunTarget:
    """The target of a finished run, from its `report` (report.json): a `hias-nb run` experiment's
    (``target_dataset``, ``target_root``, ``target_split``, ``val_split``), else a toytown demo's in `data_root`
    (the notebook's DATA_ROOT: a demo records its root relative to where it ran)."""
    config = (report.get("config") or {}).get("experiment")
    if config:
        ev = evaluation_settings(config.get("evaluate"))
        if config.get("protocols"):
            ev["protocol"] = config["protocols"][0]  # the report's mIoU is under its first protocol
        return RunTarget(
            config["target_dataset"], config["target_root"], config["target_split"], config["val_split"], ev
        )
    return RunTarget("toytown", str(data_root), "target_train", "target_val")


def resolve_run(
    run_dir: str | os.PathLike | None,
    quick: bool,
    data_root: str | os.PathLike = "../data/toytown",
    runs_root: str | os.PathLike = "../runs",
) -> Path:
    """The run folder a notebook analyses: `run_dir`, or ``runs_root/demo_quick`` (QUICK) / ``runs_root/demo``.

    A default folder without ``report.json`` is created (or resumed) with ``run_demo(quick=quick, ...)``; an
    explicit `run_dir` without ``report.json`` is an `InputError` (point RUN_DIR at a finished demo run).
    """
    if run_dir is not None:
        run = Path(run_dir)
        if not (run / "report.json").exists():
            raise InputError(
                f"{run}: no report.json; RUN_DIR must be a finished `hias-nb demo` or `hias-nb run` folder"
            )
        return run
    run = Path(runs_root) / ("demo_quick" if quick else "demo")
    if not (run / "report.json").exists():
        from hias_nb.demo import run_demo

        run_demo(quick=quick, out=str(run), data_root=str(data_root))
    return run


def figure_png(fig: Figure, dpi: int = 80) -> bytes:
    """PNG bytes of a figure (what the widgets put into their ``ipywidgets.Image``): the pixels
    ``fig.savefig(format="png", dpi=dpi)`` gives, drawn once on an Agg canvas and encoded at low compression.

    ``savefig`` draws a figure that has (or had) a layout engine twice, and compresses at level 6: each widget
    redraw paid for both (≈ 40 % of a replay move, ``benchmarks/bench_widgets.py``)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    before = fig.dpi
    fig.set_dpi(dpi)
    try:
        canvas.draw()
        pixels = np.asarray(canvas.buffer_rgba())
    finally:
        fig.set_dpi(before)  # as savefig leaves it
    buf = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buf, format="png", compress_level=1)
    return buf.getvalue()


def train_source_live(cfg: TrainConfig, chunk: int = 10, output: W.Output | None = None) -> Path:
    """``train_source`` in resumable chunks of `chunk` iterations, redrawing the loss curve after each.

    The tqdm bar of each chunk shows the progress; the curve goes to `output` (an ``ipywidgets.Output``, shown
    by the caller) when given. Returns the final checkpoint, exactly as one uninterrupted ``train_source(cfg)``
    (resumption is exact).
    """
    if chunk < 1:
        raise InputError(f"chunk: must be positive, got {chunk}")
    log_path = Path(cfg.out) / "log.csv"
    while True:
        said = io.StringIO()
        try:
            with contextlib.redirect_stdout(said):
                path = train_source(dataclasses.replace(cfg, stop_after=chunk))
        finally:  # what the chunk said, also when it failed; its "paused at / resuming at" is bookkeeping here
            for line in said.getvalue().splitlines():
                if ": paused at iteration" not in line and ": resuming at iteration" not in line:
                    print(line)
        if output is not None and log_path.exists():
            fig = viz.loss_curves(analysis.read_log(log_path), ["loss"], title=f"source training ({cfg.split})")
            output.outputs = ()  # replace the previous curve (works in and outside a kernel)
            output.append_display_data(fig)
        if path.name == "model_final.pt":
            print(f"trained {cfg.iterations} iterations in chunks of {chunk}; the model is {path}")
            return path


def _image_widget() -> W.Image:
    # height auto: in a row beside a taller table the browser would otherwise stretch the picture
    return W.Image(format="png", layout=W.Layout(max_width="100%", height="auto"))


def _row(*children: W.Widget) -> W.HBox:
    """A row of pictures and tables that wraps (a narrow notebook puts the table under the plot, not off-screen)
    and keeps each item's own height."""
    return W.HBox(list(children), layout=W.Layout(flex_flow="row wrap", align_items="flex-start"))


def _legend_figure(handles: list, labels: list[str], dpi: int = 80) -> Figure:
    """A figure holding only a legend of `handles`, sized to it (drawn once, then measured)."""
    fig = Figure(figsize=(4, 4), dpi=dpi)
    legend = fig.legend(handles, labels, fontsize=7, ncols=2, loc="center", frameon=False)
    box = legend.get_window_extent(FigureCanvasAgg(fig).get_renderer())
    fig.set_size_inches(box.width / dpi + 0.1, box.height / dpi + 0.1)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# IAS replay


class ThresholdReplay:
    """IAS thresholds replayed from a pseudo-label folder's ``histograms.parquet`` (no model inference).

    Controls: ``alpha``, ``beta``, ``gamma`` (sliders) and ``instance`` (``"batch"`` / ``"image"``); their initial
    values are the folder's config. Each change reruns ``replay_ias`` (the histograms are prepared once) and
    moves the threshold lines; ``thresholds`` ``[n_instances, C]`` and ``selected`` hold the latest replay,
    ``seconds`` its cost (replay and redraw). ``hard`` classes are drawn bold; ``constant`` as a dashed line;
    ``show`` brings one class forward. When the folder was made with labels, ``quality`` holds each class's kept
    share, precision and recall under the current setting (``replay_correct``), shown as a table beside the plot,
    so a setting is judged by the labels it keeps, not only by its thresholds.
    """

    ALL = "all classes"

    def __init__(self, pseudo_dir: str | os.PathLike, hard: tuple[int, ...] = (), constant: float | None = 0.9):
        folder = Path(pseudo_dir)
        summary = load_pseudo_summary(folder)
        cfg = {**config_to_dict(PseudoLabelConfig()), **summary["config"]}  # a key the folder lacks: the default
        self.classes = list(summary["classes"])
        self.num_classes = len(self.classes)
        self.batch_size = int(cfg["batch_size"])
        self.init = float(cfg["init"])
        path = folder / "histograms.parquet"
        if not path.exists():
            raise InputError(f"{path}: no confidence histograms to replay")
        rows = pd.read_parquet(path)
        self.hist = ConfidenceHistogram(rows, self.num_classes)
        self.pixels = int(rows["count"].sum())
        self.predicted = np.asarray(summary["predicted_pixels"], dtype=np.int64)
        stats = pd.read_parquet(folder / "stats.parquet")
        self.gt_pixels = None
        if self.hist.has_correct and "gt_pixels" in stats:
            self.gt_pixels = stats.groupby("class")["gt_pixels"].sum().reindex(range(self.num_classes), fill_value=0)
        self.cbst = cbst_from_histograms(rows, self.num_classes, float(cfg["cbst_p"]))
        style = {"description_width": "60px"}
        self.alpha = W.FloatSlider(value=float(cfg["alpha"]), min=0.01, max=1.0, step=0.01,
                                   description="α", continuous_update=False, style=style)  # fmt: skip
        self.beta = W.FloatSlider(value=float(cfg["beta"]), min=0.0, max=0.99, step=0.01,
                                  description="β", continuous_update=False, style=style)  # fmt: skip
        self.gamma = W.FloatSlider(value=float(cfg["gamma"]), min=0.0, max=20.0, step=0.5,
                                   description="γ", continuous_update=False, style=style)  # fmt: skip
        self.instance = W.ToggleButtons(options=["batch", "image"], value=str(cfg["instance"]),
                                        description="instance", style=style)  # fmt: skip
        self.show = W.Dropdown(options=[self.ALL, *self.classes], value=self.ALL, description="show", style=style)
        self.image = _image_widget()
        self.status = W.HTML()
        self.table = W.HTML()
        self.figure = Figure(figsize=(7.6, 4.2), layout="constrained")
        self.ax = self.figure.subplots()
        self.thresholds, self.selected = self._replay()
        self.lines = viz.draw_threshold_curves(self.ax, self.thresholds, self.classes, hard, self.cbst, constant,
                                               self.instance.value)  # fmt: skip
        self.styles = [(ln.get_linewidth(), ln.get_alpha()) for ln in self.lines]
        # The legend never changes: drawn once beside the plot, not on every move (it was half of a redraw).
        self.legend = _image_widget()
        self.legend.value = figure_png(_legend_figure(*self.ax.get_legend_handles_labels()))
        self.seconds = 0.0
        self.quality = self._quality()
        self._render()
        self.figure.set_layout_engine("none")  # freeze the layout: each redraw only moves the lines (faster)
        for control in (self.alpha, self.beta, self.gamma, self.instance):
            control.observe(self._on_change, names="value")
        self.show.observe(lambda _c: self._render(), names="value")
        self.widget = W.VBox([W.HBox([self.alpha, self.beta, self.gamma]), W.HBox([self.instance, self.show]),
                              self.status, _row(self.image, self.legend, self.table)])  # fmt: skip

    def _replay(self) -> tuple[np.ndarray, np.ndarray]:
        return replay_ias(self.hist, self.num_classes, self.alpha.value, self.beta.value, self.gamma.value,
                          init=self.init, instance=self.instance.value, batch_size=self.batch_size)  # fmt: skip

    def _quality(self) -> pd.DataFrame:
        """Per class: the share of its predicted pixels kept and, with labels, precision and recall."""
        sel = self.selected.sum(0)
        q = pd.DataFrame({"kept %": 100 * sel / np.maximum(self.predicted, 1)}, index=self.classes)
        if self.gt_pixels is not None:
            cor = replay_correct(self.hist, self.thresholds, self.instance.value, self.batch_size).sum(0)
            q["precision %"] = np.where(sel > 0, 100 * cor / np.maximum(sel, 1), np.nan)
            q["recall %"] = np.where(self.gt_pixels > 0, 100 * cor / np.maximum(self.gt_pixels.to_numpy(), 1), np.nan)
        return q

    def _render(self) -> None:
        a, b, g = self.alpha.value, self.beta.value, self.gamma.value
        self.ax.set_title(f"IAS thresholds replayed: α={a:.2f}, β={b:.2f}, γ={g:.1f}, instance={self.instance.value}"
                          "; dotted: CBST", fontsize=10)  # fmt: skip
        shown = self.show.value
        for c, line in enumerate(self.lines):
            lw, alpha = self.styles[c]
            if shown != self.ALL:
                lw, alpha = (2.8, 1.0) if self.classes[c] == shown else (0.8, 0.12)
            line.set_linewidth(lw)
            line.set_alpha(alpha)
        self.image.value = figure_png(self.figure)
        self._status()
        q = self.quality.round(1)
        rows = q.to_html(na_rep="–", border=0, classes="hias-q")
        if shown != self.ALL:
            rows = rows.replace(f"<th>{shown}</th>", f"<th><b>▶ {shown}</b></th>")
        self.table.value = rows if self.gt_pixels is not None else rows + "<i>no labels: precision not known</i>"

    def _status(self) -> None:
        kept = self.selected.sum() / max(self.pixels, 1)
        cost = f"replay + redraw {1000 * self.seconds:.0f} ms" if self.seconds else "the folder's own setting"
        self.status.value = f"kept {100 * kept:.1f}% of the pixels ({cost})"

    def _on_change(self, _change=None) -> None:
        t0 = time.perf_counter()
        self.thresholds, self.selected = self._replay()
        self.quality = self._quality()
        x = np.arange(1, self.thresholds.shape[0] + 1)
        for c, line in enumerate(self.lines):
            line.set_data(x, self.thresholds[:, c])
        self.ax.set_xlim(0, x[-1] + 0.5)
        self.ax.set_xlabel(viz.instance_label(self.instance.value))
        self.ax.set_ylim(min(0.0, float(self.thresholds.min()) - 0.02), 1.0)
        self._render()
        self.seconds = time.perf_counter() - t0  # replay and redraw, shown from the next move on
        self._status()


# ---------------------------------------------------------------------------------------------------------------
# HPLA preview


@dataclass
class HPLASample:
    """Everything one HPLA preview draws; images uint8 ``[H,W,3]``, labels int64 ``[H,W]`` (255 ignored).

    ``result`` equals ``recipient`` outside the provenance mask (``provenance == 255``) and the donor(s) inside;
    ``weak``/``strong`` are the teacher's and the student's views of ``result`` and ``weak_label`` /
    ``weak_provenance`` the label and provenance moved with the weak view's geometry.
    """

    recipient_name: str
    recipient: np.ndarray
    recipient_label: np.ndarray
    donors: list[tuple[str, np.ndarray, np.ndarray]]  # (name, image, pseudo-label) per paste
    draws: list[Draw]
    result: np.ndarray
    result_label: np.ndarray
    provenance: np.ndarray
    weak: np.ndarray
    weak_label: np.ndarray
    weak_provenance: np.ndarray
    strong: np.ndarray
    strong_ops: list[tuple[str, dict]]


def _hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).cpu().numpy().astype(np.uint8)


def hpla_preview(
    hpla: HPLA,
    target: PseudoLabelledTarget,
    recipient: int | str,
    generator: torch.Generator,
    config: SelfTrainConfig | None = None,
) -> HPLASample:
    """Apply `hpla` to one target sample and build the weak and strong views of the result, as self-training
    does (HPLA at full resolution, then ``self_train.round_views`` with the round's `config`, default
    ``SelfTrainConfig()``: flip + random-sized crop, then CCA on the weak view). `recipient` is a dataset index
    or an image name; the class and donor draws use ``hpla``'s own generator, the views `generator`."""
    index = target.index_of[recipient] if isinstance(recipient, str) else int(recipient)
    item = target[index]
    image, label = item["image"], item["label"]
    result, result_label, provenance = hpla(image, label)
    donors = [(d.donor, *target.load(d.donor)) for d in hpla.last_draws]
    views = round_views(config or SelfTrainConfig(), result[None], result_label[None], provenance[None], generator)
    return HPLASample(
        recipient_name=item["name"],
        recipient=_hwc(image),
        recipient_label=label.numpy(),
        donors=[(name, _hwc(img), lab.numpy()) for name, img, lab in donors],
        draws=list(hpla.last_draws),
        result=_hwc(result),
        result_label=result_label.numpy(),
        provenance=provenance.numpy(),
        weak=_hwc(views.weak[0]),
        weak_label=views.label[0].numpy(),
        weak_provenance=views.provenance[0].numpy(),
        strong=_hwc(views.strong[0]),
        strong_ops=views.strong_ops[0],
    )


def describe_ops(ops: Sequence[tuple[str, dict]]) -> str:
    """The strong view's operations as a reader wants them under the image, in the order applied:
    ``[("random_contrast", {"alpha": 3.6}), ("solarize", {"threshold": 128})]`` → ``"contrast ×3.6, solarize ≥128"``."""

    def one(name: str, p: dict) -> str:
        if name == "color_jitter":
            return (f"jitter b×{p['brightness']:.2f} c×{p['contrast']:.2f} s×{p['saturation']:.2f} "
                    f"hue{p['hue']:+.2f}")  # fmt: skip
        if name == "random_brightness":
            return f"brightness {p['beta']:+.2f}"
        if name == "random_contrast":
            return f"contrast ×{p['alpha']:.2f}"
        if name == "solarize":
            return f"solarize ≥{p['threshold']}"
        if name == "posterize":
            return f"posterize {p['bits']} bits"
        if name == "gaussian_blur":
            return f"blur {p['ksize']} px σ {p['sigma']:.1f}" if "sigma" in p else f"blur {p['ksize']} px"
        return name.replace("to_gray", "grey").replace("_", " ")

    return ", ".join(one(n, p) for n, p in ops) or "no operation fired"


def hpla_preview_figure(sample: HPLASample, classes: Sequence[str] = CITYSCAPES_CLASSES) -> Figure:
    """Top row: donor, recipient, result, provenance (pasted class colours); bottom row: their pseudo-labels,
    the weak view (teacher) and the strong view (student) with the operations that fired."""
    return HPLAPreviewFigure(sample, classes).figure


class HPLAPreviewFigure:
    """`hpla_preview_figure`'s eight panels built once; ``update(sample)`` sets each panel's pixels and title,
    the strong view's operations and the legend of pasted classes in place (a widget redraw then costs one
    draw, not a new figure and its layout: ``benchmarks/bench_widgets.py``)."""

    OPS_LINES = 4  # the operations under the strong view, wrapped; padded to this many lines so the layout holds

    def __init__(self, sample: HPLASample, classes: Sequence[str] = CITYSCAPES_CLASSES) -> None:
        self.classes = list(classes)
        self.figure = Figure(figsize=(14, 5.0), layout="constrained")
        self.axes = self.figure.subplots(2, 4).ravel()
        self.images = []
        for ax, (_title, data) in zip(self.axes, self._panels(sample), strict=True):
            self.images.append(ax.imshow(data, interpolation="nearest"))
            ax.set_xticks([])
            ax.set_yticks([])
        self.update(sample)

    def _panels(self, sample: HPLASample) -> list[tuple[str, np.ndarray]]:
        blank = ("(no donor)", sample.recipient * 0, sample.recipient_label * 0 + IGNORE)
        donor = sample.donors[0] if sample.donors else blank
        return [
            (f"donor {donor[0]}", donor[1]),
            (f"recipient {sample.recipient_name}", sample.recipient),
            ("result (HPLA)", sample.result),
            ("provenance (pasted classes)", analysis.overlay(sample.result * 0 + 40, sample.provenance, 1.0)),
            ("donor pseudo-label", analysis.overlay(donor[1], donor[2], 0.7)),
            ("recipient pseudo-label", analysis.overlay(sample.recipient, sample.recipient_label, 0.7)),
            ("weak view (teacher)", sample.weak),
            ("strong view (student)", sample.strong),
        ]

    def update(self, sample: HPLASample) -> Figure:
        """Show `sample` (another recipient, its donors, views and operations) in the same panels."""
        classes = self.classes
        for ax, im, (title, data) in zip(self.axes, self.images, self._panels(sample), strict=True):
            h, w = data.shape[:2]
            if im.get_array().shape[:2] != (h, w):  # another size (a paper run's crops): the extent follows
                im.set_extent((-0.5, w - 0.5, h - 0.5, -0.5))
            im.set_data(data)
            ax.set_title(title, fontsize=9)
        ops = textwrap.fill(describe_ops(sample.strong_ops), 40).split("\n")
        ops += [""] * (self.OPS_LINES - len(ops))  # a near-black view is explained by its operations
        self.axes[7].set_xlabel("\n".join(ops), fontsize=8)
        if self.axes[3].get_legend() is not None:
            self.axes[3].get_legend().remove()
        pasted = sorted({c for d in sample.draws for c in d.pasted})
        if pasted:
            handles = viz.class_legend(pasted, classes)
            self.axes[3].legend(handles=handles, fontsize=7, loc="lower left", framealpha=0.8)
        drawn = ", ".join(f"{classes[d.cls]} from {d.donor}" for d in sample.draws) or "nothing drawn"
        pasted_names = ", ".join(classes[c] for d in sample.draws for c in d.pasted)
        self.figure.suptitle(f"HPLA: drew {drawn}; pasted {pasted_names}", fontsize=9)
        return self.figure


class HPLAPreview:
    """Pick a recipient (``"random"`` or a name) and an HPLA mode; see donor, recipient, result, provenance and
    the teacher's and student's views. ``draw`` (button) redraws with new random draws; ``sample`` holds the
    arrays of the latest preview.

    Args:
        pseudo_dir: a pseudo-label folder (its class values, donors and labels).
        data_root, dataset, split: where its target images are.
        config: the round's settings (hard-set size, HPLA mode to start with, donor drop fraction, views);
            default ``SelfTrainConfig()``.
        seed: seed of the draws; each redraw continues the same generators.
    """

    def __init__(
        self,
        pseudo_dir: str | os.PathLike,
        data_root: str | os.PathLike,
        dataset: str = "toytown",
        split: str = "target_train",
        config: SelfTrainConfig | None = None,
        seed: int = 0,
        max_names: int = 50,
    ):
        self.pseudo_dir = Path(pseudo_dir)
        self.config = config or SelfTrainConfig()
        self.target = PseudoLabelledTarget(SegDataset(dataset, data_root, split), self.pseudo_dir)
        self.classes = list(load_pseudo_summary(self.pseudo_dir)["classes"])
        self.hpla_generator = torch.Generator().manual_seed(seed)
        self.view_generator = torch.Generator().manual_seed(seed + 1)
        names = [s.id for s in self.target.images.samples[:max_names]]
        self.recipient = W.Dropdown(options=["random", *names], value="random", description="recipient")
        self.mode = W.ToggleButtons(options=["reference", "intended"], value=self.config.hpla_mode, description="mode")
        self.button = W.Button(description="draw again")
        self.image = _image_widget()
        self.info = W.HTML()
        self.hpla = self._build()
        self.sample: HPLASample | None = None
        self.panels: HPLAPreviewFigure | None = None  # built on the first draw, then redrawn in place
        self.draw()
        self.recipient.observe(lambda _c: self.draw(), names="value")
        self.mode.observe(self._on_mode, names="value")
        self.button.on_click(lambda _b: self.draw())
        self.widget = W.VBox([W.HBox([self.recipient, self.button]), self.mode, self.info, self.image])

    def _build(self) -> HPLA:
        cfg = self.config
        ignored = tuple(cfg.ignored_classes)
        return build_hpla(self.pseudo_dir, self.target, cfg.num_hard, ignored, self.mode.value,
                          cfg.donor_drop_fraction, self.hpla_generator)  # fmt: skip

    def _on_mode(self, _change=None) -> None:
        self.hpla = self._build()
        self.draw()

    def draw(self) -> HPLASample:
        """Run one preview with the current controls, redraw, and return its arrays."""
        choice = self.recipient.value
        if choice == "random":
            choice = int(torch.randint(len(self.target), (1,), generator=self.hpla_generator))
        self.sample = hpla_preview(self.hpla, self.target, choice, self.view_generator, self.config)
        if self.panels is None:
            self.panels = HPLAPreviewFigure(self.sample, self.classes)
            self.image.value = figure_png(self.panels.figure, dpi=90)
            self.panels.figure.set_layout_engine("none")  # the first draw's layout holds for every later one
        else:
            self.image.value = figure_png(self.panels.update(self.sample), dpi=90)
        pasted = float((self.sample.provenance != IGNORE).mean())
        self.info.value = f"{len(self.sample.draws)} donor(s); {100 * pasted:.1f}% of the pixels pasted"
        return self.sample


# ---------------------------------------------------------------------------------------------------------------
# Confusion matrices


class ConfusionPicker:
    """One confusion matrix at a time: pick a stage, and optionally another to subtract (e.g. the last round −
    the warm-up: what the rounds changed). `matrices`: ``{stage: [C,C] counts}`` (`analysis.stage_confusions`);
    the picker starts on the last stage against the warm-up when both exist."""

    NONE = "(none)"

    def __init__(self, matrices: dict[str, np.ndarray], classes: Sequence[str]) -> None:
        self.matrices, self.classes = matrices, list(classes)
        names = list(matrices)
        rounds = [n for n in names if n.startswith("round_")]
        start = rounds[-1] if rounds else names[-1]
        ref = "warmup" if "warmup" in names and start != "warmup" else self.NONE
        self.stage = W.Dropdown(options=names, value=start, description="stage")
        self.minus = W.Dropdown(options=[self.NONE, *names], value=ref, description="minus")
        self.image = _image_widget()
        self.panels = viz.ConfusionPanel(self.classes)
        self._pngs: dict[tuple[str, str], bytes] = {}
        self.draw()
        for w in (self.stage, self.minus):
            w.observe(lambda _c: self.draw(), names="value")
        self.widget = W.VBox([W.HBox([self.stage, self.minus]), self.image])

    def figure(self) -> Figure:
        """The panel for the current choice (`viz.ConfusionPanel`, one figure redrawn in place)."""
        name, minus = self.stage.value, self.minus.value
        if minus in (self.NONE, name):
            return self.panels.update(self.matrices[name], f"{name} (rows sum to 100 %)")
        return self.panels.update(self.matrices[name], f"{name} − {minus}, points of each row",
                                  reference=self.matrices[minus])  # fmt: skip

    def draw(self) -> None:
        key = (self.stage.value, self.minus.value)
        if key not in self._pngs:  # each choice is drawn once
            self._pngs[key] = figure_png(self.figure(), dpi=80)
            self.panels.figure.set_layout_engine("none")  # the first draw's layout holds for every later one
        self.image.value = self._pngs[key]


# ---------------------------------------------------------------------------------------------------------------
# Loss maps


def loss_weights(cfg: SelfTrainConfig) -> dict[str, float]:
    """The round's λ per loss term (``losses.LOSS_TERMS``)."""
    return {"ce": cfg.lambda_ce, "kld": cfg.lambda_kld, "entropy": cfg.lambda_ent, "consistency": cfg.lambda_cst}


class LossMapExplorer:
    """Per-pixel loss terms on a batch of pseudo-labelled target images, with a checkbox per term.

    The maps are computed once (``losses.loss_maps`` on ``self_train.round_views``: teacher on the weak view,
    student on the strong view, as in training, with the round's `config`, default ``SelfTrainConfig()``); the
    checkboxes switch a term's λ between the round's value and 0, and the slider picks the image.
    ``total`` is the weighted total map ``[B,H,W]`` currently drawn; its sum is the total loss of the batch.
    """

    def __init__(
        self,
        student_checkpoint: str | os.PathLike,
        teacher_checkpoint: str | os.PathLike,
        target: PseudoLabelledTarget,
        device: str,
        config: SelfTrainConfig | None = None,
        indices: tuple[int, ...] = (0, 1, 2, 3),
        seed: int = 0,
    ):
        student, teacher = load_model(student_checkpoint, device), load_model(teacher_checkpoint, device)
        items = [target[i] for i in indices]
        images = torch.stack([it["image"] for it in items]).to(device)
        labels = torch.stack([it["label"] for it in items]).to(device)
        cfg = config or SelfTrainConfig()
        views = round_views(cfg, images, labels, None, torch.Generator(device=images.device).manual_seed(seed))
        self.maps = losses.loss_maps(student, teacher, views, cfg.cst_region, cfg.normalisation)
        self.weights = loss_weights(cfg)
        self.checks = {t: W.Checkbox(value=True, description=f"{t} (λ={self.weights.get(t, 0.0):g})")
                       for t in losses.LOSS_TERMS}  # fmt: skip
        self.index = W.IntSlider(value=0, min=0, max=len(indices) - 1, description="image")
        self.image = _image_widget()
        self.total = np.zeros_like(self.maps["ce"])
        self.panels = viz.LossMapFigure(self.maps)  # built once; each new choice redraws it in place
        self._pngs: dict[tuple, bytes] = {}
        self.redraw()
        for control in (*self.checks.values(), self.index):
            control.observe(lambda _c: self.redraw(), names="value")
        self.widget = W.VBox([W.HBox(list(self.checks.values())), self.index, self.image])

    def active_weights(self) -> dict[str, float]:
        """λ per term as the checkboxes set them (0 for an unchecked term)."""
        return {t: (self.weights.get(t, 0.0) if box.value else 0.0) for t, box in self.checks.items()}

    def redraw(self) -> np.ndarray:
        """Recompute the weighted total map with the current checkboxes, redraw, and return it."""
        weights = self.active_weights()
        self.total = losses.total_loss_map(self.maps, weights)
        key = (self.index.value, *weights.values())
        if key not in self._pngs:  # each choice is drawn once
            self._pngs[key] = figure_png(self.panels.update(self.index.value, weights), dpi=80)
            self.panels.figure.set_layout_engine("none")  # the layout of the first draw holds for every choice
        self.image.value = self._pngs[key]
        return self.total


def round_config(run_dir: str | os.PathLike, k: int = 1) -> SelfTrainConfig:
    """The saved, resolved config of round `k` of a demo run (``round_k/train/config.yaml``)."""
    path = Path(run_dir) / f"round_{k}" / "train" / "config.yaml"
    if not path.exists():
        raise InputError(f"{path}: no config of round {k} here")
    return load_config(SelfTrainConfig, path)
