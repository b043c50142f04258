"""hias_nb.viz: the figures of the notebook series draw what they are given (bar heights, line data, colours,
panel counts checked against the inputs). The numbers themselves are tested in tests/test_analysis.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from hias_nb import analysis, viz
from hias_nb.classes import CITYSCAPES_CLASSES, IGNORE
from hias_nb.data import SegDataset
from hias_nb.errors import InputError
from hias_nb.io import read_label
from hias_nb.losses import LOSS_TERMS

C = 19


# ----------------------------------------------------------------------------------------------------------------
# Notebook 1


def test_stage_iou_bars_draw_the_report():
    per_class = {c: float(k) for k, c in enumerate(CITYSCAPES_CLASSES)}
    per_class["wall"] = None  # absent class: empty bar
    report = {"protocol": "cityscapes19", "classes": list(CITYSCAPES_CLASSES),
              "stages": [{"name": "a", "miou": 9.0, "per_class": per_class}]}  # fmt: skip
    fig = viz.stage_iou_bars(report, title="domain gap")
    ax = fig.axes[0]
    assert ax.get_title() == "domain gap"
    heights = [p.get_height() for p in ax.patches]
    assert heights[0] == 0.0 and heights[2] == 2.0 and np.isnan(heights[3])
    assert "a (9.0)" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_reliability_diagram_shows_the_table():
    conf = np.array([0.05, 0.15, 0.55, 0.95, 1.0])
    pred = np.array([1, 1, 2, 2, 2])
    gt = np.array([1, 0, 2, 2, 1])
    t = analysis.calibration_table(conf, pred, gt, bins=2)
    per = analysis.class_calibration(conf, pred, gt, ["a", "b", "c"])
    fig = viz.reliability_diagram(t, per)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    ece = 100 * analysis.expected_calibration_error(t)
    assert f"ECE {ece:.1f}%" in fig.axes[0].get_title()
    np.testing.assert_allclose([p.get_height() for p in fig.axes[0].patches], t["accuracy"])
    assert len(viz.reliability_diagram(t).axes) == 1
    # per class: the pixel count over each bar (class a predicted nowhere: 0), the legend outside the bars
    assert [x.get_text() for x in fig.axes[1].texts] == ["0", "2", "3"]
    anchor = fig.axes[1].get_legend().get_bbox_to_anchor().transformed(fig.axes[1].transAxes.inverted())
    assert anchor.x0 == pytest.approx(1.0)  # anchored at the axes' right edge, outside the bars


def test_pixel_counts_are_short():
    from hias_nb.viz import _count

    assert [_count(n) for n in (7, 950, 1234, 12_345, 3_400_000)] == ["7", "950", "1.2k", "12k", "3.4M"]


def test_class_frequency_bars_one_bar_per_class_and_split():
    freq = pd.DataFrame({"s": np.full(C, 1 / C), "t": np.linspace(0.01, 0.1, C)}, index=list(CITYSCAPES_CLASSES))
    ax = viz.class_frequency_bars(freq).axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 2 * C
    np.testing.assert_allclose(heights[C:], freq["t"] * 100)  # percent
    assert ax.get_yscale() == "log"


def test_loss_curves_and_missing_columns():
    log = pd.DataFrame({"iteration": [1, 2, 3], "loss": [3.0, 2.0, 1.0], "ce": [2.0, 1.5, 1.0], "lr": [1, 1, 1]})
    fig = viz.loss_curves(log)
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert labels == ["loss", "ce"]  # lr is not a loss term
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_ydata(), [3.0, 2.0, 1.0])
    smooth = viz.loss_curves(log, ["loss"], smooth=3).axes[0].lines
    np.testing.assert_allclose(smooth[1].get_ydata(), [2.5, 2.0, 1.5])  # centred rolling mean
    with pytest.raises(InputError, match="kld"):
        viz.loss_curves(log, ["kld"])


# ----------------------------------------------------------------------------------------------------------------
# Notebook 2


def test_threshold_curves_one_panel_per_class():
    m = np.linspace(0.5, 0.9, 4 * C).reshape(4, C)
    cbst = np.ones(C)
    cbst[2] = 0.7
    fig = viz.threshold_curves(m, CITYSCAPES_CLASSES, hard=(5, 6), cbst=cbst, constant=0.9, instance="image")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == C
    for c, ax in enumerate(panels):
        np.testing.assert_array_equal(ax.lines[0].get_ydata(), m[:, c])
        levels = [ln.get_ydata()[0] for ln in ax.lines[1:]]
        assert levels == ([0.7, 0.9] if c == 2 else [0.9])  # CBST only where it is below 1; the constant
    assert panels[5].get_title() == "pole (hard)" and panels[5].title.get_color() == "crimson"
    assert panels[0].get_title() == "road"
    assert "target image" in fig.get_supxlabel() and "CBST" in fig.get_suptitle()


def test_keep_fraction_plot_scatters_the_table():
    t = pd.DataFrame({"class": [0, 1, 2], "target_keep": [0.1, 0.2, 0.3], "kept": [0.15, 0.2, 0.25]})
    ax = viz.keep_fraction_plot(t, ["a", "b", "c"]).axes[0]
    offsets = np.concatenate([c.get_offsets() for c in ax.collections])
    np.testing.assert_allclose(offsets, t[["target_keep", "kept"]].to_numpy())
    assert [x.get_text() for x in ax.get_legend().get_texts()] == ["a", "b", "c", "kept = α·θ^γ"]
    r = np.corrcoef(t["target_keep"], t["kept"])[0, 1]
    assert f"r = {r:.2f}" in ax.get_title()


def test_pseudo_quality_bars_and_gallery(pseudo_dir, tiny_toytown):
    table = analysis.pseudo_label_table(pseudo_dir)
    patches = viz.pseudo_quality_bars(table).axes[0].patches
    assert len(patches) == 3 * C
    np.testing.assert_allclose([p.get_height() for p in patches[:C]], table["precision"] * 100)
    with pytest.raises(InputError, match="precision"):
        viz.pseudo_quality_bars(table.drop(columns=["precision"]))
    fig = viz.pseudo_label_gallery(tiny_toytown, pseudo_dir, n=2)
    assert len(fig.axes) == 8
    ds = SegDataset("toytown", tiny_toytown, "target_train")
    name = ds.samples[0].id
    assert fig.axes[0].get_ylabel() == name
    pseudo = read_label(pseudo_dir / "labels" / f"{name}.png")
    expected = analysis.selection_map(pseudo, ds[0]["label"].numpy())
    np.testing.assert_array_equal(fig.axes[3].images[0].get_array(), expected)
    assert (pseudo == IGNORE).any()  # IAS ignored some pixels: the grey of the map is exercised
    with pytest.raises(InputError, match="nope"):
        viz.pseudo_label_gallery(tiny_toytown, pseudo_dir, names=["nope"])


# ----------------------------------------------------------------------------------------------------------------
# Notebook 3


def test_class_value_bars_hatch_hard_classes():
    values = np.linspace(0.5, 0.99, 5)
    fig = viz.class_value_bars(values, [0, 1], [0.6, 0.4, 0, 0, 0], ["a", "b", "c", "d", "e"])
    hatches = [bar.get_hatch() for bar in fig.axes[0].patches]
    assert hatches[:2] == ["//", "//"] and hatches[2:] == [None] * 3
    np.testing.assert_allclose([bar.get_height() for bar in fig.axes[1].patches], [0.6, 0.4, 0, 0, 0])


def test_class_value_bars_show_the_used_probabilities_and_name_what_is_dropped():
    values = [0.0, 0.5, 0.8, 0.9]
    fig = viz.class_value_bars(values, [0, 1], [0.8, 0.2, 0, 0], ["a", "b", "c", "d"], used=[0, 1, 0, 0],
                               donor_counts=[0, 4, 3, 2], kept_pixels=[0, 50, 80, 90])  # fmt: skip
    filled = [b for b in fig.axes[1].patches if b.get_fill()]
    outline = [b for b in fig.axes[1].patches if not b.get_fill()]
    assert [b.get_height() for b in filled] == [0, 1, 0, 0] and [b.get_height() for b in outline] == [0.8, 0.2, 0, 0]
    assert [t.get_text() for t in fig.axes[0].texts] == ["no px"] and fig.axes[0].texts[0].get_position()[0] == 0
    assert [t.get_text() for t in fig.axes[1].texts] == ["0 donors"] and fig.axes[1].texts[0].get_position()[0] == 0
    assert fig.axes[1].get_legend() is not None


# ----------------------------------------------------------------------------------------------------------------
# Notebook 4


def test_loss_map_figure_panels():
    rng = np.random.default_rng(0)
    maps = {t: rng.random((2, 4, 6)) for t in LOSS_TERMS}
    maps.update(weak=rng.integers(0, 256, (2, 4, 6, 3), dtype=np.uint8), label=np.zeros((2, 4, 6), dtype=np.int64),
                scalars={t: float(maps[t].sum()) for t in LOSS_TERMS})  # fmt: skip
    maps["strong"] = maps["weak"]
    weights = {"ce": 1.0, "kld": 0.1}
    fig = viz.loss_map_figure(maps, 1, weights)
    shown = [ax for ax in fig.axes if ax.get_visible() and ax.images]
    assert len(shown) == 3 + len(LOSS_TERMS) + 1  # views, pseudo-label, four terms, total
    titles = [ax.get_title() for ax in shown]
    ce, kld = maps["scalars"]["ce"], maps["scalars"]["kld"]
    assert f"ce: {ce:.3f} × λ 1 = {ce:.3f}" in titles and f"kld: {kld:.3f} × λ 0.1 = {0.1 * kld:.3f}" in titles
    off = [ax for ax in shown if ax.get_title().startswith("entropy")][0]
    assert off.get_title().startswith("entropy: off (λ 0") and off.images[0].get_cmap().name == "Greys"
    assert shown[-1].get_title() == f"total Σ λ·term = {float((maps['ce'] + 0.1 * maps['kld']).sum()):.3f}"
    np.testing.assert_allclose(shown[3].images[0].get_array(), maps["ce"][1] * 1e6)  # image 1, ×1e6
    total = maps["ce"] + 0.1 * maps["kld"]
    np.testing.assert_allclose(shown[-1].images[0].get_array(), total[1] * 1e6)
    assert len([ax for ax in viz.loss_map_figure(maps).axes if ax.get_visible() and ax.images]) == 7  # no total


def test_loss_map_figure_redrawn_in_place_equals_a_new_one():
    rng = np.random.default_rng(1)
    maps = {t: rng.random((2, 4, 6)) * (1 + i) for i, t in enumerate(LOSS_TERMS)}
    maps.update(weak=rng.integers(0, 256, (2, 4, 6, 3), dtype=np.uint8), label=np.ones((2, 4, 6), dtype=np.int64),
                scalars={t: float(maps[t].sum()) for t in LOSS_TERMS})  # fmt: skip
    maps["strong"] = 255 - maps["weak"]
    weights = {"ce": 1.0, "kld": 0.0, "entropy": 2.0, "consistency": 0.5}
    fig = viz.LossMapFigure(maps)
    fig.update(0, {t: 1.0 for t in LOSS_TERMS})
    fig.update(1, weights)
    fresh = viz.loss_map_figure(maps, 1, weights)
    ours = [ax for ax in fig.figure.axes if ax.images]
    theirs = [ax for ax in fresh.axes if ax.images]
    assert len(ours) == len(theirs) == 8
    for a, b in zip(ours, theirs, strict=True):
        assert a.get_title() == b.get_title()
        np.testing.assert_array_equal(a.images[0].get_array(), b.images[0].get_array())
        assert a.images[0].get_cmap().name == b.images[0].get_cmap().name
        data = np.asarray(a.images[0].get_array(), dtype=float)
        if data.ndim == 2:  # a colour-mapped panel: its limits (and so its colour bar) follow the new data
            assert a.images[0].get_clim() == pytest.approx((data.min(), data.max()))
            assert a.images[0].colorbar.vmax == pytest.approx(data.max())
    with pytest.raises(InputError, match="total"):
        viz.LossMapFigure(maps, with_total=False).update(0, weights)


def test_ablation_plot_draws_paired_differences_with_every_seed():
    diffs = pd.DataFrame({"variant": ["no_hpla"] * 2 + ["warmup"] * 2 + ["control_adabn"] * 2, "seed": [0, 1] * 3,
                          "diff": [-1.0, 0.5, -3.0, -4.0, -2.0, -1.0]})  # fmt: skip
    ax = viz.ablation_plot(diffs).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["no_hpla", "warmup"]  # the control is a line
    bars = [p.get_width() for p in ax.patches]
    assert bars == pytest.approx([-0.25, -3.5])
    from matplotlib.collections import PathCollection

    dots = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert sum(len(c.get_offsets()) for c in dots) == 4  # every seed of every row is a dot
    assert [ln.get_xdata()[0] for ln in ax.lines if ln.get_linestyle() == "--"] == [-1.5]
    with pytest.raises(InputError, match="no paired differences"):
        viz.ablation_plot(diffs.iloc[:0])


# ----------------------------------------------------------------------------------------------------------------
# Notebook 5


def test_confusion_panel_one_matrix_and_a_difference_coloured_by_benefit():
    m, ref = np.array([[8, 2], [0, 0]]), np.array([[4, 6], [0, 0]])
    fig = viz.confusion_panel(m, ["x", "y"], "a")
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), [[0.8, 0.2], [0, 0]])
    assert _cell_texts(fig) == ["80", "20"] and fig.axes[0].get_title() == "a"
    diff = viz.confusion_panel(m, ["x", "y"], "a − b", reference=ref)
    # recall up 40 points on the diagonal and confusion down 40 off it: both benefits, both drawn positive (blue)
    np.testing.assert_allclose(diff.axes[0].images[0].get_array(), [[0.4, 0.4], [0, 0]])
    assert _cell_texts(diff) == ["40", "-40"]
    worse = viz.confusion_panel(ref, ["x", "y"], "b − a", reference=m)
    np.testing.assert_allclose(worse.axes[0].images[0].get_array(), [[-0.4, -0.4], [0, 0]])


def _cell_texts(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].texts if t.get_visible()]


def test_confusion_panel_redrawn_in_place_equals_a_new_one():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 30, (4, 4)) * np.eye(4, dtype=int) * 5 + rng.integers(0, 9, (4, 4))  # diagonal-heavy
    b = rng.integers(0, 40, (4, 4))
    panel = viz.ConfusionPanel(list("wxyz"))
    panel.update(a, "a − b", reference=b)
    for args in (("a", None), ("b − a", a), ("b", None)):
        matrix = b if args[0].startswith("b") else a
        ours, fresh = panel.update(matrix, args[0], args[1]), viz.confusion_panel(matrix, list("wxyz"), *args)
        np.testing.assert_array_equal(ours.axes[0].images[0].get_array(), fresh.axes[0].images[0].get_array())
        assert ours.axes[0].images[0].get_clim() == fresh.axes[0].images[0].get_clim()
        assert ours.axes[0].images[0].get_cmap().name == fresh.axes[0].images[0].get_cmap().name
        assert _cell_texts(ours) == _cell_texts(fresh) and ours.axes[0].get_title() == args[0]
        colours = [[t.get_color() for t in f.axes[0].texts if t.get_visible()] for f in (ours, fresh)]
        assert colours[0] == colours[1]
        assert ours.axes[1].get_ylabel() == fresh.axes[1].get_ylabel()  # the colour bar's label


def test_prediction_gallery_panels(tiny_toytown, model_ckpt):
    ds = SegDataset("toytown", tiny_toytown, "target_val")
    fig = viz.prediction_gallery({"a": model_ckpt, "b": model_ckpt, "c": model_ckpt}, ds, [0, 1], "cpu", cols=3)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(fig.axes) == 2 * 2 * 3 and len(shown) == 2 * 5  # 5 panels per image, 3 to a row
    images, labels, preds = analysis.checkpoint_predictions({"a": model_ckpt}, ds, [0, 1], "cpu")
    np.testing.assert_array_equal(shown[5].images[0].get_array(), images[1])
    np.testing.assert_array_equal(shown[7].images[0].get_array(), analysis.overlay(images[1], preds["a"][1], 0.7))
    assert [ax.get_title() for ax in shown[5:]] == ["image 1", "label", "a", "b", "c"]
    present = sorted({int(c) for m in (*labels, *preds["a"]) for c in np.unique(m) if c < C})
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [CITYSCAPES_CLASSES[c] for c in present]
