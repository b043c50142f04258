"""The command line as a user meets it: exit status 2 with one line naming the file or field on bad input,
resumable training, evaluation reports in the CONTRACT.md layout."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from hias_nb.cli import main
from hias_nb.models import DeepLabV2, save_checkpoint

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
        (["warmup", "--adv_weight", "-1"], "adv_weight"),
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


def test_checkpoint_for_another_class_count_is_refused(tiny_toytown, tmp_path, capsys):
    ckpt = tmp_path / "nine.pt"
    save_checkpoint(ckpt, DeepLabV2("resnet10t", num_classes=9, aspp_rates=(1, 2)))
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data-root", str(tiny_toytown)]) == 2
    line = _err_line(capsys)
    assert "nine.pt" in line and "9" in line
