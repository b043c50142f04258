"""The one runner of every long training stage (source-only/oracle, adversarial warm-up, self-training rounds).

A stage supplies only what is its own — its config, its model set-up and its step — as a `Stage`; `run_stage`
does the rest, the same way for every stage:

1. refuse or skip: a folder with the stage's final file, the same config and the same inputs (model files by
   their bytes, a pseudo-label folder by its record, the data by its samples: ``inputs.yaml``) is complete
   (nothing to do); one with another config or other inputs, or a foreign non-empty folder, is refused (exit 2),
   so nothing written before is lost or mixed; the folder is locked while this process works in it;
2. prepare the run folder (``config.yaml`` and ``inputs.yaml``, written once the stage could be built) and check
   the batch divides over the processes;
3. resume: ``state.pt`` holds every stateful part the stage names (modules, optimisers, scalers, generators)
   and the iteration reached; the stage builds its data stream from that iteration, so a resumed run sees
   exactly the batches an uninterrupted one would;
4. loop: one `Stage.step` per iteration, a non-finite term stops the run before anything from that step is
   saved, a CSV row per iteration (``log.csv``), a progress bar, ``state.pt`` every ``checkpoint_every``
   iterations and where the session stops (``stop_after``, for wall-time-limited jobs);
5. finish: the stage writes its final artefacts (the file that marks it complete is written last).

Under ``torchrun`` every process runs the loop on its share of the batch and rank 0 writes every file.
Also here: the pieces every loop uses (learning-rate schedule, endless seeded sampler, autocast, optimiser).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from hias_nb import distributed
from hias_nb.augment import normalize
from hias_nb.classes import IGNORE
from hias_nb.config import check_ranges
from hias_nb.errors import InputError
from hias_nb.io import file_sha256
from hias_nb.models import param_groups
from hias_nb.runs import (
    CsvLog,
    check_writable,
    claim_config,
    load_state,
    prepare_run_dir,
    record_resume_changes,
    resolve_device,
    run_lock,
    save_state,
)

if TYPE_CHECKING:
    from hias_nb.data.manifests import Manifest

__all__ = [
    "RunSettings",
    "Stage",
    "run_stage",
    "input_identity",
    "dataset_identity",
    "check_free_space",
    "cross_entropy_step",
    "make_optimizer",
    "lr_factor",
    "set_lr",
    "save_due",
    "InfiniteSampler",
    "infinite_loader",
    "rank_generator",
    "stage_batches",
    "autocast_context",
    "resolve_amp",
    "AMP_MODES",
    "cpu_has_native_bf16",
    "make_scaler",
]

AmpMode = Literal["bf16", "fp16", "off"]
AMP_MODES: tuple[str, ...] = ("bf16", "fp16", "off")


@dataclass
class RunSettings:
    """Where and how a training stage runs: the keys every stage config shares (its dataclass base), with their
    defaults written once. A stage config adds what `run_stage` also reads: ``out``, ``iterations``,
    ``batch_size`` and ``lr``."""

    checkpoint_every: int = 100  # iterations between resumable states (state.pt)
    stop_after: int | None = None  # leave a resumable state after this many iterations (wall-time-limited jobs)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda[:N]
    amp: AmpMode = "bf16"  # bf16 | fp16 | off: the autocast precision, `resolve_amp` says where each applies
    progress: bool = True
    max_loss: float = 1e4  # a loss above this stops the run (diverging) before anything of that step is saved

    def validate(self) -> None:
        check_ranges(self, positive=("checkpoint_every", "stop_after", "iterations", "batch_size", "lr", "max_loss"))


class Stage(Protocol):
    """What a stage hands `run_stage` (built once the iteration to start from is known)."""

    parts: dict[str, Any]  # saved in state.pt under these names: nn.Module, Optimizer, GradScaler, Generator
    postfix: tuple[str, ...]  # terms shown on the progress bar

    def step(self, it: int) -> dict[str, float]:
        """Iteration `it` (0-based): batch, forward, losses, backward, optimiser steps; returns the logged terms."""
        ...

    def finish(self, out: Path, timing: dict[str, Any]) -> None:
        """Write the final artefacts into `out` (rank 0 only); `timing` goes into the checkpoints' meta."""
        ...


