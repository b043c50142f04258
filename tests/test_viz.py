"""hias_nb.viz: the computations behind the notebook figures, checked against hand-computed values, direct
re-implementations and invariants (loss maps sum to the loss terms, CBST from histograms equals CBST, ...)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from hias_nb import losses, viz
from hias_nb.classes import CITYSCAPES_CLASSES, IGNORE
from hias_nb.errors import InputError
from hias_nb.io import read_label
from hias_nb.models import DeepLabV2, load_checkpoint
from hias_nb.selectors import CBST, IAS, cbst_from_histograms, confidence_histograms, replay_ias

C = 19


def _random_stream(seed: int, n: int = 6, h: int = 8, w: int = 10):
    g = torch.Generator().manual_seed(seed)
    conf = 0.3 + 0.7 * torch.rand(n, h, w, generator=g)
    pred = torch.randint(0, 5, (n, h, w), generator=g)
    pred[:, 0, 0] = 4  # class 4 appears; classes 5.. never do
    return conf.float(), pred


# ----------------------------------------------------------------------------------------------------------------
# Notebook 1


def test_calibration_table_hand_computed():
    conf = np.array([0.05, 0.15, 0.55, 0.95, 1.0, 0.5])
    pred = np.array([1, 1, 2, 2, 2, 0])
    gt = np.array([1, 0, 2, 2, 1, IGNORE])  # the last pixel has no label: left out
    t = viz.calibration_table(conf, pred, gt, bins=2)
    assert t["pixels"].tolist() == [2, 3]
    np.testing.assert_allclose(t["mean_conf"], [0.1, (0.55 + 0.95 + 1.0) / 3])
    np.testing.assert_allclose(t["accuracy"], [0.5, 2 / 3])
    ece = (2 * abs(0.5 - 0.1) + 3 * abs(2 / 3 - 2.5 / 3)) / 5
    assert viz.expected_calibration_error(t) == pytest.approx(ece)
    per = viz.class_calibration(conf, pred, gt, ["a", "b", "c", "d"])
    assert per.loc["b", "pixels"] == 2 and per.loc["b", "accuracy"] == pytest.approx(0.5)
    assert per.loc["c", "accuracy"] == pytest.approx(2 / 3)
    assert per.loc["a", "pixels"] == 0 and np.isnan(per.loc["d", "mean_conf"])
    fig = viz.reliability_diagram(t, per)
    assert isinstance(fig, Figure) and "ECE" in fig.axes[0].get_title()


def test_class_frequencies_count_labelled_pixels(tiny_toytown):
    freq = viz.class_frequencies(tiny_toytown, ("source_train", "target_val"), max_images=3)
    assert list(freq.index) == list(CITYSCAPES_CLASSES)
    np.testing.assert_allclose(freq.sum(), 1.0)
    names = sorted(p.name for p in (tiny_toytown / "target" / "val" / "labels").glob("*.png"))[:3]
    labels = np.concatenate([read_label(tiny_toytown / "target" / "val" / "labels" / n).ravel() for n in names])
    labels = labels[labels != IGNORE]
    expected = np.array([(labels == c).sum() for c in range(C)]) / labels.size
    np.testing.assert_allclose(freq["target_val"].to_numpy(), expected)
    assert len(viz.class_frequency_bars(freq).axes[0].patches) == 2 * C


def test_loss_curves_and_log_errors(tmp_path):
    log = pd.DataFrame({"iteration": [1, 2, 3], "loss": [3.0, 2.0, 1.0], "ce": [2.0, 1.5, 1.0], "lr": [1, 1, 1]})
    fig = viz.loss_curves(log)
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert labels == ["loss", "ce"]  # lr is not a loss term
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_ydata(), [3.0, 2.0, 1.0])
    with pytest.raises(InputError, match="kld"):
        viz.loss_curves(log, ["kld"])
    with pytest.raises(InputError, match="log.csv"):
        viz.read_log(tmp_path / "log.csv")


def test_split_iou_report_and_title(tiny_toytown, model_ckpt):
    from hias_nb.train import load_model

    model = load_model(model_ckpt, "cpu")
    report = viz.split_iou_report(model, tiny_toytown, ["source_val", "target_val"], "cpu")
    assert [s["name"] for s in report["stages"]] == ["source_val", "target_val"]
    one = viz.split_iou_report(model, tiny_toytown, ["target_val"], "cpu", max_images=1)
    from hias_nb.data import SegDataset
    from hias_nb.evaluate import evaluate

    ds = SegDataset("toytown", tiny_toytown, "target_val")
    direct = evaluate(model, torch.utils.data.Subset(ds, [0]), ds.protocol, "cpu", progress=False)
    assert one["stages"][0]["miou"] == pytest.approx(direct.miou, abs=0.006)
    fig = viz.stage_iou_bars(report, title="domain gap")
    assert fig.axes[0].get_title() == "domain gap"


# ----------------------------------------------------------------------------------------------------------------
# Notebook 2


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_cbst_from_histograms_equals_cbst(p):
    conf, pred = _random_stream(1)
    rows = pd.DataFrame(confidence_histograms(conf, pred))
    cbst = CBST(C, p=p)
    cbst.observe(conf[:3], pred[:3])
    cbst.observe(conf[3:], pred[3:])
    got = cbst_from_histograms(rows, C, p)
    np.testing.assert_array_equal(got, cbst.thresholds.numpy())
    assert (got[5:] == 1.0).all()  # never predicted


def test_threshold_matrix_is_the_ias_history(pseudo_dir):
    from hias_nb.io import read_json

    m = viz.threshold_matrix(pseudo_dir)
    cfg = read_json(pseudo_dir / "summary.json")["config"]
    replay, _ = replay_ias(pd.read_parquet(pseudo_dir / "histograms.parquet"), C, cfg["alpha"], cfg["beta"],
                           cfg["gamma"], batch_size=cfg["batch_size"])  # fmt: skip
    np.testing.assert_array_equal(m, replay)
    fig = viz.threshold_curves(m, CITYSCAPES_CLASSES, hard=(5, 6), constant=0.9)
    lines = fig.axes[0].lines
    np.testing.assert_array_equal(lines[5].get_ydata(), m[:, 5])
    assert lines[5].get_linewidth() > lines[0].get_linewidth()  # hard classes stand out


def test_keep_fraction_table_hand_computed():
    ias = IAS(3, alpha=0.5, gamma=2.0, init=0.8)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ias.select(torch.rand(1, 4, 5, generator=g), torch.randint(0, 2, (1, 4, 5), generator=g))
    hist = ias.history
    t = viz.keep_fraction_table(hist, alpha=0.5, gamma=2.0, init=0.8)
    assert (t["class"] != 2).all()  # class 2 never predicted: no row
    th = hist.pivot(index="instance", columns="class", values="threshold").to_numpy()
    row = t[(t["instance"] == 1) & (t["class"] == 0)].iloc[0]
    assert row["prev_threshold"] == th[0, 0] and row["target_keep"] == pytest.approx(0.5 * th[0, 0] ** 2)
    first = t[(t["instance"] == 0) & (t["class"] == 1)].iloc[0]
    assert first["prev_threshold"] == 0.8
    h0 = hist[(hist["instance"] == 0) & (hist["class"] == 1)].iloc[0]
    assert first["kept"] == h0["selected_pixels"] / h0["predicted_pixels"]
    assert isinstance(viz.keep_fraction_plot(t, ["a", "b", "c"]), Figure)


def test_pseudo_label_table_and_gallery(pseudo_dir, tiny_toytown):
    table = viz.pseudo_label_table(pseudo_dir)
    stats = pd.read_parquet(pseudo_dir / "stats.parquet")
    c = int(stats.groupby("class")["selected_pixels"].sum().idxmax())
    sel = stats[stats["class"] == c]
    assert table["selected_px"].iloc[c] == sel["selected_pixels"].sum()
    assert table["precision"].iloc[c] == pytest.approx(sel["correct_selected"].sum() / sel["selected_pixels"].sum())
    assert table["recall"].iloc[c] == pytest.approx(sel["correct_selected"].sum() / sel["gt_pixels"].sum())
    assert len(viz.pseudo_quality_bars(table).axes[0].patches) == 3 * C
    fig = viz.pseudo_label_gallery(tiny_toytown, pseudo_dir, n=2)
    assert len(fig.axes) == 8
    with pytest.raises(InputError, match="nope"):
        viz.pseudo_label_gallery(tiny_toytown, pseudo_dir, names=["nope"])


def test_selection_map_colours():
    pseudo = np.array([[1, 2, IGNORE, 3]])
    gt = np.array([[1, 1, 4, IGNORE]])
    out = viz.selection_map(pseudo, gt)
    assert out[0, 0].tolist() == [40, 170, 60]  # correct
    assert out[0, 1].tolist() == [220, 40, 40]  # wrong
    assert out[0, 2].tolist() == [150, 150, 150]  # ignored
    assert out[0, 3].tolist() == [0, 0, 0]  # no ground truth


def test_class_value_bars_hatch_hard_classes():
    values = np.linspace(0.5, 0.99, 5)
    fig = viz.class_value_bars(values, [0, 1], [0.6, 0.4, 0, 0, 0], ["a", "b", "c", "d", "e"])
    hatches = [bar.get_hatch() for bar in fig.axes[0].patches]
    assert hatches[:2] == ["//", "//"] and hatches[2:] == [None] * 3


# ----------------------------------------------------------------------------------------------------------------
# Notebook 4


@pytest.mark.parametrize("normalisation", ["reference", "pixel"])
def test_loss_maps_sum_to_the_loss_terms(normalisation):
    torch.manual_seed(0)
    student = DeepLabV2("resnet10t", num_classes=5, aspp_rates=(1, 2))
    teacher = DeepLabV2("resnet10t", num_classes=5, aspp_rates=(1, 2))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 24, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 5, (2, 24, 32), generator=g)
    labels[torch.rand(2, 24, 32, generator=g) < 0.4] = IGNORE
    maps = viz.loss_maps(student, teacher, images, labels, generator=g, normalisation=normalisation)
    for term in viz.LOSS_TERMS:
        assert maps[term].shape == (2, 24, 32)
        assert maps[term].sum() == pytest.approx(maps["scalars"][term], rel=1e-4), term
    confident = labels.numpy() != IGNORE
    assert (maps["kld"][~confident] == 0).all() and (maps["entropy"][confident] == 0).all()
    assert (maps["consistency"][confident] == 0).all()
    # independent check of one term: CE from the strong view the maps report
    with torch.no_grad():
        from hias_nb import augment

        logits = student.eval()(augment.normalize(torch.from_numpy(maps["strong"]).permute(0, 3, 1, 2)))
    assert maps["scalars"]["ce"] == pytest.approx(float(losses.target_cross_entropy(logits, labels)), rel=1e-4)
    weights = {"ce": 1.0, "kld": 0.1, "entropy": 1.0, "consistency": 0.5}
    total = viz.total_loss_map(maps, weights)
    assert total.sum() == pytest.approx(sum(w * maps["scalars"][t] for t, w in weights.items()), rel=1e-4)
    assert viz.total_loss_map(maps, {"kld": 0.0}).sum() == 0
    with pytest.raises(InputError, match="bogus"):
        viz.total_loss_map(maps, {"bogus": 1.0})
    assert len(viz.loss_map_figure(maps, 1, weights).axes) >= 8


def _ablation_frame() -> pd.DataFrame:
    rows = []
    for variant, base in (("hiast", 50.0), ("no_hpla", 46.0)):
        for seed in (0, 1, 2):
            for stage, gain in (("round_1", 0.0), ("round_2", 2.0)):
                rows.append({"variant": variant, "seed": seed, "stage": stage, "miou": base + gain + seed,
                             **{c: 10.0 for c in CITYSCAPES_CLASSES}})  # fmt: skip
    return pd.DataFrame(rows)


def test_ablation_loader_summary_and_plot(tmp_path):
    assert viz.load_ablation(tmp_path / "absent.csv") is None
    df = _ablation_frame()
    df.to_csv(tmp_path / "a.csv", index=False)
    loaded = viz.load_ablation(tmp_path / "a.csv")
    pd.testing.assert_frame_equal(loaded, df)
    summary = viz.ablation_summary(df)
    assert summary.loc[("hiast", "round_2"), "mean"] == pytest.approx(53.0)
    assert summary.loc[("no_hpla", "round_1"), "std"] == pytest.approx(1.0)
    assert summary.loc[("hiast", "round_1"), "seeds"] == 3
    fig = viz.ablation_plot(df)
    ax = fig.axes[0]
    dots = sum(len(c.get_offsets()) for c in ax.collections)
    assert dots == len(df)  # every seed is shown
    assert "mIoU" in ax.get_ylabel()
    df.drop(columns=["seed"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(InputError, match="seed"):
        viz.load_ablation(tmp_path / "bad.csv")
    with pytest.raises(InputError, match="round_9"):
        viz.ablation_plot(df, stage="round_9")


# ----------------------------------------------------------------------------------------------------------------
# Notebook 5


def _report(with_oracle: bool) -> dict:
    stages = [{"name": "source_only", "miou": 40.0}, {"name": "source_only_adabn", "miou": 44.0},
              {"name": "round_1", "miou": 50.0}]  # fmt: skip
    if with_oracle:
        stages.append({"name": "oracle", "miou": 60.0})
    return {"stages": stages, "students": [{"name": "round_1_student", "miou": 48.0}]}


def test_gap_and_student_teacher_tables():
    t = viz.gap_table(_report(True))
    assert t.loc["round_1", "gain"] == 10.0 and t.loc["round_1", "gap_closed"] == pytest.approx(0.5)
    assert t.loc["oracle", "gap_closed"] == pytest.approx(1.0)
    assert "gap_closed" not in viz.gap_table(_report(False))
    st = viz.student_teacher_table(_report(False))
    assert st.loc["round_1"].tolist() == [50.0, 48.0]


def test_stage_checkpoints_order(tmp_path):
    for rel in ("source_only/model_final.pt", "round_2/train/teacher_final.pt", "round_10/train/teacher_final.pt",
                "round_2/train/student_final.pt", "oracle/model_final.pt"):  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert list(viz.stage_checkpoints(tmp_path)) == ["source_only", "round_2", "round_2_student", "round_10", "oracle"]


def test_confusions_figure_rows_sum_to_one(tiny_toytown, model_ckpt):
    from hias_nb.data import SegDataset

    ds = SegDataset("toytown", tiny_toytown, "target_val")
    mats = viz.stage_confusions({"a": model_ckpt}, ds, "cpu", max_images=2)
    assert mats["a"].sum() == int((torch.stack([ds[i]["label"] for i in range(2)]) != IGNORE).sum())
    fig = viz.confusion_figure(mats, CITYSCAPES_CLASSES)
    shown = fig.axes[0].images[0].get_array()
    rows = mats["a"].sum(1) > 0
    np.testing.assert_allclose(np.asarray(shown).sum(1)[rows], 1.0)
    report = viz.checkpoint_report({"a": model_ckpt, "b": model_ckpt}, ds, "cpu", max_images=2)
    from hias_nb.metrics import iou_per_class

    assert [s["name"] for s in report["stages"]] == ["a", "b"]
    expected = iou_per_class(mats["a"])
    got = [report["stages"][0]["per_class"][c] for c in CITYSCAPES_CLASSES]
    assert [g is None for g in got] == [e is None for e in expected]
    assert [g for g in got if g is not None] == pytest.approx([e for e in expected if e is not None], abs=0.006)
    gallery = viz.prediction_gallery({"a": model_ckpt}, ds, [0, 1], "cpu")
    assert len(gallery.axes) == 2 * 3


# ----------------------------------------------------------------------------------------------------------------
# Notebook 6


def test_manifest_table_lists_toytown():
    t = viz.manifest_table()
    row = t[(t["dataset"] == "toytown") & (t["split"] == "target_val")].iloc[0]
    assert row["count"] == 300 and row["protocol"] == "cityscapes19"
    assert {"gta5", "cityscapes", "synthia"} <= set(t["dataset"])


def test_published_layout_loads_back(model_ckpt, tmp_path):
    out = viz.write_published_layout(model_ckpt, tmp_path / "hiast.pth")
    raw = torch.load(out, weights_only=True)
    assert all(k.startswith(("seg_model.", "D.")) for k in raw)
    model = DeepLabV2("resnet10t", num_classes=C, aspp_rates=(1, 2))
    report = load_checkpoint(model, out, strict=True)
    assert not report.missing and not report.unexpected
    assert {"representation.0.weight", "D.conv1.weight"} <= set(report.ignored)
    want = torch.load(model_ckpt, weights_only=True)["state_dict"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, want[k])
    with pytest.raises(InputError):
        viz.write_published_layout(out, tmp_path / "again.pth")  # not a hias_nb checkpoint
