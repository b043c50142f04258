"""`hias-nb run`: each shipped experiment end to end with --smoke on tiny datasets in the real on-disk layouts at
the real image sizes; the published warm-up as a start; kill -9 and resume; refusals before any stage starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import realistic_trees as trees
import torch

from hias_nb.cli import main
from hias_nb.experiment import experiment_config, experiment_plan

pytestmark = pytest.mark.slow
EXPERIMENTS = Path(__file__).resolve().parents[1] / "configs" / "experiments"
ROUNDS = ["round_1", "round_2", "round_3"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("real_layouts")
    return {"gta5": trees.gta5(base / "GTA5"), "synthia": trees.synthia(base / "SYNTHIA"),
            "cityscapes": trees.cityscapes(base / "cityscapes"), "oxford": trees.oxford(base / "oxford")}  # fmt: skip


def _args(name: str, source: Path, target: Path, out: Path, *extra: str) -> list[str]:
    return ["run", str(EXPERIMENTS / f"{name}.yaml"), "--smoke", "--source_root", str(source), "--target_root",
            str(target), "--out", str(out), "--device", "cpu", *extra]  # fmt: skip


def _means(report: dict) -> dict[str, dict]:
    """What must not change between an interrupted and an uninterrupted run: every stage's numbers."""
    return {s["name"]: {k: s[k] for k in ("miou", "per_class", "miou_by_protocol", "label_free")}
            for s in report["stages"]}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "source", "target", "protocols"),
    [
        ("gta5_to_cityscapes", "gta5", "cityscapes", ["cityscapes19"]),
        ("synthia_to_cityscapes", "synthia", "cityscapes", ["synthia16", "synthia13"]),
        ("cityscapes_to_oxford", "cityscapes", "oxford", ["oxford9"]),
    ],
)
def test_each_shipped_experiment_runs_end_to_end_with_smoke(roots, tmp_path, capsys, name, source, target, protocols):
    out = tmp_path / name
    assert main(_args(name, roots[source], roots[target], out)) == 0
    printed = capsys.readouterr().out
    assert "[run]   source_only" in printed and "[run]   round_3/train" in printed  # the plan comes first
    assert printed.index("[run]   round_3/train") < printed.index("[run] stage source_only")
    report = json.loads((out / "report.json").read_text())
    names = [s["name"] for s in report["stages"]]
    assert names == ["source_only", "warmup", *ROUNDS, *(f"{r}_student" for r in ROUNDS)]
    assert report["protocol"] == protocols[0] and (out / "per_class_iou.png").stat().st_size > 0
    for s in report["stages"]:
        assert list(s["miou_by_protocol"]) == protocols and s["miou"] == s["miou_by_protocol"][protocols[0]]
    if name == "synthia_to_cityscapes":  # the 13-class mean leaves wall, fence and pole out of the 16
        s = report["stages"][0]
        vals = [v for c, v in s["per_class"].items() if c not in ("wall", "fence", "pole") and v is not None]
        assert s["miou_by_protocol"]["synthia13"] == pytest.approx(sum(vals) / len(vals), abs=0.011)
    # the plan: round k labels with round k-1's teacher and trains from its student, at the file's alpha and lr
    plan = experiment_plan(experiment_config(EXPERIMENTS / f"{name}.yaml", {"out": str(out)}, smoke=True))
    assert plan["round_2/pseudo"].checkpoint == str(out / "round_1" / "train" / "teacher_final.pt")
    assert plan["round_2/train"].init_checkpoint == str(out / "round_1" / "train" / "student_final.pt")
    assert [plan[f"{r}/train"].lr for r in ROUNDS] == [3e-6, 2e-6, 1e-6]
    # a second call finds every stage done and ends with the same report
    assert main(_args(name, roots[source], roots[target], out)) == 0
    assert "done, skipped" in capsys.readouterr().out
    assert _means(json.loads((out / "report.json").read_text())) == _means(report)


