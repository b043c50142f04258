"""Run directories: the resolved config beside every run, resumable training state, CSV logs.

A run directory holds ``config.yaml`` (the resolved config), ``state.pt`` (everything needed to resume:
weights, optimiser, scheduler, scaler, iteration, RNG states), ``log.csv`` and the stage's final files. Re-running
a stage into the same directory resumes it if the config is the same and refuses (exit 2) if it differs, so
nothing written before is lost or mixed with another run's files.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

try:  # POSIX; elsewhere folders are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

from hias_nb.config import config_to_dict
from hias_nb.errors import InputError
from hias_nb.io import atomic_path

__all__ = [
    "prepare_run_dir",
    "claim_run_folder",
    "record_resume_changes",
    "RESUME_CHANGEABLE",
    "claim_config",
    "check_writable",
    "run_lock",
    "LOCK_FILE",
    "save_state",
    "load_state",
    "CsvLog",
    "resolve_device",
]

# Keys that may change between an interrupted run and its resumption without changing the result ("out": a moved
# run still resumes; "max_loss" only decides whether a diverging run stops).
_RESUME_FREE = {"out", "device", "num_workers", "progress", "stop_after", "checkpoint_every", "max_loss"}
# Keys an interrupted run may change when it resumes (a diverging run resumed at a lower lr, a run extended): they
# change the result from the resumed iteration on, so each change is recorded in the folder's ``resumes.yaml``.
# A finished run keeps them fixed.
RESUME_CHANGEABLE = ("lr", "iterations")


LOCK_FILE = ".hias_nb.lock"


def prepare_run_dir(out: str | Path, cfg: Any, write: bool = True, resuming: bool = False) -> Path:
    """Create `out` and write ``config.yaml``; an existing run must have the same config (except device etc.,
    and `RESUME_CHANGEABLE` when `resuming` an unfinished run). ``write=False`` only checks, creating nothing (a
    stage writes once it has started, so a failed start blocks no corrected re-run). A folder with files but no
    ``config.yaml`` is not a hias_nb run: it is refused, never adopted."""
    out = Path(out)
    _refuse_foreign(out)
    if write:
        out.mkdir(parents=True, exist_ok=True)
    free = _RESUME_FREE | set(RESUME_CHANGEABLE) if resuming else _RESUME_FREE
    claim_config(out / "config.yaml", config_to_dict(cfg), free, write)
    return out


def claim_run_folder(out: str | Path, config: dict[str, Any], free: Collection[str] = ()) -> Path:
    """Make `out` the folder of the run `config` describes (a demo, an experiment, an ablation): refused when it
    cannot be written, is a file, holds files but no run, or holds a run with another config (`claim_config`);
    else created, with ``config.yaml`` written."""
    out = Path(out)
    check_writable(out / "config.yaml", "out")
    _refuse_foreign(out)
    out.mkdir(parents=True, exist_ok=True)
    claim_config(out / "config.yaml", config, free)
    return out


def _refuse_foreign(out: Path) -> None:
    """Refuse an ``--out`` that is a file, or a folder with files but no ``config.yaml`` (not a hias_nb run: never
    adopted, so nothing of its owner's is overwritten)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"out: {out} is a file, not a folder")
    if out.is_dir() and not (out / "config.yaml").exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
        if foreign:
            raise InputError(
                f"{out}: holds files but no hias_nb run (no config.yaml; e.g. {foreign[0]}); choose a new or empty "
                "folder for --out"
            )


def record_resume_changes(out: str | Path, cfg: Any, iteration: int) -> dict[str, list]:
    """Before a resumed run's ``config.yaml`` is rewritten: append the `RESUME_CHANGEABLE` keys whose values
    differ from the folder's to ``resumes.yaml`` (``- {iteration: 200, lr: [0.002, 0.0005]}``), so the folder
    says how its result came about; returns the changes ({key: [old, new]})."""
    out = Path(out)
    old = yaml.safe_load((out / "config.yaml").read_text()) or {}
    new = config_to_dict(cfg)
    changed = {k: [old.get(k), new.get(k)] for k in RESUME_CHANGEABLE if k in new and old.get(k) != new.get(k)}
    if changed:
        path = out / "resumes.yaml"
        history = (yaml.safe_load(path.read_text()) or []) if path.exists() else []
        history.append({"iteration": int(iteration), **changed})
        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump(history, sort_keys=False))
    return changed


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys (``{"round": {"lr": 1}}`` → ``{"round.lr": 1}``)."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def claim_config(path: Path, config: dict[str, Any], free: Collection[str] = (), write: bool = True) -> None:
    """Write `config` as a folder's ``config.yaml`` unless the folder holds a run with another one: an existing
    file must agree on every key (dotted for nested settings) except those in `free` and below them, else
    `InputError` naming the first key that differs, with nothing written."""
    new = _flat(config)
    if path.exists():
        try:
            old = _flat(yaml.safe_load(path.read_text()) or {})
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise InputError(
                f"{path}: not a config this project wrote ({type(e).__name__}); choose another --out"
            ) from None

        def loose(k: str) -> bool:  # a free key, or a setting below one
            return any(k == f or k.startswith(f + ".") for f in free)

        diff = sorted(k for k in old.keys() | new.keys() if not loose(k) and old.get(k) != new.get(k))
        if diff:
            k = diff[0]
            raise InputError(
                f"{path}: this run directory holds a run with a different config ({k}: {old.get(k)!r} there, "
                f"{new.get(k)!r} now); choose another --out or delete the folder"
            )
    if write:
        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump(config, sort_keys=False))


