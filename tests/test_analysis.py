"""hias_nb.analysis (the computations behind the notebook figures) and the notebooks' computations that live with
their component (``losses.loss_maps``, ``models.write_published_layout``), checked against hand-computed values,
direct re-implementations and invariants (loss maps sum to the loss terms, CBST from histograms equals CBST, ...).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from hias_nb import analysis
from hias_nb.classes import CITYSCAPES_CLASSES, IGNORE
from hias_nb.data import SegDataset
from hias_nb.errors import InputError
from hias_nb.evaluate import evaluate, predict_probs
from hias_nb.io import read_json, read_label
from hias_nb.models import DeepLabV2, load_checkpoint, write_published_layout
from hias_nb.selectors import IAS, replay_ias
from hias_nb.train import load_model

C = 19


# ----------------------------------------------------------------------------------------------------------------
# Label overlays


def test_overlay_hand_computed():
    image = np.full((1, 3, 3), 100, dtype=np.uint8)
    image[0, 1] = 101
    label = np.array([[0, 0, IGNORE]])
    out = analysis.overlay(image, label, alpha=0.25)
    # road is (128, 64, 128): round(0.75 * 100 + 0.25 * 128) = 107, round(0.75 * 100 + 0.25 * 64) = 91
    assert out[0, 0].tolist() == [107, 91, 107]
    assert out[0, 1].tolist() == [108, 92, 108]  # 107.75 -> 108, 91.75 -> 92
    assert out[0, 2].tolist() == [100, 100, 100]  # ignored: the image, unblended
    assert out.dtype == np.uint8


def test_selection_map_colours():
    pseudo = np.array([[1, 2, IGNORE, 3]])
    gt = np.array([[1, 1, 4, IGNORE]])
    out = analysis.selection_map(pseudo, gt)
    assert out[0, 0].tolist() == [40, 170, 60]  # correct
    assert out[0, 1].tolist() == [220, 40, 40]  # wrong
    assert out[0, 2].tolist() == [150, 150, 150]  # ignored
    assert out[0, 3].tolist() == [0, 0, 0]  # no ground truth


# ----------------------------------------------------------------------------------------------------------------
# Notebook 1


def test_calibration_table_hand_computed():
    conf = np.array([0.05, 0.15, 0.55, 0.95, 1.0, 0.5])
    pred = np.array([1, 1, 2, 2, 2, 0])
    gt = np.array([1, 0, 2, 2, 1, IGNORE])  # the last pixel has no label: left out
    t = analysis.calibration_table(conf, pred, gt, bins=2)
    assert t["pixels"].tolist() == [2, 3]
    np.testing.assert_allclose(t["mean_conf"], [0.1, (0.55 + 0.95 + 1.0) / 3])
    np.testing.assert_allclose(t["accuracy"], [0.5, 2 / 3])
    ece = (2 * abs(0.5 - 0.1) + 3 * abs(2 / 3 - 2.5 / 3)) / 5
    assert analysis.expected_calibration_error(t) == pytest.approx(ece)
    per = analysis.class_calibration(conf, pred, gt, ["a", "b", "c", "d"])
    assert per.loc["b", "pixels"] == 2 and per.loc["b", "accuracy"] == pytest.approx(0.5)
    assert per.loc["c", "accuracy"] == pytest.approx(2 / 3)
    assert per.loc["a", "pixels"] == 0 and np.isnan(per.loc["d", "mean_conf"])


def test_class_frequencies_count_labelled_pixels(tiny_toytown):
    freq = analysis.class_frequencies(tiny_toytown, ("source_train", "target_val"), max_images=3)
    assert list(freq.index) == list(CITYSCAPES_CLASSES)
    np.testing.assert_allclose(freq.sum(), 1.0)
    names = sorted(p.name for p in (tiny_toytown / "target" / "val" / "labels").glob("*.png"))[:3]
    labels = np.concatenate([read_label(tiny_toytown / "target" / "val" / "labels" / n).ravel() for n in names])
    labels = labels[labels != IGNORE]
    expected = np.array([(labels == c).sum() for c in range(C)]) / labels.size
    np.testing.assert_allclose(freq["target_val"].to_numpy(), expected)


def test_read_log(tmp_path):
    with pytest.raises(InputError, match="log.csv"):
        analysis.read_log(tmp_path / "log.csv")
    log = pd.DataFrame({"iteration": [1, 2], "loss": [3.0, 2.0]})
    log.to_csv(tmp_path / "log.csv", index=False)
    pd.testing.assert_frame_equal(analysis.read_log(tmp_path / "log.csv"), log)


def test_collect_predictions_are_the_models_argmax(tiny_toytown, model_ckpt):
    model = load_model(model_ckpt, "cpu")
    ds = SegDataset("toytown", tiny_toytown, "target_val")
    out = analysis.collect_predictions(model, ds, "cpu", max_images=3, batch_size=2)  # two batches: 2 + 1
    images = torch.stack([ds[i]["image"] for i in range(3)])
    probs = predict_probs(model.eval(), images)
    assert out["conf"].shape == out["pred"].shape == out["gt"].shape == (3, *images.shape[-2:])
    np.testing.assert_array_equal(out["pred"], probs.argmax(1).numpy())
    np.testing.assert_allclose(out["conf"], probs.max(1).values.numpy(), rtol=1e-5)  # batches of 2 + 1 vs 3
    np.testing.assert_array_equal(out["gt"], torch.stack([ds[i]["label"] for i in range(3)]).numpy())
    np.testing.assert_array_equal(out["image"], images.permute(0, 2, 3, 1).numpy())


def test_split_iou_report(tiny_toytown, model_ckpt):
    model = load_model(model_ckpt, "cpu")
    report = analysis.split_iou_report(model, tiny_toytown, ["source_val", "target_val"], "cpu")
    assert [s["name"] for s in report["stages"]] == ["source_val", "target_val"]
    assert report["classes"] == list(CITYSCAPES_CLASSES)
    one = analysis.split_iou_report(model, tiny_toytown, ["target_val"], "cpu", max_images=1)
    ds = SegDataset("toytown", tiny_toytown, "target_val")
    direct = evaluate(model, torch.utils.data.Subset(ds, [0]), ds.protocol, "cpu", progress=False)
    assert one["stages"][0]["miou"] == pytest.approx(direct.miou, abs=0.006)


# ----------------------------------------------------------------------------------------------------------------
# Notebook 2


def test_threshold_matrix_is_the_ias_history(pseudo_dir, tmp_path):
    m = analysis.threshold_matrix(pseudo_dir)
    cfg = read_json(pseudo_dir / "summary.json")["config"]
    replay, _ = replay_ias(pd.read_parquet(pseudo_dir / "histograms.parquet"), C, cfg["alpha"], cfg["beta"],
                           cfg["gamma"], batch_size=cfg["batch_size"])  # fmt: skip
    np.testing.assert_array_equal(m, replay)
    with pytest.raises(InputError, match="threshold"):
        analysis.threshold_matrix(tmp_path)


def test_keep_fraction_table_hand_computed():
    ias = IAS(3, alpha=0.5, gamma=2.0, init=0.8)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ias.select(torch.rand(1, 4, 5, generator=g), torch.randint(0, 2, (1, 4, 5), generator=g))
    hist = ias.history
    t = analysis.keep_fraction_table(hist, alpha=0.5, gamma=2.0, init=0.8)
    assert (t["class"] != 2).all()  # class 2 never predicted: no row
    th = hist.pivot(index="instance", columns="class", values="threshold").to_numpy()
    row = t[(t["instance"] == 1) & (t["class"] == 0)].iloc[0]
    assert row["prev_threshold"] == th[0, 0] and row["target_keep"] == pytest.approx(0.5 * th[0, 0] ** 2)
    first = t[(t["instance"] == 0) & (t["class"] == 1)].iloc[0]
    assert first["prev_threshold"] == 0.8
    h0 = hist[(hist["instance"] == 0) & (hist["class"] == 1)].iloc[0]
    assert first["kept"] == h0["selected_pixels"] / h0["predicted_pixels"]


def test_pseudo_label_table(pseudo_dir):
    table = analysis.pseudo_label_table(pseudo_dir)
    stats = pd.read_parquet(pseudo_dir / "stats.parquet")
    c = int(stats.groupby("class")["selected_pixels"].sum().idxmax())
    sel = stats[stats["class"] == c]
    assert len(table) == C
    assert table["selected_px"].iloc[c] == sel["selected_pixels"].sum()
    assert table["gt_px"].iloc[c] == sel["gt_pixels"].sum()
    assert table["precision"].iloc[c] == pytest.approx(sel["correct_selected"].sum() / sel["selected_pixels"].sum())
    assert table["recall"].iloc[c] == pytest.approx(sel["correct_selected"].sum() / sel["gt_pixels"].sum())


# ----------------------------------------------------------------------------------------------------------------
# Notebook 4: ablations


def _ablation_frame() -> pd.DataFrame:
    """Two variants x three seeds x two stages; mIoU = base + stage gain + seed (hand-checkable means)."""
    rows = []
    for variant, base in (("hiast", 50.0), ("no_hpla", 46.0)):
        for seed in (0, 1, 2):
            for stage, gain in (("round_1", 0.0), ("round_2", 2.0)):
                rows.append({"variant": variant, "seed": seed, "stage": stage, "miou": base + gain + seed,
                             **{c: 10.0 for c in CITYSCAPES_CLASSES}})  # fmt: skip
    return pd.DataFrame(rows)


def test_ablation_loader_and_summary(tmp_path):
    assert analysis.load_ablation(tmp_path / "absent.csv") is None
    df = _ablation_frame()
    df.to_csv(tmp_path / "a.csv", index=False)
    pd.testing.assert_frame_equal(analysis.load_ablation(tmp_path / "a.csv"), df)
    d = analysis.ablation_differences(df, baseline="hiast")  # round_2 per seed: (48 + s) - (52 + s)
    assert d["variant"].tolist() == ["no_hpla"] * 3 and d["diff"].tolist() == [-4.0] * 3
    df.drop(columns=["seed"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(InputError, match="seed"):
        analysis.load_ablation(tmp_path / "bad.csv")


# ----------------------------------------------------------------------------------------------------------------
# Notebook 5


def _report(with_oracle: bool) -> dict:
    stages = [{"name": "source_only", "miou": 40.0}, {"name": "source_only_adabn", "miou": 44.0},
              {"name": "round_1", "miou": 50.0}]  # fmt: skip
    if with_oracle:
        stages.append({"name": "oracle", "miou": 60.0})
    return {"stages": stages, "students": [{"name": "round_1_student", "miou": 48.0}]}


def test_gap_and_student_teacher_tables():
    t = analysis.gap_table(_report(True))
    assert t.loc["round_1", "gain"] == 10.0 and t.loc["round_1", "gap_closed"] == pytest.approx(0.5)
    assert t.loc["source_only_adabn", "gap_closed"] == pytest.approx(0.2)  # (44 - 40) / (60 - 40)
    assert t.loc["oracle", "gap_closed"] == pytest.approx(1.0)
    assert "gap_closed" not in analysis.gap_table(_report(False))
    st = analysis.student_teacher_table(_report(False))
    assert st.loc["round_1"].tolist() == [50.0, 48.0]


def test_rounds_and_students_read_alike_from_a_demo_and_a_run_report():
    """A demo report lists students under ``students``; a `hias-nb run` report lists them as stages."""
    demo = {"stages": [{"name": "warmup", "miou": 30.0}, {"name": "round_1", "miou": 35.0},
                       {"name": "round_2", "miou": 36.0}, {"name": "oracle", "miou": 60.0}],
            "students": [{"name": "round_1_student", "miou": 34.0},
                         {"name": "round_2_student", "miou": 33.0}]}  # fmt: skip
    for s in [*demo["stages"], *demo["students"]]:
        s["per_class"] = {"road": s["miou"]}
    run = {"stages": [*demo["stages"][:3], *demo["students"]]}
    for report in (demo, run):
        assert analysis.round_teachers(report) == ["round_1", "round_2"]
        assert analysis.student_mious(report) == {"round_1_student": 34.0, "round_2_student": 33.0}
        st = analysis.student_teacher_table(report)
        assert st.index.tolist() == ["round_1", "round_2"] and st["student"].tolist() == [34.0, 33.0]
        assert any("36.0 against its student 33.0" in line for line in analysis.findings_stages(report))


def test_benchmark_calibration_and_hardest_classes_by_hand():
    pc = {"road": 90.0, "pole": 10.0, "car": 50.0, "bus": 5.0}
    report = {"stages": [{"name": "source_only", "miou": 20.0}, {"name": "source_only_adabn", "miou": 24.0},
                         {"name": "warmup", "miou": 30.0}, {"name": "round_1", "miou": 35.0},
                         {"name": "round_2", "miou": 40.0, "per_class": pc},
                         {"name": "oracle", "miou": 60.0, "per_class": {**pc, "bus": 1.0}}]}  # fmt: skip
    t = analysis.benchmark_calibration(report)
    ours = t["toytown"].to_dict()
    assert ours == pytest.approx({"source_only": 20.0, "warmup": 30.0, "final": 40.0, "oracle": 60.0,
                                  "source/oracle": 1 / 3, "gain": 20.0, "warmup_share": 0.5, "rounds_share": 0.5,
                                  "rounds_gain": 10.0, "gap_closed": 0.5})  # fmt: skip
    ref = t["reference"]  # GTA5 → Cityscapes: 36.6 source-only, 42.4 warm-up, 56.3 final, 65.1 oracle
    assert ref["source/oracle"] == pytest.approx(36.6 / 65.1) and ref["gap_closed"] == pytest.approx(19.7 / 28.5)
    assert ref["warmup_share"] == pytest.approx(5.8 / 19.7) and ref["rounds_gain"] == pytest.approx(13.9)
    no_oracle = analysis.benchmark_calibration({"stages": report["stages"][:4]})["toytown"]
    assert no_oracle["final"] == 35.0 and np.isnan(no_oracle["gap_closed"]) and no_oracle["rounds_gain"] == 5.0
    assert analysis.hardest_classes(report, 2) == ["bus", "pole"]  # the last round's, not the oracle's


def test_stage_checkpoints_order(tmp_path):
    for rel in ("source_only/model_final.pt", "round_2/train/teacher_final.pt", "round_10/train/teacher_final.pt",
                "round_2/train/student_final.pt", "oracle/model_final.pt"):  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    got = analysis.stage_checkpoints(tmp_path)
    assert list(got) == ["source_only", "round_2", "round_2_student", "round_10", "oracle"]
    assert got["round_2_student"] == tmp_path / "round_2" / "train" / "student_final.pt"


def test_stage_confusions_and_checkpoint_report(tiny_toytown, model_ckpt):
    from hias_nb.metrics import iou_per_class

    ds = SegDataset("toytown", tiny_toytown, "target_val")
    mats = analysis.stage_confusions({"a": model_ckpt}, ds, "cpu", max_images=2)
    labels = torch.stack([ds[i]["label"] for i in range(2)])
    pred = predict_probs(load_model(model_ckpt, "cpu").eval(), torch.stack([ds[i]["image"] for i in range(2)]))
    pred = pred.argmax(1)
    valid = labels != IGNORE
    expected = np.zeros((C, C), dtype=np.int64)
    np.add.at(expected, (labels[valid].numpy(), pred[valid].numpy()), 1)  # rows ground truth, columns prediction
    np.testing.assert_array_equal(mats["a"], expected)
    report = analysis.checkpoint_report({"a": model_ckpt, "b": model_ckpt}, ds, "cpu", max_images=2)
    assert [s["name"] for s in report["stages"]] == ["a", "b"]
    ious = iou_per_class(expected)
    got = [report["stages"][0]["per_class"][c] for c in CITYSCAPES_CLASSES]
    assert [g is None for g in got] == [e is None for e in ious]
    assert [g for g in got if g is not None] == pytest.approx([e for e in ious if e is not None], abs=0.006)
    # under another protocol (a SYNTHIA run's report leads with synthia16): the mean over its 16 classes only
    s16 = analysis.checkpoint_report({"a": model_ckpt}, ds, "cpu", max_images=2, protocol="synthia16")
    assert s16["protocol"] == "synthia16"
    left_out = ("terrain", "truck", "train")  # the three Cityscapes classes SYNTHIA does not label
    kept = [e for c, e in zip(CITYSCAPES_CLASSES, ious, strict=True) if c not in left_out and e is not None]
    assert s16["stages"][0]["miou"] == pytest.approx(float(np.mean(kept)), abs=0.01)
    # and at another input size (a run's evaluate.size) the network sees other pixels: other counts
    small = analysis.stage_confusions({"a": model_ckpt}, ds, "cpu", max_images=2, size=(16, 32))
    assert small["a"].sum() == expected.sum() and not np.array_equal(small["a"], expected)


def test_checkpoint_predictions(tiny_toytown, model_ckpt):
    ds = SegDataset("toytown", tiny_toytown, "target_val")
    images, labels, preds = analysis.checkpoint_predictions({"a": model_ckpt}, ds, [3, 1], "cpu")
    model = load_model(model_ckpt, "cpu").eval()
    for k, i in enumerate((3, 1)):
        np.testing.assert_array_equal(images[k], ds[i]["image"].permute(1, 2, 0).numpy())
        np.testing.assert_array_equal(labels[k], ds[i]["label"].numpy())
        np.testing.assert_array_equal(preds["a"][k], predict_probs(model, ds[i]["image"][None]).argmax(1)[0].numpy())


# ----------------------------------------------------------------------------------------------------------------
# Notebook 6


def test_manifest_table_lists_toytown():
    t = analysis.manifest_table()
    row = t[(t["dataset"] == "toytown") & (t["split"] == "target_val")].iloc[0]
    assert row["count"] == 300 and row["protocol"] == "cityscapes19"
    assert {"gta5", "cityscapes", "synthia"} <= set(t["dataset"])


def test_published_layout_loads_back(model_ckpt, tmp_path):
    out = write_published_layout(model_ckpt, tmp_path / "hiast.pth")
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
        write_published_layout(out, tmp_path / "again.pth")  # not a hias_nb checkpoint


def test_ablation_differences_pair_each_seed_with_the_full_method():
    rows = []
    for seed, (wu, full, cbst, ctl) in {0: (30.0, 35.0, 33.0, 31.0), 1: (32.0, 34.0, 36.0, 30.0)}.items():
        for v, last in (("full", full), ("cbst", cbst)):
            rows += [{"variant": v, "seed": seed, "stage": "warmup", "miou": wu},
                     {"variant": v, "seed": seed, "stage": "round_1", "miou": 0.0},
                     {"variant": v, "seed": seed, "stage": "round_2", "miou": last}]  # fmt: skip
        rows += [{"variant": "control", "seed": seed, "stage": "control", "miou": 1.0},
                 {"variant": "control", "seed": seed, "stage": "control_adabn", "miou": ctl}]  # fmt: skip
    rows.append({"variant": "cbst", "seed": 2, "stage": "round_2", "miou": 50.0})  # no full run on seed 2
    d = analysis.ablation_differences(pd.DataFrame(rows))
    got = {(r.variant, r.seed): r.diff for r in d.itertuples()}
    assert got == {("warmup", 0): -5.0, ("cbst", 0): -2.0, ("control_adabn", 0): -4.0,
                   ("warmup", 1): -2.0, ("cbst", 1): 2.0, ("control_adabn", 1): -4.0}  # fmt: skip
    s = analysis.difference_summary(d)
    assert s.loc["cbst", "mean"] == 0.0 and s.loc["cbst", "std"] == pytest.approx(2 * 2**0.5)
    assert s.loc["warmup", "seeds"] == 2 and s.loc["cbst", "what"] == analysis.VARIANT_NOTES["cbst"]
    assert s["sign"].to_dict() == {"warmup": "full better on every seed", "cbst": "mixed",
                                   "control_adabn": "full better on every seed"}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# What we saw


def test_findings_gap_and_calibration_by_hand():
    src = {"name": "source_val", "miou": 60.0, "per_class": {"a": 80.0, "b": 40.0, "c": 60.0}}
    gap = {"stages": [src, {"name": "target_val", "miou": 45.0, "per_class": {"a": 75.0, "b": 10.0, "c": 50.0}}]}
    lines = analysis.findings_gap(gap)
    assert "**60.0**" in lines[0] and "**45.0**" in lines[0] and "15.0 points" in lines[0]
    assert lines[1] == "Largest losses on the target: b -30.0, c -10.0, a -5.0 (IoU points)."
    table = pd.DataFrame({"pixels": [10, 10], "mean_conf": [0.3, 0.9], "accuracy": [0.3, 0.6]})
    per = pd.DataFrame({"pixels": [5000, 200, 3000], "mean_conf": [0.9, 0.99, 0.67], "accuracy": [0.85, 0.0, 0.03]},
                       index=["road", "train", "truck"])  # fmt: skip
    cal = analysis.findings_calibration(table, per)
    assert "**15.0 %**" in cal[0]  # half the pixels at |0.3 - 0.3|, half at |0.6 - 0.9|
    assert "**truck** — 3000 pixels at mean confidence 0.67, 3 % of them right" in cal[1]  # train: too few pixels


def test_findings_pseudo_labels_weigh_precision_by_kept_pixels():
    table = pd.DataFrame({"predicted_px": [100, 50, 50], "selected_px": [80, 10, 0], "precision": [1.0, 0.5, np.nan]},
                         index=["road", "pole", "rider"])  # fmt: skip
    lines = analysis.findings_pseudo_labels(table, hard=[1, 2])
    assert lines[0] == "IAS kept **45.0 %** of the target-train pixels."  # 90 of 200
    assert lines[1] == "Of the kept pixels, **94.4 %** carry the right class."  # (80 + 5) / 90
    assert lines[2] == "Precision of the hard classes' kept pixels: 50.0 % (1 classes)."  # rider kept nothing
    assert lines[3] == "Precision of the other classes' kept pixels: 100.0 % (1 classes)."
    assert lines[4] == "Least precise: pole 50 %, road 100 %."


def test_findings_hpla_losses_and_stages_by_hand():
    h = analysis.findings_hpla(
        ["a", "b", "c", "d"], [0, 1, 2], [0.5, 0.3, 0.2, 0.0], [0.0, 0.6, 0.4, 0.0], [0, 3, 2, 9]
    )
    assert h == ["3 hard classes; 2 can be drawn.",
                 "Without donors, never drawn: a — 50 % of the formula's probability, handed to the others.",
                 "Most likely draws: b 60 %, c 40 %."]  # fmt: skip
    assert analysis.findings_losses(
        {"ce": 0.6, "kld": 2.0, "entropy": 0.2}, {"ce": 1.0, "kld": 0.1, "entropy": 0.0}
    ) == ["Shares of the weighted total on this batch: ce 75 %, kld 25 %, entropy 0 %."]
    pc = lambda a, b: {"x": a, "y": b}  # noqa: E731
    report = {"stages": [{"name": "source_only", "miou": 20.0, "per_class": pc(20, 20)},
                         {"name": "source_only_adabn", "miou": 24.0, "per_class": pc(24, 24)},
                         {"name": "warmup", "miou": 30.0, "per_class": pc(40, 20)},
                         {"name": "round_1", "miou": 33.0, "per_class": pc(44, 22)},
                         {"name": "round_2", "miou": 32.0, "per_class": pc(50, 14)},
                         {"name": "oracle", "miou": 60.0, "per_class": pc(60, 60)}],
              "students": [{"name": "round_2_student", "miou": 31.0}]}  # fmt: skip
    got = analysis.findings_stages(report)
    assert (
        got[0] == "The final stage (round_2's teacher) scores **32.0** mIoU: +12.0 over source-only, +8.0 over AdaBN."
    )
    assert got[1] == "The self-training rounds add **2.0** points against their start (warmup)."
    assert got[2] == "Round by round: round_1 → round_2 -1.0."
    assert got[3] == "It closes **30 %** of the source-only → oracle gap (oracle 60.0)."
    assert got[4] == "Classes the rounds helped most: x +10.0; hurt most: y -6.0 (IoU points, warmup → round_2)."
    assert got[5] == "round_2's EMA teacher 32.0 against its student 31.0."
    lost = analysis.findings_stages({"stages": report["stages"][:4] + [{"name": "round_2", "miou": 28.0,
                                                                        "per_class": pc(30, 26)}]})  # fmt: skip
    assert lost[1] == "The self-training rounds lose **2.0** points against their start (warmup)."


def test_findings_stages_of_an_experiment_report_skip_students_and_missing_stages():
    pc = {"x": 1.0}
    report = {
        "stages": [
            {"name": "round_1", "miou": 40.0, "per_class": pc},
            {"name": "round_1_student", "miou": 39.0, "per_class": pc},
            {"name": "round_2", "miou": 42.0, "per_class": pc},
            {"name": "round_2_student", "miou": 41.0, "per_class": pc},
        ]
    }  # start_from: no source stages
    assert analysis.findings_stages(report) == ["The final stage (round_2's teacher) scores **42.0** mIoU."]
    assert analysis.hardest_classes(report, 1) == ["x"]
    cal = analysis.benchmark_calibration({"stages": [{"name": "source_only", "miou": 30.0},
                                                     {"name": "round_1", "miou": 30.0}]})["toytown"]  # fmt: skip
    assert cal["gain"] == 0 and np.isnan(cal["rounds_share"])  # no exception on a zero gain