def _state_of(part: Any) -> Any:
    return part.get_state() if isinstance(part, torch.Generator) else part.state_dict()


def _tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in a (nested) state."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def check_free_space(out: Path, stage: Stage) -> None:
    """Refuse (`InputError`) to start when `out` cannot hold the first checkpoint: ``state.pt`` (every part's
    state; an optimiser's moments are estimated as two copies of its parameters, they are created lazily) and
    the final model files, written through a temporary copy, with a margin."""
    optimisers = [p for p in stage.parts.values() if isinstance(p, torch.optim.Optimizer)]
    params = sum(_tensor_bytes(group["params"]) for opt in optimisers for group in opt.param_groups)
    modules = sum(_tensor_bytes(p.state_dict()) for p in stage.parts.values() if isinstance(p, nn.Module))
    need = 2 * (modules + 2 * params) + modules + (16 << 20)
    free = shutil.disk_usage(str(out)).free
    if free < need:
        raise InputError(
            f"out: {out} has {free / 2**20:.0f} MiB free; the first checkpoint needs about {need / 2**20:.0f} MiB"
        )


def _restore(part: Any, value: Any) -> None:
    if isinstance(part, torch.Generator):
        part.set_state(value)
    else:
        part.load_state_dict(value)


def _check_finite(stage: Stage, out: Path, iteration: int) -> None:
    """Never save a diverged model: every floating parameter and buffer of the stage's modules must be finite."""
    for key, part in stage.parts.items():
        if isinstance(part, nn.Module):
            for name, t in part.state_dict().items():
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise RuntimeError(
                        f"{out}: iteration {iteration}: {key}.{name} is not finite (the run diverged); nothing saved, "
                        "the last state.pt is kept; lower the lr"
                    )


def input_identity(cfg: Any) -> dict[str, str]:
    """What a stage starts from beyond its config: the model files it loads by their bytes (sha256), a
    pseudo-label folder by its record (``summary.json``, which names the model and images it was made from),
    and the data it reads (`dataset_identity`). A missing file is an `InputError` here, before any work."""
    ids = {}
    for name in ("init_checkpoint", "pretrained"):
        if getattr(cfg, name, None):
            ids[f"{name}_sha256"] = file_sha256(getattr(cfg, name))
    if getattr(cfg, "pseudo_dir", None):
        ids["pseudo_dir_sha256"] = file_sha256(Path(cfg.pseudo_dir) / "summary.json")
    splits = [getattr(cfg, k) for k in DATA_SPLIT_KEYS if getattr(cfg, k, None)]
    if getattr(cfg, "source_dataset", None) or getattr(cfg, "source_root", None):  # a warm-up across two datasets
        source = dataset_identity(*cfg.source(), [cfg.source_split])
        ids |= {f"source_{k}": v for k, v in source.items()}
        splits.remove(cfg.source_split)
    if splits and getattr(cfg, "dataset", None) and getattr(cfg, "data_root", None):
        ids |= dataset_identity(cfg.dataset, cfg.data_root, splits)
    return ids


DATA_SPLIT_KEYS = ("split", "source_split", "target_split")  # the stage-config keys that name splits read


def dataset_identity(dataset: str | Path | Manifest, data_root: str | Path, splits: list[str]) -> dict[str, str]:
    """The data a stage reads, cheaply (`dataset`: a name, manifest path or `Manifest`, as `SegDataset` takes
    it): its folder, and a sha256 over every sample's id and the byte sizes of its image and label files in
    `splits`, plus a ``manifest.json`` in `data_root` (toytown's version, seed and size). Files replaced by
    others of another size, added or removed change it; contents are not read (a Cityscapes-sized set would take
    minutes)."""
    from hias_nb.data import SegDataset  # local: the data package imports the runner's users

    h = hashlib.sha256()
    for split in splits:
        for s in SegDataset(dataset, data_root, split).samples:
            label = s.label.stat().st_size if s.label is not None and s.label.exists() else -1
            h.update(f"{split}\t{s.id}\t{s.image.stat().st_size}\t{label}\n".encode())
    manifest = Path(data_root) / "manifest.json"
    if manifest.is_file():
        h.update(manifest.read_bytes())
    return {"data_root": str(Path(data_root).resolve()), "data_sha256": h.hexdigest()}