@contextlib.contextmanager
def run_lock(out: str | Path, name: str = LOCK_FILE) -> Iterator[None]:
    """Hold the run folder `out` while this process works in it: a second process gets an `InputError` instead of
    writing the same files (an advisory lock on ``out/<name>``, released when the process ends, even by a
    kill -9)."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with (out / name).open("a") as f:
            if fcntl is not None:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise InputError(f"{out}: another process is working in this folder; wait for it to end") from None
            yield
    except BaseException:
        # a run refused before it wrote anything leaves no folder behind (only one this call made, still empty)
        if created and [p.name for p in out.iterdir()] == [name]:
            (out / name).unlink()
            out.rmdir()
        raise


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically save a resumable training state (tensors, numbers, strings and RNG byte tensors only)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, never guess
        raise InputError(f"{path}: cannot read the saved training state ({e})") from None


class CsvLog:
    """Append-only CSV of per-iteration metrics; a resumed run truncates rows past its resume point."""

    def __init__(self, path: str | Path, resume_from: int = 0) -> None:
        self.path = Path(path)
        self.fields: list[str] | None = None
        if self.path.exists():
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= resume_from]
            if rows:
                self.fields = list(rows[0])
            with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
                if self.fields:
                    w = csv.DictWriter(f, fieldnames=self.fields)
                    w.writeheader()
                    w.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        new_file = self.fields is None
        if new_file:
            self.fields = list(row)
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new_file:
                w.writeheader()
            w.writerow(row)
            f.flush()
            os.fsync(f.fileno())


def resolve_device(name: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; an unavailable CUDA request is an InputError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device: {name!r} requested but CUDA is not available on this machine")
    if name == "mps" and not torch.backends.mps.is_available():
        raise InputError("device: 'mps' requested but MPS is not available on this machine")
    if not (name == "cpu" or name.startswith("cuda") or name == "mps"):
        raise InputError(f"device: expected auto, cpu or cuda[:N], got {name!r}")
    return name


def check_writable(path: str | Path, field: str) -> None:
    """Refuse (before any work) an output path whose folder cannot be made or written: under a regular file,
    read-only, or not ours to write."""
    path = Path(path)
    parent = path.parent.resolve()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{field}: {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{field}: {path}: {parent} is not writable")
