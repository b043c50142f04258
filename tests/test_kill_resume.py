"""kill -9 at random points of a short run, ten times: the resumed runs always end in the uninterrupted model."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.slow

KILL_SEEDS = range(10)  # each draws the iteration after which the process is killed and an extra delay
ITERATIONS = 16


def _command(data, out) -> list[str]:
    return [sys.executable, "-m", "hias_nb", "train-source", "--data_root", str(data), "--out", str(out),
            "--iterations", str(ITERATIONS), "--batch_size", "2", "--warmup", "2", "--checkpoint_every", "1",
            "--progress", "false", "--device", "cpu"]  # fmt: skip


def _rows(out) -> int:
    try:
        return max(0, len((out / "log.csv").read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def test_kill_9_anywhere_then_resume_gives_the_uninterrupted_model(tiny_toytown, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    subprocess.run(_command(tiny_toytown, whole), env=env, check=True, capture_output=True, timeout=600)
    expected = torch.load(whole / "model_final.pt", weights_only=True)["state_dict"]
    for seed in KILL_SEEDS:
        rng = random.Random(seed)
        at, extra = rng.randrange(1, ITERATIONS - 1), rng.random() * 0.3
        out = tmp_path / f"killed_{seed}"
        proc = subprocess.Popen(_command(tiny_toytown, out), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 300
        while _rows(out) < at and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(extra)  # somewhere inside a step or a state write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = subprocess.run(_command(tiny_toytown, out), env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (seed, done.stderr[-2000:])
        got = torch.load(out / "model_final.pt", weights_only=True)["state_dict"]
        for k, v in expected.items():
            assert torch.equal(got[k], v), (seed, at, k)