def _claim(out: Path, cfg: Any, inputs: dict[str, str], write: bool, resuming: bool = False) -> None:
    """The folder holds this run: the same config (``config.yaml``; `RESUME_CHANGEABLE` keys may differ when
    `resuming`) and the same inputs (``inputs.yaml``)."""
    prepare_run_dir(out, cfg, write, resuming)
    claim_config(out / "inputs.yaml", inputs, write=write)


def _already_complete(out: Path, cfg: Any, inputs: dict[str, str], done: str, name: str) -> bool:
    """A finished run with the same config and inputs (refused with exit 2 when either differs)."""
    if not ((out / done).exists() and (out / "config.yaml").exists()):
        return False
    _claim(out, cfg, inputs, write=False)  # a finished folder is checked, never rewritten
    if distributed.is_main():
        print(f"{out}: {name} already complete; nothing to do")
    return True


def run_stage(cfg: Any, name: str, done: str, build: Callable[[str, int], Stage]) -> Path:
    """Run a stage into ``cfg.out`` (resuming, skipping or refusing as above); returns the run folder.

    `cfg` needs ``out``, ``device``, ``iterations``, ``batch_size``, ``lr``, ``checkpoint_every``, ``stop_after``,
    ``progress`` and ``validate()`` (checked first, for Python callers as for the command line); `done` is the
    final file whose presence marks a complete run; ``build(device, start)`` makes the stage with its data stream
    positioned at iteration `start`.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    distributed.init_distributed(device)
    out = Path(cfg.out)
    check_writable(out / "config.yaml", "out")  # under a regular file or read-only: refused before any work
    inputs = input_identity(cfg)
    if _already_complete(out, cfg, inputs, done, name):
        return out
    if distributed.is_main():  # refuse another run's or a foreign folder before any work
        _claim(out, cfg, inputs, write=False, resuming=(out / "state.pt").exists())
    with run_lock(out) if distributed.is_main() else contextlib.nullcontext():
        return _run(cfg, name, out, device, inputs, build)


def _run(
    cfg: Any, name: str, out: Path, device: str, inputs: dict[str, str], build: Callable[[str, int], Stage]
) -> Path:
    """`run_stage` once the folder is this process's: resume, loop, finish."""
    if cfg.batch_size % distributed.world_size():
        raise InputError(f"batch_size: {cfg.batch_size} does not divide over {distributed.world_size()} processes")
    state = load_state(out / "state.pt")
    start = int(state["iteration"]) if state is not None else 0
    if cfg.iterations < start:
        raise InputError(f"iterations: {cfg.iterations} is below the iteration this run reached ({start})")
    precision = resolve_amp(device, getattr(cfg, "amp", "off"))  # what the steps run in on this machine
    if state is not None and state.get("precision", precision) != precision:  # one run, one precision
        raise InputError(
            f"{out / 'state.pt'}: precision: the run so far trained in {state['precision']}, here amp "
            f"{getattr(cfg, 'amp', 'off')!r} on {device} runs in {precision}; resume on a machine like the first"
        )
    stage = build(device, start)
    if distributed.is_main():  # the stage could be set up (data, models): now the folder holds this run
        check_free_space(out, stage)
        if state is not None:
            for key, (old, new) in record_resume_changes(out, cfg, start).items():
                print(f"{out}: resuming with {key} {new} (was {old}); recorded in resumes.yaml")
        _claim(out, cfg, inputs, write=True, resuming=state is not None)
    if state is not None:
        for key, part in stage.parts.items():
            per_rank = state.get("generator_ranks", {}).get(key, [])
            same_world = len(per_rank) == distributed.world_size()
            _restore(part, per_rank[distributed.rank()] if same_world else state[key])
        if distributed.is_main():
            print(f"{out / 'state.pt'}: resuming at iteration {start}/{cfg.iterations}")
    stop = cfg.iterations if cfg.stop_after is None else min(cfg.iterations, start + cfg.stop_after)
    seconds = _loop(stage, cfg, out, name, start, stop, precision)
    if stop < cfg.iterations:
        print(f"{out / 'state.pt'}: paused at iteration {stop}/{cfg.iterations} (stop_after); the same command resumes")
        return out
    if distributed.is_main():
        timing = {"iterations": cfg.iterations, "seconds_per_iteration": seconds / max(stop - start, 1)}
        stage.finish(out, {**timing, "precision": precision})
    distributed.barrier()
    return out


