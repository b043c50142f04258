"""hias_nb.widgets driven from code: setting a control's ``.value`` runs the widget's callback in the kernel, so
the tests assert on the data the widget computed and drew."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from hias_nb import analysis, viz, widgets
from hias_nb.classes import CITYSCAPES_CLASSES, IGNORE
from hias_nb.data import SegDataset
from hias_nb.errors import InputError
from hias_nb.hpla import HPLA
from hias_nb.pseudo_label import PseudoLabelConfig, generate_pseudo_labels
from hias_nb.selectors import IAS, replay_ias
from hias_nb.self_train import PseudoLabelledTarget, SelfTrainConfig, round_views
from hias_nb.train import TrainConfig

C = 19


@pytest.fixture(scope="module")
def argmax_dir(tiny_toytown, model_ckpt, tmp_path_factory):
    """Pseudo-labels that keep every argmax pixel: every predicted class has donors for HPLA."""
    out = tmp_path_factory.mktemp("pl") / "argmax"
    cfg = PseudoLabelConfig(out=str(out), checkpoint=str(model_ckpt), data_root=str(tiny_toytown), policy="none",
                            progress=False, device="cpu")  # fmt: skip
    return generate_pseudo_labels(cfg)


def test_threshold_replay_matches_ias_and_redraws(pseudo_dir, tiny_toytown, model_ckpt):
    w = widgets.ThresholdReplay(pseudo_dir, hard=(5, 6))
    assert w.status.value.startswith("kept ") and "folder's own setting" in w.status.value  # not blank at start
    # the replay at the folder's settings is the IAS history written during generation
    np.testing.assert_array_equal(w.thresholds, analysis.threshold_matrix(pseudo_dir))
    before_png = w.image.value
    before = [line.get_ydata().copy() for line in w.lines]
    w.alpha.value = 0.1
    assert w.image.value != before_png
    expected, _ = replay_ias(pd.read_parquet(pseudo_dir / "histograms.parquet"), C, 0.1, 0.9, 8.0, batch_size=2)
    np.testing.assert_array_equal(w.thresholds, expected)
    np.testing.assert_array_equal(w.lines[0].get_ydata(), expected[:, 0])
    # the curves were redrawn: every line shows the new history, and a class the model predicts moved
    for k, line in enumerate(w.lines):
        np.testing.assert_array_equal(line.get_ydata(), expected[:, k])
    assert any(not np.array_equal(b, line.get_ydata()) for b, line in zip(before, w.lines, strict=True))
    w.instance.value = "image"
    assert w.thresholds.shape == (24, C)  # one instance per image of the tiny target-train split
    # independent check: IAS run image by image on the model's own outputs gives the same thresholds
    from hias_nb.evaluate import predict_probs
    from hias_nb.io import read_json
    from hias_nb.train import load_model

    ds = SegDataset("toytown", tiny_toytown, "target_train")
    index = {s.id: i for i, s in enumerate(ds.samples)}
    order = read_json(pseudo_dir / "summary.json")["order"]
    images = torch.stack([ds[index[name]]["image"] for name in order])
    conf, pred = predict_probs(load_model(model_ckpt, "cpu").eval(), images).max(1)
    ias = IAS(C, alpha=0.1, beta=0.9, gamma=8.0, instance="image")
    ias.select(conf, pred)
    np.testing.assert_array_equal(w.thresholds[-1], ias.thresholds.numpy())
    # precision and recall of the replayed selection, against a direct count at float16 resolution
    gt = torch.stack([ds[index[name]]["label"] for name in order]).numpy()
    q16, p = conf.numpy().astype(np.float16).astype(np.float64), pred.numpy()
    sel = np.zeros(C)
    cor = np.zeros(C)
    for i in range(len(order)):
        keep = q16[i] >= w.thresholds[i][p[i]]
        sel += np.bincount(p[i][keep], minlength=C)
        cor += np.bincount(p[i][keep & (gt[i] == p[i])], minlength=C)
    q = w.quality
    has = sel > 0
    np.testing.assert_allclose(q["precision %"].to_numpy()[has], 100 * cor[has] / sel[has])
    gt_px = np.bincount(gt[gt != 255], minlength=C)[:C]
    np.testing.assert_allclose(q["recall %"].to_numpy()[gt_px > 0], 100 * cor[gt_px > 0] / gt_px[gt_px > 0])
    assert "precision %" in w.table.value
    w.show.value = CITYSCAPES_CLASSES[5]  # one class forward, the rest faded
    assert w.lines[5].get_linewidth() > w.lines[0].get_linewidth() and w.lines[0].get_alpha() < 0.2
    assert f"▶ {CITYSCAPES_CLASSES[5]}" in w.table.value
    w.gamma.value = 2.0
    assert "kept" in w.status.value


def test_hpla_preview_arrays_are_consistent(argmax_dir, pseudo_dir, tiny_toytown):
    from hias_nb.self_train import build_hpla

    images = SegDataset("toytown", tiny_toytown, "target_train")
    # edge case (docs/method.md B4): no hard class has donors, so nothing can be drawn and nothing is pasted
    target = PseudoLabelledTarget(images, pseudo_dir)
    hpla = HPLA([3, 4], np.full(C, 1 / C), {}, target.load)
    s = widgets.hpla_preview(hpla, target, 0, torch.Generator().manual_seed(1))
    assert s.draws == [] and s.donors == [] and (s.provenance == IGNORE).all()
    np.testing.assert_array_equal(s.result, s.recipient)
    assert len(widgets.hpla_preview_figure(s).axes) == 8

    target = PseudoLabelledTarget(images, argmax_dir)
    for mode in ("reference", "intended"):
        hpla = build_hpla(argmax_dir, target, 14, (), mode, 0.1, torch.Generator().manual_seed(3))
        for recipient in (0, 5):
            s = widgets.hpla_preview(hpla, target, recipient, torch.Generator().manual_seed(1))
            pasted = s.provenance != IGNORE
            assert len(s.draws) >= 1 and (mode == "intended" or len(s.draws) == 1)
            assert pasted.any()
            np.testing.assert_array_equal(s.result[~pasted], s.recipient[~pasted])
            np.testing.assert_array_equal(s.result_label[~pasted], s.recipient_label[~pasted])
            np.testing.assert_array_equal(s.result_label[pasted], s.provenance[pasted])
            last_name, last_image, last_label = s.donors[-1]
            from_last = pasted & np.isin(last_label, hpla.hard.numpy())
            np.testing.assert_array_equal(s.result[from_last], last_image[from_last])  # the last paste wins
            if mode == "reference":
                np.testing.assert_array_equal(s.result[pasted], last_image[pasted])
            assert set(np.unique(s.provenance[pasted])) <= set(hpla.hard.tolist())
            assert s.weak.shape == s.strong.shape == s.result.shape
            # the weak view moved label and provenance together: pasted pixels keep their pasted class
            wp = s.weak_provenance != IGNORE
            np.testing.assert_array_equal(s.weak_label[wp], s.weak_provenance[wp])
    # the views are the round's (the training pipeline) of the result, from the same generator state
    chw = lambda a: torch.from_numpy(a)[None]  # noqa: E731
    views = round_views(SelfTrainConfig(), chw(s.result).permute(0, 3, 1, 2), chw(s.result_label), chw(s.provenance),
                        torch.Generator().manual_seed(1))  # fmt: skip
    np.testing.assert_array_equal(s.weak, views.weak[0].permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(s.strong, views.strong[0].permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(s.weak_label, views.label[0].numpy())
    np.testing.assert_array_equal(s.weak_provenance, views.provenance[0].numpy())
    assert s.strong_ops == views.strong_ops[0]
    fig = widgets.hpla_preview_figure(s)  # the strong view's operations under it, the pasted classes' legend
    assert fig.axes[7].get_xlabel().replace("\n", " ").rstrip() == widgets.describe_ops(s.strong_ops)
    legend = [t.get_text() for t in fig.axes[3].get_legend().get_texts()]
    assert legend == [CITYSCAPES_CLASSES[c] for c in sorted({c for d in s.draws for c in d.pasted})]


def test_describe_ops_by_hand():
    ops = [("random_contrast", {"alpha": 3.6}), ("solarize", {"threshold": 128}), ("to_gray", {}),
           ("color_jitter", {"brightness": 0.84, "contrast": 1.2, "saturation": 0.9, "hue": -0.15, "order": ()}),
           ("gaussian_blur", {"ksize": 5, "sigma": 1.25}), ("posterize", {"bits": 4}), ("equalize", {}),
           ("random_brightness", {"beta": -0.36})]  # fmt: skip
    assert widgets.describe_ops(ops) == (
        "contrast ×3.60, solarize ≥128, grey, jitter b×0.84 c×1.20 s×0.90 hue-0.15, blur 5 px σ 1.2, "
        "posterize 4 bits, equalize, brightness -0.36"
    )
    assert widgets.describe_ops([]) == "no operation fired"


def test_hpla_preview_widget_controls(argmax_dir, tiny_toytown):
    w = widgets.HPLAPreview(argmax_dir, tiny_toytown, seed=0)
    assert w.sample is not None and w.image.value
    name = w.recipient.options[3]
    w.recipient.value = name
    assert w.sample.recipient_name == name
    w.mode.value = "intended"
    assert w.hpla.mode == "intended" and w.sample.recipient_name == name
    png, before = w.image.value, w.sample
    states = w.hpla_generator.get_state(), w.view_generator.get_state()
    w.button.click()
    after = w.sample
    assert after is not before and not np.array_equal(after.weak, before.weak)  # new view draws
    assert w.image.value != png
    assert after.recipient_name == name
    # independent expectation: the same generator states through hpla_preview, rendered, give the shown image
    w.hpla_generator.set_state(states[0])
    w.view_generator.set_state(states[1])
    expected = widgets.hpla_preview(w.hpla, w.target, name, w.view_generator)
    assert expected.draws == after.draws
    np.testing.assert_array_equal(expected.strong, after.strong)
    fresh = widgets.hpla_preview_figure(expected, w.classes)  # the widget's figure, redrawn in place, shows the same
    for a, b in zip(w.panels.figure.axes, fresh.axes, strict=True):
        assert (a.get_title(), a.get_xlabel()) == (b.get_title(), b.get_xlabel())
        np.testing.assert_array_equal(a.images[0].get_array(), b.images[0].get_array())
        legends = [[t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else None for ax in (a, b)]
        assert legends[0] == legends[1]
    assert w.panels.figure.get_suptitle() == fresh.get_suptitle()
    assert "donor" in w.info.value


def test_loss_map_explorer_checkboxes(pseudo_dir, tiny_toytown, model_ckpt):
    target = PseudoLabelledTarget(SegDataset("toytown", tiny_toytown, "target_train"), pseudo_dir)
    w = widgets.LossMapExplorer(model_ckpt, model_ckpt, target, "cpu", indices=(0, 1))
    s = w.maps["scalars"]
    full = 1.0 * s["ce"] + 0.1 * s["kld"] + 1.0 * s["entropy"] + 0.5 * s["consistency"]
    assert w.total.sum() == pytest.approx(full, rel=1e-4)
    before = w.total.copy()
    w.checks["ce"].value = False
    np.testing.assert_allclose(w.total, before - w.maps["ce"], atol=1e-9)
    assert w.active_weights()["ce"] == 0.0
    png = w.image.value
    w.index.value = 1
    assert w.image.value != png
    w.index.value = 0  # back to a drawn choice: the same picture, from the cache
    assert w.image.value == png  # from the cache
    drawn = [(ax.get_title(), ax.images[0].get_array()) for ax in w.panels.figure.axes if ax.images]
    new = viz.loss_map_figure(w.maps, 1, w.active_weights())
    fresh = [(ax.get_title(), ax.images[0].get_array()) for ax in new.axes if ax.images]
    assert [t for t, _ in drawn] == [t for t, _ in fresh]  # the figure in place: the last choice drawn (image 1)
    for (_, a), (_, b) in zip(drawn, fresh, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(w._pngs) == 3  # all ticked (image 0), ce unticked (image 0), ce unticked (image 1)


def test_resolve_run(tmp_path):
    with pytest.raises(InputError, match="report.json"):
        widgets.resolve_run(tmp_path / "nowhere", quick=True)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "report.json").write_text("{}")
    assert widgets.resolve_run(tmp_path / "r", quick=True) == tmp_path / "r"
    (tmp_path / "runs" / "demo_quick").mkdir(parents=True)
    (tmp_path / "runs" / "demo_quick" / "report.json").write_text("{}")
    assert widgets.resolve_run(None, quick=True, runs_root=tmp_path / "runs") == tmp_path / "runs" / "demo_quick"


def test_round_config_reads_the_saved_config(tmp_path):
    from hias_nb.runs import prepare_run_dir
    from hias_nb.self_train import SelfTrainConfig

    cfg = SelfTrainConfig(out="x", lambda_ent=0.25, crop_scale=(0.5, 1.0), ignored_classes=(9, 14, 16))
    prepare_run_dir(tmp_path / "round_2" / "train", cfg)
    assert widgets.round_config(tmp_path, 2) == cfg
    with pytest.raises(InputError, match="round 1"):
        widgets.round_config(tmp_path, 1)


@pytest.mark.slow
def test_train_source_live_draws_curve_and_finishes(tiny_toytown, tmp_path, capsys):
    import ipywidgets as W

    cfg = TrainConfig(out=str(tmp_path / "src"), data_root=str(tiny_toytown), iterations=4, batch_size=2,
                      aspp_rates=(1, 2), warmup=0, progress=False, device="cpu")  # fmt: skip
    out = W.Output()
    path = widgets.train_source_live(cfg, chunk=3, output=out)
    assert path.name == "model_final.pt" and path.exists()
    log = analysis.read_log(tmp_path / "src" / "log.csv")
    assert log["iteration"].tolist() == [1, 2, 3, 4]
    assert len(out.outputs) == 1  # cleared and redrawn after each chunk
    said = capsys.readouterr().out
    assert "paused at" not in said and "resuming at" not in said and "trained 4 iterations in chunks of 3" in said
    with pytest.raises(InputError):
        widgets.train_source_live(cfg, chunk=0)


def test_confusion_picker_starts_on_the_rounds_change_and_follows_its_controls():
    rng = np.random.default_rng(0)
    mats = {n: rng.integers(0, 50, (3, 3)) for n in ("source_only", "warmup", "round_1", "round_2")}
    p = widgets.ConfusionPicker(mats, ["a", "b", "c"])
    assert (p.stage.value, p.minus.value) == ("round_2", "warmup")
    expected = viz.confusion_panel(mats["round_2"], ["a", "b", "c"], "round_2 − warmup, points of each row",
                                   reference=mats["warmup"])  # fmt: skip
    assert p.image.value == widgets.figure_png(expected, dpi=80)
    p.minus.value = p.NONE
    p.stage.value = "source_only"
    plain = viz.confusion_panel(mats["source_only"], ["a", "b", "c"], "source_only (rows sum to 100 %)")
    ours = p.panels.figure.axes[0]
    np.testing.assert_array_equal(ours.images[0].get_array(), plain.axes[0].images[0].get_array())
    assert ours.get_title() == plain.axes[0].get_title()
    png = p.image.value
    p.stage.value = "warmup"
    assert p.image.value != png and len(p._pngs) == 4  # round_2 − warmup, round_2, source_only, warmup: once each
    p.stage.value = "source_only"
    assert p.image.value == png  # a choice seen before: from the cache


def test_run_target_reads_an_experiments_target_and_falls_back_to_toytown(tmp_path, tiny_toytown):
    from hias_nb.io import read_json, write_json

    demo, exp = tmp_path / "demo", tmp_path / "exp"
    write_json(demo / "report.json", {"config": {"demo": {"data_root": "data/toytown"}, "quick": True}})
    write_json(exp / "report.json", {"config": {"experiment": {"target_dataset": "toytown", "target_root":
               str(tiny_toytown), "target_split": "target_train", "val_split": "target_val"}}})  # fmt: skip
    assert widgets.run_target(read_json(demo / "report.json"), "../data/toytown") == widgets.RunTarget(
        "toytown", "../data/toytown", "target_train", "target_val")  # fmt: skip
    t = widgets.run_target(read_json(exp / "report.json"), "ignored")
    assert t.root == str(tiny_toytown) and len(t.val()) == len(SegDataset("toytown", tiny_toytown, "target_val"))
    # scored as the run scored: no evaluate section recorded → the experiment defaults
    assert t.eval_settings == {"size": (768, 1536), "batch_size": 2, "scales": (1.0,), "flip": False}
    report = read_json(exp / "report.json")
    report["config"]["experiment"].update(evaluate={"size": [64, 128], "scales": [1.0, 1.5], "flip": True},
                                          protocols=["synthia16", "synthia13"])  # fmt: skip
    t = widgets.run_target(report)
    assert t.eval_size == (64, 128) and t.eval_settings == {"size": (64, 128), "batch_size": 2, "scales": (1.0, 1.5),
                                                             "flip": True, "protocol": "synthia16"}  # fmt: skip
    assert t.predict_settings == {"size": (64, 128), "scales": (1.0, 1.5), "flip": True}
    assert widgets.run_target(read_json(demo / "report.json")).eval_settings == {}  # a demo: native size
