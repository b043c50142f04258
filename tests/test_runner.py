"""The shared stage runner (`hias_nb.runner.run_stage`) with a small stage of its own: completion and skipping,
exact resumption after `stop_after`, refusal of another config, the non-finite stop, and the log."""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from hias_nb.errors import InputError
from hias_nb.runner import rank_generator, run_stage, save_due


@dataclass
class LineConfig:
    out: str = "runs/line"
    lr: float = 0.1
    iterations: int = 10
    batch_size: int = 4
    checkpoint_every: int = 4
    stop_after: int | None = None
    poison_at: int | None = None  # 0-based iteration whose loss is made non-finite (logged as poison_at + 1)
    data: str = "ok"  # "missing": the stage cannot start (like a wrong dataset path)
    init_checkpoint: str | None = None  # a file the stage starts from (identified by its bytes)
    break_weights_at: int | None = None  # 0-based iteration after which the weights are made NaN (loss still finite)
    seed: int = 0
    device: str = "cpu"
    progress: bool = False
    max_loss: float = 1e4

    def validate(self) -> None:
        if self.lr <= 0:
            raise InputError(f"lr: must be positive, got {self.lr}")


class LineFit:
    """Fit y = 3x − 1 from noisy draws of its own generator (whose state must survive a resumption)."""

    postfix = ("loss",)
    built = 0

    def __init__(self, cfg: LineConfig, device: str, start: int) -> None:
        LineFit.built += 1
        if cfg.data == "missing":
            raise InputError("data: folder not found")
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.model = nn.Linear(1, 1)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=0.9)
        self.gen = rank_generator(device, cfg.seed)
        self.parts = {"model": self.model, "optimizer": self.opt, "generator": self.gen}

    def step(self, it: int) -> dict[str, float]:
        x = torch.rand(self.cfg.batch_size, 1, generator=self.gen)
        y = 3 * x - 1 + 0.1 * torch.randn(self.cfg.batch_size, 1, generator=self.gen)
        loss = ((self.model(x) - y) ** 2).mean()
        if it == self.cfg.poison_at:
            loss = loss * float("nan")
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        if it == self.cfg.break_weights_at:
            with torch.no_grad():
                self.model.weight.fill_(float("nan"))
        return {"loss": loss.item(), "lr": self.cfg.lr}

    def finish(self, out: Path, timing: dict[str, float]) -> None:
        torch.save({"state_dict": self.model.state_dict(), **timing}, out / "final.pt")


def run(cfg: LineConfig) -> Path:
    return run_stage(cfg, "line", "final.pt", lambda device, start: LineFit(cfg, device, start))


def rows(out: Path) -> list[dict]:
    with (out / "log.csv").open() as f:
        return list(csv.DictReader(f))


def test_complete_run_log_final_and_skip(tmp_path):
    out = run(LineConfig(out=str(tmp_path / "a")))
    final = torch.load(out / "final.pt", weights_only=True)
    assert final["iterations"] == 10 and final["seconds_per_iteration"] > 0
    log = rows(out)
    assert [int(r["iteration"]) for r in log] == list(range(1, 11))
    assert list(log[0]) == ["iteration", "loss", "lr", "seconds"]
    assert float(log[-1]["loss"]) < float(log[0]["loss"])  # it learns
    assert torch.load(out / "state.pt", weights_only=True)["iteration"] == 10
    built = LineFit.built
    assert run(LineConfig(out=str(tmp_path / "a"))) == out and LineFit.built == built  # complete: nothing built