def _loop(stage: Stage, cfg: Any, out: Path, name: str, start: int, stop: int, precision: str = "off") -> float:
    """Iterations `start`..`stop` of `stage`: log, progress and resumable state (with the `precision` the steps
    run in, which a resumption must match); returns the seconds taken."""
    main = distributed.is_main()
    log = CsvLog(out / "log.csv", resume_from=start) if main else None
    bar = tqdm(total=cfg.iterations, initial=start, desc=name, disable=not (cfg.progress and main), dynamic_ncols=True)
    t0 = time.perf_counter()
    for it in range(start, stop):
        terms = stage.step(it)
        if not all(np.isfinite(v) for v in terms.values()):  # nothing from this step is logged or saved
            raise RuntimeError(f"{out}: iteration {it + 1}: non-finite loss, terms {terms}; lower the lr ({cfg.lr})")
        if terms["loss"] > cfg.max_loss:
            raise RuntimeError(
                f"{out}: iteration {it + 1}: loss {terms['loss']:.3g} > max_loss {cfg.max_loss:g}: the run diverges; "
                f"lower the lr ({cfg.lr}); the last state.pt is kept"
            )
        bar.update(1)
        bar.set_postfix({k: f"{terms[k]:.3f}" for k in stage.postfix})
        if log is not None:
            row = {k: float(f"{v:.6g}") for k, v in terms.items()}
            log.write({"iteration": it + 1, **row, "seconds": round(time.perf_counter() - t0, 2)})
        if save_due(it + 1, cfg.checkpoint_every, stop):
            # every process's generator state (each draws its own views), gathered by all of them
            ranks = {key: distributed.all_gather_object(part.get_state())
                     for key, part in stage.parts.items() if isinstance(part, torch.Generator)}  # fmt: skip
            if main:
                _check_finite(stage, out, it + 1)
                parts = {key: _state_of(part) for key, part in stage.parts.items()}
                state = {**parts, "iteration": it + 1, "generator_ranks": ranks, "precision": precision}
                save_state(out / "state.pt", state)
    bar.close()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------------
# Pieces every training loop uses
# ----------------------------------------------------------------------------------------------------------------


def cross_entropy_step(net: nn.Module, opt, scaler, images: torch.Tensor, labels: torch.Tensor, device: str,
                       amp: AmpMode) -> float:  # fmt: skip
    """One supervised step of a segmentation net: forward on normalised ``[B,3,H,W]`` images (autocast when
    `amp`), fp32 cross-entropy against ``[B,H,W]`` labels (255 ignored), backward, optimiser step; returns the
    loss."""
    with autocast_context(device, amp):
        logits = net(normalize(images))
    loss = nn.functional.cross_entropy(logits.float(), labels, ignore_index=IGNORE)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.item()


def make_optimizer(model: nn.Module, kind: str, lr: float, head_lr_mult: float, weight_decay: float):
    """AdamW, Adam (coupled L2 weight decay, docs/method.md §6.3) or SGD over the backbone/head groups."""
    groups = param_groups(model, lr, head_lr_mult=head_lr_mult, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)


def lr_factor(it: int, total: int, schedule: str, warmup: int = 0, min_factor: float = 1e-3) -> float:
    """Multiplier of every group's base learning rate at iteration `it` (docs/method.md §6.3: cosine to
    0.001·lr)."""
    if warmup and it < warmup:
        return (it + 1) / warmup
    t = min(it, total) / max(total, 1)
    if schedule == "cosine":
        return min_factor + (1 - min_factor) * (1 + math.cos(math.pi * t)) / 2
    if schedule == "poly":
        return max((1 - t) ** 0.9, min_factor)
    return 1.0


