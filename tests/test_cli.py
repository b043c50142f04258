"""The command line as a user meets it: exit status 2 with one line naming the file or field on bad input,
resumable training, evaluation reports in the report.json layout, and the demo's and ablation's settings reaching
the stages they belong to."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from hias_nb.classes import CITYSCAPES_CLASSES
from hias_nb.cli import main
from hias_nb.models import DeepLabV2, save_checkpoint, write_published_layout

TRAIN = ["--iterations", "4", "--batch_size", "4", "--checkpoint_every", "2", "--warmup", "0", "--progress", "false"]


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def _copy(src, tmp_path):
    dst = tmp_path / "tt"
    shutil.copytree(src, dst)
    return dst


def test_help_for_every_command(capsys):
    for cmd in (
        ["--help"],
        ["demo", "--help"],
        ["data", "generate", "--help"],
        ["data", "check", "--help"],
        ["train-source", "--help"],
        ["warmup", "--help"],
        ["evaluate", "--help"],
        ["ablation", "--help"],
    ):
        with pytest.raises(SystemExit) as e:
            main(cmd)
        assert e.value.code == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train-source", "--iteratons", "3"], "'iteratons'"),
        (["train-source", "--iterations", "three"], "iterations"),
        (["train-source", "--freeze_bn", "sometimes"], "freeze_bn"),
        (["train-source", "--config", "/nonexistent/c.yaml"], "/nonexistent/c.yaml"),
        (["evaluate", "--checkpoint", "/nonexistent/m.pt"], "/nonexistent/m.pt"),
        (["data", "check", "imagenet", "--root", "/tmp"], "imagenet"),
        (["frobnicate"], "frobnicate"),
        (["demo", "--rounds", "0"], "--rounds"),
        (["demo", "--alhpa", "0.2"], "did you mean alpha"),
        (["demo", "--alpha", "high"], "pseudo.alpha"),
        (["demo", "--lr", "1e-4"], "pretrain.lr, source.lr, warmup.lr or round.lr"),
        (["demo", "--round.seed", "3"], "round.seed"),
        (["demo", "--config", "/nonexistent/demo.yaml"], "/nonexistent/demo.yaml"),
        (["demo", "--warmup.iterations", "-1"], "warmup.iterations"),
        (["ablation", "--alhpa", "0.2"], "did you mean alpha"),
        (["ablation", "--seed", "3"], "give --seeds instead"),  # not read as an abbreviation of --seeds
        (["train-source", "--conf", "x.yaml"], "'conf'"),  # nor --conf as --config
        (["warmup", "--adv_weight", "-1"], "adv_weight"),
        (["train-source", "--lr", "nan"], "lr: expected float"),
        (["train-source", "--lr", ".nan"], "lr: expected a finite number"),  # YAML's NaN
        (["train-source", "--weight_decay", "-1e-4"], "weight_decay: must be >= 0"),
        (["train-source", "--crop_ratio", "0"], "crop_ratio: must be positive"),
        (["train-source", "--resize", "[0, 0]"], "resize: must be positive"),
        (["train-source", "--num_workers", "-1"], "num_workers: must be >= 0"),
        (["train-source", "--head_lr_mult", "-1"], "head_lr_mult: must be positive"),
        (["train-source", "--crop_scale", "[0.5, 1.5]"], "crop_scale: must be a range"),
        (["train-source", "--stop_after", "-1"], "stop_after: must be positive"),
        (["self-train", "--ema_gamma", "1.5"], "ema_gamma: must be in [0, 1]"),
        (["pseudo-label", "--beta", "1"], "beta: must be in [0, 1)"),
        (["warmup", "--d_input", "logits"], "d_input"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, needle, capsys):
    assert main(args) == 2
    line = _err_line(capsys)
    assert line.startswith("hias-nb: error:") and needle in line


def test_corrupt_image_missing_label_bad_value_size_mismatch(tiny_toytown, tmp_path, capsys):
    root = _copy(tiny_toytown, tmp_path)
    imgs = sorted((root / "source/train/images").glob("*.png"))
    labs = sorted((root / "source/train/labels").glob("*.png"))
    imgs[0].write_bytes(b"not a png")
    labs[1].unlink()
    bad = np.array(Image.open(labs[2]))
    bad[0, 0] = 77
    Image.fromarray(bad).save(labs[2])
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(labs[3])
    assert main(["data", "check", "toytown", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert imgs[0].name in err and imgs[1].stem in err and "77" in err and labs[3].name in err
    # training on the broken split stops with exit 2 naming a file, and writes no model
    out = tmp_path / "run"
    assert main(["train-source", "--data_root", str(root), "--out", str(out), *TRAIN]) == 2
    assert ".png" in _err_line(capsys)
    assert not (out / "model_final.pt").exists()


def test_train_resume_is_exact_and_evaluate_writes_report(tiny_toytown, tmp_path, capsys):
    torch.manual_seed(0)
    base = ["train-source", "--data_root", str(tiny_toytown), *TRAIN]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--stop_after", "2"]) == 0
    assert not (tmp_path / "b" / "model_final.pt").exists() and (tmp_path / "b" / "state.pt").exists()
    assert main([*base, "--out", str(tmp_path / "b")]) == 0  # resumes at iteration 2
    a = torch.load(tmp_path / "a" / "model_final.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "model_final.pt", weights_only=True)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # same directory, different config: refused, nothing overwritten
    before = (tmp_path / "a" / "model_final.pt").read_bytes()
    assert main([*base, "--out", str(tmp_path / "a"), "--lr", "0.5"]) == 2
    assert "lr" in _err_line(capsys)
    assert (tmp_path / "a" / "model_final.pt").read_bytes() == before

    report = tmp_path / "r.json"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(tmp_path / "a" / "model_final.pt"),
                "--data-root",
                str(tiny_toytown),
                "--json",
                str(report),
            ]
        )
        == 0
    )
    r = json.loads(report.read_text())
    assert r["protocol"] == "cityscapes19" and len(r["classes"]) == 19 and len(r["stages"]) == 1
    stage = r["stages"][0]
    vals = [v for v in stage["per_class"].values() if v is not None]
    assert abs(stage["miou"] - np.mean(vals)) < 0.01 and set(stage["per_class"]) == set(r["classes"])
    assert r["config"]["data_root"] == str(tiny_toytown.resolve()) and r["config"]["resize"] is None
    assert r["config"]["aspp_rates"] == [1, 2, 4, 6]
    # scored against resized labels: a different number, and the report and the printed line say why
    resized = tmp_path / "r16.json"
    ckpt = str(tmp_path / "a" / "model_final.pt")
    capsys.readouterr()
    args = ["evaluate", "--checkpoint", ckpt, "--data-root", str(tiny_toytown), "--json", str(resized)]
    assert main([*args, "--resize", "16", "32"]) == 0
    assert "labels resized to 16×32" in capsys.readouterr().out
    assert json.loads(resized.read_text())["config"]["resize"] == [16, 32]


def test_checkpoint_for_another_class_count_is_refused(tiny_toytown, tmp_path, capsys):
    ckpt = tmp_path / "nine.pt"
    save_checkpoint(ckpt, DeepLabV2("resnet10t", num_classes=9, aspp_rates=(1, 2)))
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data-root", str(tiny_toytown)]) == 2
    line = _err_line(capsys)
    assert "nine.pt" in line and "9" in line


@pytest.fixture
def fake_stages(monkeypatch):
    """The demo with every stage replaced by a recorder of the config it receives: [(kind, cfg), ...]."""
    import hias_nb.ablation as ablation
    import hias_nb.demo as demo

    calls: list = []

    def record(kind, result):
        return lambda cfg: calls.append((kind, cfg)) or result(Path(cfg.out))

    fakes = {
        "ensure_toytown": lambda *a, **k: None,
        "SegDataset": lambda *a, **k: None,
        "load_model": lambda ckpt, device: None,
        "evaluate_stage": lambda path, name, model, ds, device: {"name": name, "miou": 1.0, "per_class": {"a": 1.0}},
        "adabn_checkpoint": lambda source, out, *a: out,
        "train_source": record("train_source", lambda out: out / "model_final.pt"),
        "adversarial_warmup": record("warmup", lambda out: out),
        "generate_pseudo_labels": record("pseudo", lambda out: out),
        "self_train": record("self_train", lambda out: out),
        "pretrain": record("pretrain", lambda out: out / "backbone.pt"),
        "_add_agreement": lambda *a: None,
        "_figures": lambda report, out: None,
    }
    for name, fake in fakes.items():
        monkeypatch.setattr(demo, name, fake)
    monkeypatch.setattr(ablation, "train_source", fakes["train_source"])
    return calls


def _of(calls, kind) -> list:
    return [cfg for k, cfg in calls if k == kind]


def test_demo_alpha_reaches_the_pseudo_label_stage_and_is_saved(fake_stages, tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--alpha", "0.2", "--out", str(out), "--device", "cpu", "--data-root", "dr"]) == 0
    (pseudo,) = _of(fake_stages, "pseudo")
    assert pseudo.alpha == 0.2 and pseudo.out == str(out / "round_1" / "pseudo") and pseudo.data_root == "dr"
    kinds = ["pretrain", "train_source", "warmup", "pseudo", "self_train", "train_source"]
    assert [k for k, _ in fake_stages] == kinds
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["pseudo"]["alpha"] == 0.2 and saved["out"] == str(out) and "checkpoint" not in saved["pseudo"]
    assert json.loads((out / "report.json").read_text())["config"]["demo"] == saved
    # the saved config is a valid --config: it reproduces every stage config (in another folder)
    again = tmp_path / "again"
    first = _as_dicts(fake_stages, str(out), str(again))
    fake_stages.clear()
    assert main(["demo", "--config", str(out / "config.yaml"), "--out", str(again)]) == 0
    assert _as_dicts(fake_stages) == first


def test_demo_refuses_a_folder_that_is_not_a_run(fake_stages, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.json").write_text("my own report")
    assert main(["demo", "--out", str(out), "--device", "cpu", "--data-root", "dr"]) == 2
    assert "holds files but no hias_nb run" in _err_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["report.json"] and not fake_stages
    assert (out / "report.json").read_text() == "my own report"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["demo", "--out", str(a_file), "--device", "cpu", "--data-root", "dr"]) == 2
    assert "is a file, not a folder" in _err_line(capsys)


def _as_dicts(calls, old: str = "", new: str = "") -> list:
    """The recorded stage configs as plain dicts, with `old` replaced by `new` in every path."""
    from hias_nb.config import config_to_dict

    def moved(v):
        return v.replace(old, new) if old and isinstance(v, str) else v

    return [(k, {f: moved(v) for f, v in config_to_dict(cfg).items()}) for k, cfg in calls]


def test_demo_config_file_then_command_line(fake_stages, tmp_path):
    f = tmp_path / "demo.yaml"
    f.write_text("rounds: 2\nwarmup:\n  iterations: 0\nround:\n  lr: 1.0e-4\n  ema_gamma: 0.9\nalpha: 0.3\n")
    args = ["demo", "--quick", "--config", str(f), "--round.lr", "5e-5", "--out", str(tmp_path / "d")]
    assert main(args) == 0
    rounds = _of(fake_stages, "self_train")
    assert [r.lr for r in rounds] == [5e-5, 5e-5 * 0.67]  # the command line wins; later rounds decay
    assert [r.ema_gamma for r in rounds] == [0.9, 0.9] and [r.iterations for r in rounds] == [40, 40]  # --quick
    assert [p.alpha for p in _of(fake_stages, "pseudo")] == [0.3, 0.3]
    assert _of(fake_stages, "warmup") == []  # warmup.iterations 0: no warm-up, round 1 from the AdaBN model
    assert rounds[0].init_checkpoint == str(tmp_path / "d" / "source_only_adabn" / "model_final.pt")
    assert len(_of(fake_stages, "train_source")) == 1  # --quick: no oracle


def test_ablation_applies_the_overrides_to_every_variant(fake_stages, tmp_path):
    out = tmp_path / "abl"
    args = ["ablation", "--out", str(out), "--seeds", "3", "--variants", "full", "cbst", "--no-control"]
    assert main([*args, "--quick", "--alpha", "0.3", "--round.iterations", "7", "--device", "cpu"]) == 0
    pseudo = {Path(cfg.out).parts[-3]: cfg for cfg in _of(fake_stages, "pseudo")}
    assert {v: (p.policy, p.alpha, p.seed) for v, p in pseudo.items()} == {
        "full": ("ias", 0.3, 4),
        "cbst": ("cbst", 0.3, 4),
    }
    assert {cfg.iterations for cfg in _of(fake_stages, "self_train")} == {7}
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["demo"]["pseudo"]["alpha"] == 0.3 and saved["variants"] == {"full": {}, "cbst": {"policy": "cbst"}}
    variant = yaml.safe_load((out / "seed_3" / "cbst" / "config.yaml").read_text())
    assert variant["pseudo"]["policy"] == "cbst" and variant["seed"] == 3 and variant["oracle"] is False


def test_evaluate_refuses_what_would_give_a_wrong_report_before_evaluating(tiny_toytown, tmp_path, capsys):
    ckpt = tmp_path / "r10.pt"
    save_checkpoint(ckpt, DeepLabV2("resnet10t", num_classes=19, aspp_rates=(1, 2)), {"backbone": "resnet10t"})
    base = ["evaluate", "--checkpoint", str(ckpt), "--data-root", str(tiny_toytown)]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [
        (["--backbone", "resnet18"], "--backbone"),  # the checkpoint records another architecture
        (["--aspp-rates", "1", "2", "3"], "--aspp-rates"),
        (["--batch-size", "0"], "--batch-size"),
        (["--scales", "0"], "--scales"),
        (["--size", "0", "0"], "--size"),
        (["--json", str(blocker / "r.json")], "is a file"),  # checked before the evaluation, not after
        (["--protocol", "oxford9"], "protocol: oxford9 is over 9 classes"),  # not the dataset's class list
        (["--protocol", "synthia17"], "synthia17"),
    ]
    for extra, needle in cases:
        assert main([*base, *extra]) == 2, extra
        assert needle in _err_line(capsys), extra
    # a checkpoint without an architecture record that leaves part of the model random (here its head)
    bare = tmp_path / "bare.pt"
    state = DeepLabV2("resnet10t", num_classes=19, aspp_rates=(1, 2)).state_dict()
    torch.save({"state_dict": {k: v for k, v in state.items() if not k.startswith("aspp")}}, bare)
    assert main(["evaluate", "--checkpoint", str(bare), "--data-root", str(tiny_toytown), "--backbone", "resnet10t",
                 "--aspp-rates", "1", "2"]) == 2  # fmt: skip
    assert "does not fit a resnet10t model" in _err_line(capsys)


def test_evaluate_reports_every_requested_protocol_from_one_evaluation(tiny_toytown, model_ckpt, tmp_path, capsys):
    """SYNTHIA→Cityscapes style: the 16- and 13-class means are the plain means of the 19-class IoUs over their
    subsets (SYNTHIA's 9, 14, 16 out; the 13-class one also without wall, fence, pole)."""
    js = {}
    for name, extra in (("full", []), ("synthia", ["--protocol", "synthia16", "synthia13"])):
        js[name] = tmp_path / f"{name}.json"
        args = ["evaluate", "--checkpoint", str(model_ckpt), "--data-root", str(tiny_toytown), "--json", str(js[name])]
        assert main([*args, *extra]) == 0
    out = capsys.readouterr().out
    full = json.loads(js["full"].read_text())["stages"][0]
    syn = json.loads(js["synthia"].read_text())
    iou = [full["per_class"][c] for c in CITYSCAPES_CLASSES]

    def mean(skip):
        vals = [v for c, v in enumerate(iou) if c not in skip and v is not None]
        return round(sum(vals) / len(vals), 2)

    expected = {"synthia16": mean({9, 14, 16}), "synthia13": mean({9, 14, 16, 3, 4, 5})}
    assert syn["stages"][0]["miou_by_protocol"] == pytest.approx(expected, abs=0.011)
    assert syn["protocol"] == "synthia16" and len(syn["classes"]) == 16 and syn["config"]["protocols"] == list(expected)
    assert f"images): {syn['stages'][0]['miou_by_protocol']['synthia13']:.2f}\n" in out and "mIoU (synthia13, " in out


def test_evaluate_rebuilds_the_skip_branch_from_its_own_and_a_published_layout_file(tiny_toytown, tmp_path, capsys):
    """A toytown model with the stride-4 skip branch scores the same from its own file and from its published-layout
    copy (no meta there: the branch is read from its skip.* keys; backbone and rates given on the command line)."""
    torch.manual_seed(0)
    model = DeepLabV2("resnet10t", num_classes=19, aspp_rates=(1, 2), skip=True)
    with torch.no_grad():
        model.skip.classifier.weight.normal_(std=3.0)  # the branch changes the predictions
    own = tmp_path / "own.pt"
    save_checkpoint(own, model)
    published = write_published_layout(own, tmp_path / "published.pth")
    scores = {}
    arch = ["--backbone", "resnet10t", "--aspp-rates", "1", "2"]  # what a published-layout file cannot record
    for name, path, extra in (("own", own, []), ("pub", published, arch)):
        js = tmp_path / f"{name}.json"
        args = ["evaluate", "--checkpoint", str(path), "--data-root", str(tiny_toytown), "--json", str(js), *extra]
        assert main(args) == 0, capsys.readouterr().err
        scores[name] = json.loads(js.read_text())["stages"][0]["miou"]
    assert scores["own"] == scores["pub"]