def test_start_from_the_published_warmup_goes_to_round_1(roots, tmp_path, capsys):
    """A warm-up in the published HIAST layout (seg_model.*, a representation head, D.*), no meta."""
    from hias_nb.models import DeepLabV2, save_checkpoint, write_published_layout

    own = tmp_path / "own.pt"
    save_checkpoint(own, DeepLabV2("resnet101", num_classes=19))
    published = write_published_layout(own, tmp_path / "pseudo_resume_from.pth")
    state = torch.load(published, weights_only=True)
    state["seg_model.representation.0.weight"] = torch.zeros(2, 2048, 1, 1)
    state["D.conv1.weight"] = torch.zeros(2, 19, 4, 4)
    torch.save(state, published)
    out = tmp_path / "from_published"
    one_round = ["--alpha", "[0.5]", "--round_lr", "[3e-6]", "--pseudo_resize", "null", "--start_from", str(published)]
    assert main(_args("gta5_to_cityscapes", roots["gta5"], roots["cityscapes"], out, *one_round)) == 0
    printed = capsys.readouterr().out
    assert "round 1 starts from" in printed and "published layout" in printed
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["start", "round_1", "round_1_student"]
    assert not (out / "source_only").exists() and not (out / "warmup").exists()


def test_bad_inputs_exit_2_naming_the_field_before_any_stage(roots, tmp_path, capsys):
    good = _args("gta5_to_cityscapes", roots["gta5"], roots["cityscapes"], tmp_path / "x")
    typo = tmp_path / "typo.yaml"
    typo.write_text((EXPERIMENTS / "gta5_to_cityscapes.yaml").read_text().replace("round_lr:", "round_lrs:"))
    cases = [
        (["--source_root", str(tmp_path / "nowhere")], "source:"),
        (["--target_root", str(roots["gta5"])], "target:"),  # not a Cityscapes tree
        (["--val_split", "test"], "val:"),
        (
            ["--source_dataset", "cityscapes_oxford9", "--source_root", str(roots["cityscapes"])],
            "source_dataset: cityscapes_oxford9 labels 9 classes",
        ),  # checked before source-only training
        (["--protocols", "[oxford9]"], "protocol: oxford9"),
        (["--round_lr", "[1e-6]"], "round_lr: 1 values for 3 rounds"),
        (["--round.lr", "1e-6"], "round.lr: set per round by round_lr"),  # never silently replaced
        (["--start_from", str(tmp_path / "missing.pth")], "missing.pth"),
    ]
    for extra, needle in cases:
        assert main([*good, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (extra, err)
    assert main(["run", str(typo), "--smoke"]) == 2
    assert "typo.yaml: unknown config key 'round_lrs' (did you mean round_lr" in capsys.readouterr().err
    # without --smoke an incomplete copy is refused: the tiny trees hold 4 of GTA5's 24,941 images
    assert main(good[:2] + good[3:]) == 2
    assert "4 images of gta5/train, its manifest lists 24941" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_kill_9_during_a_stage_then_the_same_command_gives_the_same_report(roots, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [sys.executable, "-m", "hias_nb"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = {d: _args("cityscapes_to_oxford", roots["cityscapes"], roots["oxford"], d) for d in (whole, killed)}
    subprocess.run([*cmd, *args[whole]], env=env, check=True, capture_output=True, timeout=900)
    for marker in (killed / "warmup" / "state.pt", killed / "round_2" / "train" / "state.pt"):
        proc = subprocess.Popen([*cmd, *args[killed]], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (killed / "report.json").exists()
    done = subprocess.run([*cmd, *args[killed]], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumes" in done.stdout or "done, skipped" in done.stdout
    reports = [json.loads((d / "report.json").read_text()) for d in (whole, killed)]
    assert _means(reports[1]) == _means(reports[0])


@pytest.mark.parametrize("name", ["gta5_to_cityscapes", "synthia_to_cityscapes", "cityscapes_to_oxford"])
def test_paper_experiments_train_deeplabv2_without_toytowns_additions(name):
    """Whatever toytown's TrainConfig defaults are, the paper's source stage is DeepLab-v2 as published (no skip
    branch, whose keys the published checkpoints lack) without toytown's supervised augmentations."""
    source = experiment_config(EXPERIMENTS / f"{name}.yaml").source
    assert (source.skip, source.photometric, source.strong_prob) == (False, 0.0, 0.0)
    assert source.aspp_rates == (6, 12, 18, 24) and source.backbone == "resnet101"