def set_lr(opt: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> float:
    """Set every parameter group's lr to its base lr × `factor` (the schedule); returns the first group's lr."""
    for g, lr in zip(opt.param_groups, base_lrs, strict=True):
        g["lr"] = lr * factor
    return base_lrs[0] * factor


def save_due(done: int, every: int, stop: int) -> bool:
    """Whether to write the resumable state after `done` iterations: every `every`, and where this session stops
    (the end of the run or `stop_after`)."""
    return done % every == 0 or done == stop


class InfiniteSampler(torch.utils.data.Sampler[int]):
    """Endless reshuffled indices: epoch e is a permutation seeded by (seed, e); rank r takes every world-th index.

    ``start`` skips that many (global) samples so a resumed run sees exactly the batches it would have seen.
    With ``positions=True`` it yields ``(position, index)`` pairs, the position counting samples from the start
    of the run over all ranks: a dataset can seed per-sample randomness with it (see ``self_train.HPLATarget``).
    """

    def __init__(self, n: int, seed: int, start: int = 0, positions: bool = False) -> None:
        self.n, self.seed, self.start, self.positions = n, seed, start, positions
        self.rank, self.world = distributed.rank(), distributed.world_size()

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        pos = self.start
        while True:
            epoch, offset = divmod(pos, self.n)
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            for i in range(offset, self.n):
                if (pos - self.start) % self.world == self.rank:
                    yield (pos, int(perm[i])) if self.positions else int(perm[i])
                pos += 1


def rank_generator(device: str, seed: int) -> torch.Generator:
    """The augmentation generator of this process: seeded by `seed` and the process's rank (``seed + 1000·rank``),
    so ranks draw different views; saved in ``state.pt`` for an exact resumption."""
    return torch.Generator(device=device).manual_seed(seed + 1000 * distributed.rank())


def stage_batches(ds, cfg: Any, start: int, device: str, seed: int, workers: int = 0, positions: bool = False):
    """This process's endless batches of `ds` (its share of ``cfg.batch_size``) in `InfiniteSampler` order seeded
    by `seed`, positioned at iteration `start` (so a resumed run sees the batches it would have seen)."""
    per_rank = cfg.batch_size // distributed.world_size()
    return iter(infinite_loader(ds, per_rank, seed, start * cfg.batch_size, workers, device, positions))


def infinite_loader(ds, batch: int, seed: int, start: int, workers: int, device: str, positions: bool = False):
    """Endless batches over `ds` in `InfiniteSampler` order, starting `start` samples in (for resumption)."""
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        sampler=InfiniteSampler(len(ds), seed, start, positions),
        num_workers=workers,
        pin_memory=device.startswith("cuda"),
        drop_last=True,
        persistent_workers=workers > 0,
    )


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 convolutions natively here (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_amp(device: str, amp: AmpMode) -> AmpMode:
    """The precision a run with setting `amp` actually uses on `device`:
    - ``"bf16"``: bf16 autocast on CUDA GPUs that have it (fp16 with a loss scaler on older ones) and on CPUs with
      native bf16 (≈ 1.8× faster steps on an AVX512-BF16 CPU, `benchmarks/bench_step.py`); fp32 on other CPUs;
    - ``"fp16"``: fp16 autocast with a dynamic loss scaler on CUDA, the equivalent of the reference's apex O1;
      fp32 on a CPU (fp16 is no faster there);
    - ``"off"``: fp32 everywhere."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp: expected one of {AMP_MODES}, got {amp!r}")
    if amp == "off":
        return "off"
    if device.startswith("cuda"):
        return "bf16" if amp == "bf16" and torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if amp == "bf16" and device == "cpu" and cpu_has_native_bf16() else "off"


def autocast_context(device: str, amp: AmpMode):
    """The autocast context of `resolve_amp(device, amp)` (a disabled one for fp32)."""
    mode = resolve_amp(device, amp)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=dtype, enabled=mode != "off")


def make_scaler(device: str, amp: AmpMode) -> torch.amp.GradScaler:
    """A dynamic loss scaler, enabled only where autocast runs in fp16 (CUDA)."""
    return torch.amp.GradScaler("cuda", enabled=resolve_amp(device, amp) == "fp16")