def test_stop_after_then_resume_equals_an_uninterrupted_run(tmp_path):
    whole = run(LineConfig(out=str(tmp_path / "whole")))
    cfg = LineConfig(out=str(tmp_path / "parts"), stop_after=3)
    run(cfg)
    assert not (tmp_path / "parts" / "final.pt").exists()
    assert torch.load(tmp_path / "parts" / "state.pt", weights_only=True)["iteration"] == 3
    run(cfg)  # 3 more (stop_after is not part of the config check)
    run(LineConfig(out=str(tmp_path / "parts")))
    a = torch.load(whole / "final.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "parts" / "final.pt", weights_only=True)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit: weights, momentum and the data generator resumed
    assert [r["loss"] for r in rows(tmp_path / "parts")] == [r["loss"] for r in rows(whole)]


def test_another_config_is_refused_and_validate_runs_first(tmp_path):
    run(LineConfig(out=str(tmp_path / "a"), stop_after=2))
    with pytest.raises(InputError, match="batch_size"):  # lr and iterations may change on resume; this may not
        run(LineConfig(out=str(tmp_path / "a"), batch_size=8))
    with pytest.raises(InputError, match="lr: must be positive"):
        run(LineConfig(out=str(tmp_path / "b"), lr=-1.0))
    assert not (tmp_path / "b").exists()  # refused before the folder is made


def test_non_finite_loss_stops_before_anything_of_that_step_is_saved(tmp_path):
    cfg = LineConfig(out=str(tmp_path / "a"), poison_at=6)
    with pytest.raises(RuntimeError, match="iteration 7: non-finite"):
        run(cfg)
    assert torch.load(tmp_path / "a" / "state.pt", weights_only=True)["iteration"] == 4  # the last save before
    assert [int(r["iteration"]) for r in rows(tmp_path / "a")] == [1, 2, 3, 4, 5, 6]  # no row for iteration 7
    assert not (tmp_path / "a" / "final.pt").exists()


def test_save_due():
    assert [d for d in range(1, 11) if save_due(d, 4, 10)] == [4, 8, 10]
    assert [d for d in range(1, 7) if save_due(d, 4, 6)] == [4, 6]


def test_a_failed_start_leaves_nothing_that_blocks_the_corrected_command(tmp_path):
    with pytest.raises(InputError, match="data: folder not found"):
        run(LineConfig(out=str(tmp_path / "a"), data="missing"))
    assert not (tmp_path / "a" / "config.yaml").exists()
    out = run(LineConfig(out=str(tmp_path / "a")))  # the corrected command: another config, same folder
    assert (out / "final.pt").exists()


@pytest.mark.parametrize(
    ("change", "field"),
    [({"lr": float("nan")}, "lr"), ({"stop_after": -1}, "stop_after"), ({"stop_after": 0}, "stop_after")],
)
def test_stage_configs_refuse_bad_numbers(change, field, tmp_path):
    """Every stage config's validate() (through `check_ranges`), for Python callers as for the command line."""
    from hias_nb.self_train import SelfTrainConfig
    from hias_nb.train import TrainConfig
    from hias_nb.warmup import WarmupConfig

    for cls in (TrainConfig, WarmupConfig, SelfTrainConfig):
        with pytest.raises(InputError, match=f"^{field}: must be"):
            cls(**change).validate()


def test_a_folder_that_holds_no_run_is_never_adopted(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "log.csv").write_text("my own notes\n")
    with pytest.raises(InputError, match="holds files but no hias_nb run"):
        run(LineConfig(out=str(folder)))
    assert (folder / "log.csv").read_text() == "my own notes\n"
    assert sorted(p.name for p in folder.iterdir()) == ["log.csv"]


def test_a_second_process_in_the_same_folder_is_refused(tmp_path):
    import subprocess
    import sys
    import textwrap

    from hias_nb.runs import run_lock

    out = tmp_path / "a"
    holder = textwrap.dedent(f"""
        import sys, time
        from hias_nb.runs import run_lock
        with run_lock({str(out)!r}):
            print("locked", flush=True)
            time.sleep(30)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match="another process is working in this folder"):
            run(LineConfig(out=str(out)))
    finally:
        proc.kill()
        proc.wait()
    with run_lock(out):  # released when its process ended (here: killed)
        pass
    assert (run(LineConfig(out=str(out))) / "final.pt").exists()


def test_a_diverged_model_is_never_saved(tmp_path):
    cfg = LineConfig(out=str(tmp_path / "a"), break_weights_at=5, checkpoint_every=3)
    with pytest.raises(RuntimeError, match=r"iteration 6: model\.weight is not finite"):
        run(cfg)
    state = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    assert state["iteration"] == 3 and torch.isfinite(state["model"]["weight"]).all()


def test_an_out_folder_that_cannot_be_written_is_refused_first(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    built = LineFit.built
    with pytest.raises(InputError, match="out: .* is a file, not a folder"):
        run(LineConfig(out=str(blocker / "run")))
    assert LineFit.built == built  # refused before the stage was built


def test_a_changed_input_file_is_refused_on_resume_and_when_complete(tmp_path):
    start = tmp_path / "start.pt"
    start.write_bytes(b"weights v1")
    cfg = LineConfig(out=str(tmp_path / "a"), init_checkpoint=str(start), stop_after=2)
    run(cfg)
    assert "init_checkpoint_sha256" in (tmp_path / "a" / "inputs.yaml").read_text()
    start.write_bytes(b"weights v2")  # another model at the same path
    with pytest.raises(InputError, match="init_checkpoint_sha256"):
        run(cfg)  # resuming would mix two starting points
    start.write_bytes(b"weights v1")
    run(LineConfig(out=str(tmp_path / "a"), init_checkpoint=str(start)))
    start.write_bytes(b"weights v3")
    with pytest.raises(InputError, match="init_checkpoint_sha256"):
        run(LineConfig(out=str(tmp_path / "a"), init_checkpoint=str(start)))  # not "already complete"
    with pytest.raises(InputError, match="missing.pt: file not found"):
        run(LineConfig(out=str(tmp_path / "b"), init_checkpoint=str(tmp_path / "missing.pt")))
    assert not (tmp_path / "b").exists()


def test_an_exploding_loss_stops_the_run_at_max_loss(tmp_path):
    cfg = LineConfig(out=str(tmp_path / "a"), lr=50.0, checkpoint_every=1, iterations=50)  # SGD diverges at once
    with pytest.raises(RuntimeError, match=r"> max_loss 10000: the run diverges"):
        run(cfg)
    log = rows(tmp_path / "a")
    assert all(float(r["loss"]) <= 1e4 for r in log)  # no row of the exploding step
    state = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    assert state["iteration"] == len(log) and torch.isfinite(state["model"]["weight"]).all()
    # resuming with another max_loss is allowed (it changes no result), with another lr not
    with pytest.raises(RuntimeError, match="max_loss 1e\\+12"):
        run(LineConfig(out=str(tmp_path / "a"), lr=50.0, checkpoint_every=1, iterations=50, max_loss=1e12))


def test_a_finished_folder_is_checked_not_rewritten(tmp_path):
    out = run(LineConfig(out=str(tmp_path / "a")))
    before = (out / "config.yaml").read_text()
    run(LineConfig(out=str(tmp_path / "a"), progress=True))  # a free key differs: complete, nothing rewritten
    assert (out / "config.yaml").read_text() == before
    (out / "config.yaml").write_bytes(b"\xff\xfe not yaml")
    with pytest.raises(InputError, match="not a config this project wrote"):
        run(LineConfig(out=str(tmp_path / "a")))


def test_dataset_identity_follows_the_files_not_their_location_in_time(tiny_toytown, tmp_path):
    import shutil

    from hias_nb.runner import dataset_identity

    data = tmp_path / "tt"
    shutil.copytree(tiny_toytown, data)
    a = dataset_identity("toytown", data, ["source_train"])
    assert a == dataset_identity("toytown", data, ["source_train"])  # deterministic
    assert a["data_root"] == str(data.resolve())
    assert a != dataset_identity("toytown", data, ["target_train"])  # another split
    label = next((data / "source" / "train" / "labels").glob("*.png"))
    label.write_bytes(label.read_bytes() + b"\0")  # another file of another size at the same path
    assert a["data_sha256"] != dataset_identity("toytown", data, ["source_train"])["data_sha256"]


def test_a_training_stage_refuses_to_resume_on_changed_data(tiny_toytown, tmp_path):
    import shutil

    from hias_nb.train import TrainConfig, train_source

    data = tmp_path / "tt"
    shutil.copytree(tiny_toytown, data)
    cfg = TrainConfig(out=str(tmp_path / "run"), data_root=str(data), iterations=4, batch_size=2, stop_after=1,
                      progress=False, device="cpu", warmup=1)  # fmt: skip
    train_source(cfg)
    assert "data_sha256" in (tmp_path / "run" / "inputs.yaml").read_text()
    image = sorted((data / "source" / "train" / "images").glob("*.png"))[-1]
    image.unlink()  # the split lost an image: resuming would train on another data set
    (data / "source" / "train" / "labels" / image.name).unlink()
    with pytest.raises(InputError, match="data_sha256"):
        train_source(cfg)


def test_resuming_may_change_lr_and_iterations_and_records_it(tmp_path):
    import yaml

    out = tmp_path / "a"
    run(LineConfig(out=str(out), stop_after=4, lr=0.1))
    with pytest.raises(InputError, match="iterations: 3 is below the iteration this run reached"):
        run(LineConfig(out=str(out), lr=0.1, iterations=3))
    run(LineConfig(out=str(out), lr=0.05, iterations=12))  # a lower lr for the rest, and a longer run
    assert yaml.safe_load((out / "resumes.yaml").read_text()) == [{"iteration": 4, "lr": [0.1, 0.05],
                                                                    "iterations": [10, 12]}]  # fmt: skip
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["lr"], saved["iterations"]) == (0.05, 12)
    log = rows(out)
    assert len(log) == 12 and float(log[3]["lr"]) == 0.1 and float(log[4]["lr"]) == 0.05
    # a finished run keeps them fixed: another lr is another run
    with pytest.raises(InputError, match=r"different config \(lr: 0\.05 there, 0\.01 now\)"):
        run(LineConfig(out=str(out), lr=0.01, iterations=12))
    # and a run that never stopped records nothing
    run(LineConfig(out=str(tmp_path / "b")))
    assert not (tmp_path / "b" / "resumes.yaml").exists()


def test_a_resumption_in_another_precision_is_refused(tmp_path):
    """`amp: bf16` resolves per machine (bf16 where the CPU or GPU has it, fp32 elsewhere): a run paused on one
    machine and resumed on another must not train its second half in another precision without a word."""
    cfg = LineConfig(out=str(tmp_path / "run"), stop_after=3)
    run(cfg)
    state_file = tmp_path / "run" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    assert state["precision"] == "off"  # what this config's steps ran in
    state["precision"] = "bf16"  # as if the first part had run where bf16 is native
    torch.save(state, state_file)
    before = state_file.read_bytes()
    refused = "precision: the run so far trained in bf16, here amp 'off' on cpu runs in off"
    with pytest.raises(InputError, match=refused):
        run(cfg)
    assert state_file.read_bytes() == before and not (tmp_path / "run" / "final.pt").exists()
    state["precision"] = "off"
    torch.save(state, state_file)
    assert (run(LineConfig(out=str(tmp_path / "run"))) / "final.pt").exists()


def test_a_resumed_training_stage_follows_the_new_lr_schedule(tiny_toytown, tmp_path):
    from hias_nb.runner import lr_factor
    from hias_nb.train import TrainConfig, train_source

    cfg = TrainConfig(out=str(tmp_path / "run"), data_root=str(tiny_toytown), iterations=4, batch_size=2,
                      stop_after=2, progress=False, device="cpu", warmup=1, lr=1e-3)  # fmt: skip
    train_source(cfg)
    train_source(dataclasses.replace(cfg, stop_after=None, lr=4e-4, iterations=5))
    lrs = [float(r["lr"]) for r in rows(tmp_path / "run")]
    expected = [1e-3 * lr_factor(i, 4, "poly", 1) for i in (0, 1)] + [
        4e-4 * lr_factor(i, 5, "poly", 1) for i in (2, 3, 4)
    ]
    assert lrs == pytest.approx(expected, rel=1e-5)  # log.csv keeps 6 significant digits


def test_a_disk_too_full_for_the_first_checkpoint_is_refused_before_training(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 20, 10 << 20, 1 << 20))
    with pytest.raises(InputError, match=r"out: .* has 1 MiB free; the first checkpoint needs about 16 MiB"):
        run(LineConfig(out=str(tmp_path / "a")))
    assert not (tmp_path / "a" / "config.yaml").exists()  # nothing blocks the re-run once there is room
    monkeypatch.undo()
    assert (run(LineConfig(out=str(tmp_path / "a"))) / "final.pt").exists()


def test_free_space_estimate_counts_model_and_optimiser_state():
    from hias_nb.runner import _tensor_bytes

    model = nn.Linear(100, 10)  # 1010 float32 parameters: 4040 bytes
    assert _tensor_bytes(model.state_dict()) == 4040
    assert _tensor_bytes({"a": [torch.zeros(3, dtype=torch.float64)], "b": 1}) == 24
