"""Pseudo-labelling, a self-training round and the demo on a tiny toytown: files, determinism, refusal to mix,
exact resumption, and that the statistics on disk replay the selector exactly."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from hias_nb.data import SegDataset
from hias_nb.errors import InputError
from hias_nb.io import read_json, read_label
from hias_nb.pseudo_label import PseudoLabelConfig, generate_pseudo_labels, summary_table
from hias_nb.runner import infinite_loader
from hias_nb.selectors import ConfidenceHistogram, replay_ias
from hias_nb.self_train import HPLATarget, PseudoLabelledTarget, SelfTrainConfig, build_hpla, self_train


def _pl(root, ckpt, out, **kw) -> PseudoLabelConfig:
    return PseudoLabelConfig(out=str(out), checkpoint=str(ckpt), data_root=str(root), progress=False, **kw)


def test_pseudo_labels_deterministic_and_replayable(tiny_toytown, model_ckpt, tmp_path):
    a = generate_pseudo_labels(_pl(tiny_toytown, model_ckpt, tmp_path / "a", alpha=0.5, seed=3))
    # b runs one model forward per selection batch, a eight batches per forward: the same labels and thresholds
    b = generate_pseudo_labels(_pl(tiny_toytown, model_ckpt, tmp_path / "b", alpha=0.5, seed=3, forward_batch=2))
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    assert sa["thresholds"] == sb["thresholds"] and sa["order"] == sb["order"]
    names = sorted(p.name for p in (a / "labels").glob("*.png"))
    assert len(names) == 24
    for n in names:
        la, lb = read_label(a / "labels" / n), read_label(b / "labels" / n)
        assert np.array_equal(la, lb)
        assert set(np.unique(la)) <= set(range(19)) | {255}
    # the histograms on disk replay IAS exactly (the notebook's slider path), in the recorded order
    hist = pd.read_parquet(a / "histograms.parquet")
    order = sa["order"]
    hist["image"] = hist["image"].map({n: i for i, n in enumerate(order)})
    th, _ = replay_ias(ConfidenceHistogram(hist, 19), 19, alpha=0.5, beta=0.9, gamma=8.0, batch_size=2)
    assert np.array_equal(th[-1], np.asarray(sa["thresholds"]))
    history = pd.read_parquet(a / "thresholds.parquet")
    assert history["instance"].nunique() == 12 and len(history) == 12 * 19
    # donors list every image with selected pixels of the class, with its count
    donors = json.loads((a / "donors.json").read_text())
    stats = pd.read_parquet(a / "stats.parquet")
    for c, rows in donors.items():
        sel = stats[(stats["class"] == int(c)) & (stats["selected_pixels"] > 0)]
        assert sorted(map(tuple, rows)) == sorted(zip(sel["image"], sel["selected_pixels"], strict=True))
    table = summary_table(a)
    assert list(table.index)[:2] == ["road", "sidewalk"] and "precision" in table


def test_other_seed_other_order_and_policies(tiny_toytown, model_ckpt, tmp_path):
    a = json.loads(
        (generate_pseudo_labels(_pl(tiny_toytown, model_ckpt, tmp_path / "a", seed=1)) / "summary.json").read_text()
    )
    b = json.loads(
        (generate_pseudo_labels(_pl(tiny_toytown, model_ckpt, tmp_path / "b", seed=2)) / "summary.json").read_text()
    )
    assert a["order"] != b["order"]
    for policy in ("cbst", "constant", "none"):
        folder = generate_pseudo_labels(_pl(tiny_toytown, model_ckpt, tmp_path / policy, policy=policy))
        labels = np.stack([read_label(p) for p in sorted((folder / "labels").glob("*.png"))])
        if policy == "cbst":  # both passes in forwards of 5 batches (5, 5, 2): the same labels
            again = generate_pseudo_labels(
                _pl(tiny_toytown, model_ckpt, tmp_path / "c10", policy=policy, forward_batch=10)
            )
            assert np.array_equal(labels, np.stack([read_label(p) for p in sorted((again / "labels").glob("*.png"))]))
        if policy == "none":
            assert not (labels == 255).any()
        else:
            assert (labels == 255).any()


def test_rerun_refuses_a_different_config_and_never_mixes(tiny_toytown, model_ckpt, tmp_path):
    out = generate_pseudo_labels(_pl(tiny_toytown, model_ckpt, tmp_path / "pl"))
    before = {p.name: p.read_bytes() for p in (out / "labels").glob("*.png")}
    assert generate_pseudo_labels(_pl(tiny_toytown, model_ckpt, tmp_path / "pl")) == out  # no-op
    with pytest.raises(InputError, match="alpha"):
        generate_pseudo_labels(_pl(tiny_toytown, model_ckpt, tmp_path / "pl", alpha=0.3))
    assert {p.name: p.read_bytes() for p in (out / "labels").glob("*.png")} == before
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("user data")
    with pytest.raises(InputError, match="junk"):
        generate_pseudo_labels(_pl(tiny_toytown, model_ckpt, tmp_path / "junk"))
    assert (tmp_path / "junk" / "x.txt").read_text() == "user data"


def test_self_training_round_resumes_exactly(tiny_toytown, model_ckpt, tmp_path):
    pl = generate_pseudo_labels(_pl(tiny_toytown, model_ckpt, tmp_path / "pl", alpha=0.5))
    base = dict(
        pseudo_dir=str(pl),
        init_checkpoint=str(model_ckpt),
        data_root=str(tiny_toytown),
        iterations=4,
        batch_size=4,
        checkpoint_every=2,
        progress=False,
        lr=1e-3,
        hpla_mode="intended",
        num_hard=19,
    )
    a = self_train(SelfTrainConfig(out=str(tmp_path / "a"), **base))
    self_train(SelfTrainConfig(out=str(tmp_path / "b"), stop_after=2, **base))
    assert not (tmp_path / "b" / "teacher_final.pt").exists()
    b = self_train(SelfTrainConfig(out=str(tmp_path / "b"), **base))
    for name in ("student_final.pt", "teacher_final.pt"):
        sa = torch.load(a / name, weights_only=True)["state_dict"]
        sb = torch.load(b / name, weights_only=True)["state_dict"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    log = pd.read_csv(a / "log.csv")
    assert list(log["iteration"]) == [1, 2, 3, 4]
    for col in ("ce", "kld", "entropy", "consistency", "pasted_fraction"):
        assert np.isfinite(log[col]).all()
    np.testing.assert_allclose(
        log["loss"],
        log["ce"] + 0.1 * log["kld"] + 1.0 * log["entropy"] + 0.5 * log["consistency"],
        rtol=1e-4,
        atol=1e-5,
    )
    assert (log["pasted_fraction"] > 0).any()  # HPLA pasted something
    # the teacher moved towards the student, but is not the student
    st = torch.load(a / "student_final.pt", weights_only=True)["state_dict"]
    te = torch.load(a / "teacher_final.pt", weights_only=True)["state_dict"]
    k = "aspp.conv2d_list.0.weight"
    assert not torch.equal(st[k], te[k])


def _true_label_pseudo_dir(pseudo_dir, tiny_toytown, out):
    """`pseudo_dir` with the true labels as pseudo-labels and donors listed from them: every hard-class instance
    of the split is a donor (the random model's labels leave too few donors to tell draws apart)."""
    import shutil

    shutil.copytree(pseudo_dir, out)
    donors: dict[str, list] = {str(c): [] for c in range(19)}
    for f in sorted((tiny_toytown / "target" / "train" / "labels").glob("*.png")):
        shutil.copy(f, out / "labels" / f.name)
        counts = np.bincount(read_label(f).ravel(), minlength=256)
        for c in range(19):
            if counts[c]:
                donors[str(c)].append([f.stem, int(counts[c])])
    (out / "donors.json").write_text(json.dumps(donors))
    return out


def test_hpla_in_the_data_pipeline_is_seeded_by_position(pseudo_dir, tiny_toytown, tmp_path):
    pseudo_dir = _true_label_pseudo_dir(pseudo_dir, tiny_toytown, tmp_path / "pl")
    target = PseudoLabelledTarget(SegDataset("toytown", tiny_toytown, "target_train"), pseudo_dir)
    hpla = build_hpla(pseudo_dir, target, 19, (), "intended", 0.1, None)
    pasted = HPLATarget(target, hpla, seed=3)

    def batches(workers: int, start: int, n: int) -> list[dict]:
        it = iter(infinite_loader(pasted, 4, 0, start, workers, "cpu", positions=True))
        return [next(it) for _ in range(n)]

    serial = batches(0, 0, 3)
    for other in (batches(2, 0, 3), batches(0, 4, 2)):  # two worker processes; a run resumed 4 samples in
        for a, b in zip(serial[-len(other) :], other, strict=True):
            for key in ("image", "label", "provenance"):
                assert torch.equal(a[key], b[key]), key
    assert any((b["provenance"] != 255).any() for b in serial)  # something was pasted
    for b in serial:  # provenance marks exactly the pasted pixels, whose label is the pasted class
        where = b["provenance"] != 255
        assert torch.equal(b["label"][where], b["provenance"][where])
    # the same image at another stream position gets other draws (not one fixed paste per image)
    first = pasted[(0, 1)]
    assert any(not torch.equal(first["image"], pasted[(p, 1)]["image"]) for p in range(1, 8))


@pytest.mark.slow
def test_demo_end_to_end_tiny(tiny_toytown, tmp_path, capsys):
    from hias_nb.demo import run_demo

    tiny = {"quick": True, "out": str(tmp_path / "demo"), "data_root": str(tiny_toytown), "images": 24}
    tiny |= {"size": (32, 64), "source.iterations": 6, "round.iterations": 4, "warmup.iterations": 3, "rounds": 2}
    tiny |= {"source.batch_size": 4, "warmup.batch_size": 4, "round.batch_size": 4, "adabn_batch_size": 4}
    tiny |= {"pretrain_root": str(tmp_path / "pretrain"), "pretrain.iterations": 2, "pretrain.images": 4,
             "pretrain.batch_size": 4, "pretrain.num_workers": 1}  # fmt: skip
    report = run_demo(**tiny)
    names = [s["name"] for s in report["stages"]]
    assert names == ["source_only", "source_only_adabn", "warmup", "round_1", "round_2"]
    # round 1 starts from the warm-up model (with target BN statistics), not from the AdaBN source model
    r1 = yaml.safe_load((tmp_path / "demo" / "round_1" / "train" / "config.yaml").read_text())
    assert r1["init_checkpoint"] == str(tmp_path / "demo" / "warmup" / "model_final.pt")
    assert (tmp_path / "demo" / "report.json").exists() and (tmp_path / "demo" / "per_class_iou.png").exists()
    for s in report["stages"]:
        vals = [v for v in s["per_class"].values() if v is not None]
        assert abs(s["miou"] - np.mean(vals)) < 0.01
    out = capsys.readouterr().out
    assert "round_2" in out and "mIoU" in out
    # a second run finds every stage finished and reproduces the same report
    again = run_demo(**tiny)
    assert [s["miou"] for s in again["stages"]] == [s["miou"] for s in report["stages"]]
    assert report["resumed"] is False and again["resumed"] is True  # its wall_seconds cover the second call only
    assert "finished stages were reused" in capsys.readouterr().out


def test_demo_summary_is_the_final_rounds_gains():
    from hias_nb.demo import summarise

    stages = [{"name": n, "miou": m} for n, m in
              [("source_only", 40.0), ("source_only_adabn", 44.0), ("round_1", 50.0), ("round_2", 52.5)]]  # fmt: skip
    with_oracle = summarise([*stages, {"name": "oracle", "miou": 60.0}])
    assert with_oracle == {"final_stage": "round_2", "gain_over_source_only": 12.5, "gain_over_adabn": 8.5,
                           "gap_closed": 0.625}  # fmt: skip
    assert "gap_closed" not in summarise(stages) and summarise(stages[:2]) == {}


def test_pseudo_label_batch_sizes_must_be_positive(tiny_toytown, model_ckpt, tmp_path):
    with pytest.raises(InputError, match="forward_batch"):
        generate_pseudo_labels(_pl(tiny_toytown, model_ckpt, tmp_path / "pl", forward_batch=0))
    assert not (tmp_path / "pl").exists()


def test_adabn_on_the_first_images_only(tiny_toytown, model_ckpt, tmp_path):
    """`max_images` re-estimates BN statistics on exactly the first images (whole batches), nothing else."""
    from hias_nb.demo import adabn_checkpoint
    from hias_nb.train import load_model, recalibrate_bn

    part = load_model(adabn_checkpoint(model_ckpt, tmp_path / "part.pt", str(tiny_toytown), 4, "cpu", 7), "cpu")
    full = load_model(adabn_checkpoint(model_ckpt, tmp_path / "full.pt", str(tiny_toytown), 4, "cpu"), "cpu")
    ds = SegDataset("toytown", str(tiny_toytown), "target_train")
    direct = load_model(model_ckpt, "cpu")
    recalibrate_bn(direct, iter([torch.stack([ds[i]["image"] for i in range(j, j + 4)]) for j in (0, 4)]), "cpu")
    bn = "backbone.bn1.running_mean"
    sd_part, sd_full, sd_direct = part.state_dict(), full.state_dict(), direct.state_dict()
    assert torch.allclose(sd_part[bn], sd_direct[bn], atol=1e-6)  # 7 images: two batches of 4
    assert not torch.allclose(sd_part[bn], sd_full[bn], atol=1e-4)


def test_pseudo_labels_know_their_inputs(tiny_toytown, model_ckpt, tmp_path):
    """A re-run with the model replaced at the same path, or with labels of other images, is refused (findings 2
    and 3 of the trust issue): the folder records the model's bytes and the images it was made from."""
    import shutil

    ckpt = tmp_path / "model.pt"
    shutil.copy(model_ckpt, ckpt)
    out = generate_pseudo_labels(_pl(tiny_toytown, ckpt, tmp_path / "pl"))
    made = read_json(out / "summary.json")["inputs"]
    assert made["data_root"] == str(tiny_toytown.resolve()) and len(made["checkpoint_sha256"]) == 64
    other = torch.load(ckpt, weights_only=True)
    other["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in other["state_dict"].items()}
    torch.save(other, ckpt)  # another model at the same path
    with pytest.raises(InputError, match="checkpoint_sha256"):
        generate_pseudo_labels(_pl(tiny_toytown, ckpt, tmp_path / "pl"))
    # self-training on another split or another copy of the images than the labels were made from
    base = dict(pseudo_dir=str(out), init_checkpoint=str(model_ckpt), iterations=1, batch_size=2, progress=False)
    with pytest.raises(InputError, match="split 'target_train', this round trains on 'source_train'"):
        self_train(SelfTrainConfig(out=str(tmp_path / "s"), data_root=str(tiny_toytown), split="source_train", **base))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_toytown, copy)
    with pytest.raises(InputError, match="holds labels of the images in"):
        self_train(SelfTrainConfig(out=str(tmp_path / "c"), data_root=str(copy), **base))
    assert not (tmp_path / "s" / "config.yaml").exists() and not (tmp_path / "c" / "config.yaml").exists()


def test_pseudo_labels_of_regenerated_data_are_refused(tiny_toytown, model_ckpt, tmp_path):
    """Data regenerated under the same names (another seed) after the labels were made: a re-run of the labelling
    does not call the old folder complete, and a round does not train on labels of other scenes."""
    import shutil

    from hias_nb.data.toytown import generate_toytown

    data = tmp_path / "data"
    shutil.copytree(tiny_toytown, data)
    out = generate_pseudo_labels(_pl(data, model_ckpt, tmp_path / "pl"))
    assert generate_pseudo_labels(_pl(data, model_ckpt, tmp_path / "pl")) == out  # unchanged: complete
    shutil.rmtree(data)
    generate_toytown(data, images=24, seed=1, size=(32, 64), progress=False)
    with pytest.raises(InputError, match="data_sha256"):
        generate_pseudo_labels(_pl(data, model_ckpt, tmp_path / "pl"))
    base = dict(pseudo_dir=str(out), init_checkpoint=str(model_ckpt), iterations=1, batch_size=2, progress=False)
    with pytest.raises(InputError, match="other images under the same names"):
        self_train(SelfTrainConfig(out=str(tmp_path / "s"), data_root=str(data), **base))
    assert not (tmp_path / "s" / "config.yaml").exists()


def test_foreign_pseudo_folders_and_label_values_are_refused(tiny_toytown, pseudo_dir, model_ckpt, tmp_path):
    import shutil

    from PIL import Image

    from hias_nb.pseudo_label import load_pseudo_summary

    # a label value that is no class: refused naming the file, not an index error inside the loss
    folder = tmp_path / "pl"
    shutil.copytree(pseudo_dir, folder)
    images = SegDataset("toytown", tiny_toytown, "target_train")
    name = images.samples[3].id
    lab = read_label(folder / "labels" / f"{name}.png")
    lab[0, 0] = 40
    Image.fromarray(lab.astype(np.uint8)).save(folder / "labels" / f"{name}.png")
    target = PseudoLabelledTarget(images, folder)
    target.load(images.samples[2].id)  # the others still load
    with pytest.raises(InputError, match=rf"{name}\.png: label: value 40 is neither a class \(0\.\.18\) nor 255"):
        target.load(name)
    # a summary.json this project did not write
    for text, field in (("[1, 2]", "not a pseudo-label summary"), ('{"name": "x"}', "config: missing")):
        (folder / "summary.json").write_text(text)
        with pytest.raises(InputError, match=field):
            load_pseudo_summary(folder)
    # --out that is a file
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    with pytest.raises(InputError, match="is a file, not a folder"):
        generate_pseudo_labels(_pl(tiny_toytown, model_ckpt, a_file))
    assert a_file.read_text() == "mine"


@pytest.mark.slow
def test_a_published_checkpoint_starts_pseudo_labelling_and_a_round(tiny_toytown, tmp_path, capsys):
    """A file in the published HIAST layout (``seg_model.`` keys, a representation head and discriminator keys,
    no meta) is loaded as DeepLab-v2-ResNet-101 by the stages that take a model; the same weights in hias_nb's
    own layout give the same pseudo-labels and, one seeded iteration later, the same round."""
    from hias_nb.models import DeepLabV2, checkpoint_architecture, save_checkpoint, write_published_layout

    torch.manual_seed(0)
    model = DeepLabV2("resnet101", num_classes=19)
    with torch.no_grad():
        for conv in model.aspp.conv2d_list:
            conv.weight.mul_(30)  # confident, varied predictions
    own = tmp_path / "own.pt"
    save_checkpoint(own, model)
    published = write_published_layout(own, tmp_path / "pseudo_resume_from.pth")
    state = torch.load(published, weights_only=True)
    state["seg_model.representation.0.weight"] = torch.zeros(2, 2048, 1, 1)
    state["D.conv1.weight"] = torch.zeros(2, 19, 4, 4)
    torch.save(state, published)
    arch = checkpoint_architecture(published)
    assert arch == {"layout": "published", "backbone": "resnet101", "num_classes": 19, "aspp_rates": (6, 12, 18, 24),
                    "skip": False}  # fmt: skip

    labels = {}
    for name, ckpt in (("own", own), ("published", published)):
        labels[name] = generate_pseudo_labels(_pl(tiny_toytown, ckpt, tmp_path / f"pl_{name}", alpha=0.5, seed=1))
    assert "published layout" in capsys.readouterr().out  # the key report is shown
    names = sorted(p.name for p in (labels["own"] / "labels").glob("*.png"))
    assert len(names) == 24
    for n in names:
        assert np.array_equal(read_label(labels["own"] / "labels" / n), read_label(labels["published"] / "labels" / n))

    base = dict(pseudo_dir=str(labels["own"]), data_root=str(tiny_toytown), iterations=1, batch_size=2,
                progress=False, lr=1e-3, crop_size=(32, 64))  # fmt: skip
    runs = {n: self_train(SelfTrainConfig(out=str(tmp_path / f"r_{n}"), init_checkpoint=str(c), **base))
            for n, c in (("own", own), ("published", published))}  # fmt: skip
    ta, tb = (torch.load(r / "teacher_final.pt", weights_only=True)["state_dict"] for r in runs.values())
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

    # a published file of another class count is refused by name, before anything is written
    state["seg_model.aspp.conv2d_list.0.weight"] = torch.zeros(16, 2048, 3, 3)
    torch.save(state, tmp_path / "sixteen.pth")
    with pytest.raises(InputError, match="sixteen.pth: no single DeepLab-v2 classifier"):
        generate_pseudo_labels(_pl(tiny_toytown, tmp_path / "sixteen.pth", tmp_path / "pl16", alpha=0.5))
    assert not (tmp_path / "pl16").exists()
