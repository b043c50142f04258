"""Every stage under ``torchrun --nproc_per_node 2`` on CPU (gloo): it completes, its outputs load, and the
sharded pseudo-labels and evaluation equal one process's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _hias(args: list[str], procs: int) -> subprocess.CompletedProcess:
    """``hias-nb ARGS`` in `procs` processes (torchrun when more than one), one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prefix = [str(TORCHRUN), "--nproc_per_node", str(procs), "-m"] if procs > 1 else [sys.executable, "-m"]
    cmd = [*prefix, "hias_nb", *args, "--device", "cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tiny_toytown, tmp_path_factory):
    if not TORCHRUN.exists() or not torch.distributed.is_available():
        pytest.skip("torchrun is not available")
    base = tmp_path_factory.mktemp("ddp")
    data = str(tiny_toytown)
    common = ["--data_root", data, "--progress", "false"]
    _hias(["train-source", "--out", str(base / "src"), "--iterations", "3", "--batch_size", "4", *common], 2)
    src = str(base / "src" / "model_final.pt")
    _hias(["warmup", "--out", str(base / "warm"), "--init_checkpoint", src, "--iterations", "2",
           "--batch_size", "2", *common], 2)  # fmt: skip
    pseudo = ["--checkpoint", src, "--forward_batch", "2", *common]  # one selection batch per forward: 12 forwards
    _hias(["pseudo-label", "--out", str(base / "pl2"), *pseudo], 2)
    _hias(["pseudo-label", "--out", str(base / "pl1"), *pseudo], 1)
    _hias(["self-train", "--out", str(base / "st"), "--pseudo_dir", str(base / "pl2"), "--init_checkpoint", src,
           "--iterations", "2", "--batch_size", "4", *common], 2)  # fmt: skip
    evaluate = ["evaluate", "--checkpoint", src, "--data-root", data, "--batch-size", "5"]  # 7 images: uneven shards
    _hias([*evaluate, "--json", str(base / "ev2.json")], 2)
    _hias([*evaluate, "--json", str(base / "ev1.json")], 1)
    return base


def test_training_stages_complete_and_their_models_load(runs):
    from hias_nb.train import load_model

    for path in ("src/model_final.pt", "warm/model_final.pt", "st/teacher_final.pt", "st/student_final.pt"):
        load_model(runs / path, "cpu")
    state = torch.load(runs / "src" / "state.pt", weights_only=True)
    assert len(state["generator_ranks"]["generator"]) == 2  # each process's augmentation stream is saved
    assert not torch.equal(*state["generator_ranks"]["generator"])


def test_sharded_pseudo_labels_equal_one_process(runs):
    one, two = runs / "pl1", runs / "pl2"
    names = sorted(p.name for p in (one / "labels").glob("*.png"))
    assert names == sorted(p.name for p in (two / "labels").glob("*.png")) and len(names) == 24
    for name in names:
        assert (one / "labels" / name).read_bytes() == (two / "labels" / name).read_bytes(), name
    a, b = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    for key in ("thresholds", "class_values", "selected_pixels", "predicted_pixels", "order"):
        assert a[key] == b[key], key
    assert not any(p.name.endswith(".partial") for p in runs.iterdir())  # no half-written copy is left


def test_sharded_evaluation_counts_every_image_once(runs):
    one, two = (json.loads((runs / f"ev{k}.json").read_text()) for k in (1, 2))
    assert one["stages"][0]["per_class"] == two["stages"][0]["per_class"]
    assert one["stages"][0]["miou"] == two["stages"][0]["miou"]


def test_distributed_runs_leave_no_stray_folders(runs):
    shutil.rmtree(runs / "pl1")  # nothing else in the module reads it
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith(".")) == [
        "ev1.json", "ev2.json", "pl2", "src", "st", "warm"
    ]  # fmt: skip
