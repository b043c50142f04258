"""Pseudo-label generation (docs/method.md §2): run a model G over the target train set, select confident pixels
with a threshold policy, write label PNGs and the statistics HPLA and the notebooks read.

Outputs, all in one folder that appears atomically when generation completes (a temporary sibling is renamed
into place; a re-run finds the finished folder and resumes nothing twice, a different config is refused, never
appended or mixed — docs/method.md B16):

- ``labels/<name>.png``: uint8, class id 0..C-1 or 255 (ignored);
- ``stats.parquet``: one row per (image, class) with ``predicted_pixels``, ``selected_pixels``,
  ``mean_conf_predicted``, ``mean_conf_selected`` and, where the split has labels (diagnostics only, never used
  for adaptation), ``gt_pixels`` and ``correct_selected``;
- ``histograms.parquet``: sparse per-(image, class) counts of float16 confidence codes — enough to replay IAS for
  any α, β, γ and instance mode without re-running the model (``hias_nb.selectors.replay_ias``) and, where the
  split has labels, the ``correct`` count of each row (the replay's precision and recall: ``replay_correct``);
- ``thresholds.parquet``: the threshold history of a selector whose thresholds evolve (IAS: one row per instance
  and class; other policies write none);
- ``summary.json``: config, visiting order, final thresholds, class values (docs/method.md §2.6), pixel totals;
- ``donors.json``: ``{class: [[name, pixel_count], ...]}`` (docs/method.md §2.6 ``samples_with_class``) for HPLA.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from hias_nb import distributed, selectors
from hias_nb.classes import IGNORE
from hias_nb.config import check_ranges, config_to_dict
from hias_nb.data import SegDataset
from hias_nb.errors import InputError
from hias_nb.evaluate import predict_probs
from hias_nb.io import file_sha256, read_json, write_json, write_png
from hias_nb.runner import dataset_identity
from hias_nb.runs import check_writable, resolve_device, run_lock
from hias_nb.train import load_model

__all__ = ["PseudoLabelConfig", "generate_pseudo_labels", "visiting_order", "load_pseudo_summary"]


@dataclass
class PseudoLabelConfig:
    """``hias-nb pseudo-label``: model G over the target train split, then a selection policy. Defaults are
    toytown's (what ``hias-nb demo`` runs); ``configs/hiast_gta5_pseudo1.yaml`` has the paper's."""

    out: str = "runs/pseudo"  # folder for labels/ and the statistics files
    checkpoint: str = "runs/source_only/model_final.pt"  # the generator G (hias_nb checkpoint)
    dataset: str = "toytown"
    data_root: str = "data/toytown"
    split: str = "target_train"
    resize: tuple[int, int] | None = None  # inference and label size (H, W); the reference uses 768×1536
    policy: Literal["ias", "cbst", "constant", "none"] = "ias"
    alpha: float = 0.5  # IAS (docs/method.md §2.2): HIAST's setting; IAST's code default is 0.2
    beta: float = 0.9
    gamma: float = 8.0
    init: float = 0.9
    instance: Literal["batch", "image"] = "batch"  # "batch" with batch_size 2 is the reference
    cbst_p: float = 0.2
    constant_threshold: float = 0.9
    class_value_gamma: float = 0.99  # EMA of the mean kept confidence per class (docs/method.md §2.6)
    batch_size: int = 2
    forward_batch: int = 16  # images per model forward; selection still runs per batch_size group (same labels)
    order: Literal["seeded", "reference", "sorted"] = "seeded"
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def validate(self) -> None:
        check_ranges(
            self,
            positive=("batch_size", "forward_batch", "alpha"),
            non_negative=("gamma",),
            unit=("init", "cbst_p", "constant_threshold", "class_value_gamma"),
            sizes=("resize",),
        )
        if not 0 <= self.beta < 1:  # β = 1 would freeze every threshold at `init`
            raise InputError(f"beta: must be in [0, 1) (1 freezes the thresholds at init), got {self.beta!r}")


def visiting_order(n: int, batch_size: int, order: str, seed: int) -> list[int]:
    """The order in which images are visited (and so grouped into instances).

    ``seeded``: a numpy permutation of (seed); ``reference``: the permutation a ``DataLoader(shuffle=True)``
    draws (torch's RandomSampler) — the published code's mechanism, here seeded and recorded (docs/method.md B11);
    ``sorted``: file order.

    Args:
        n: number of images; batch_size: images per instance (the grouping does not change the order);
        order: ``"seeded"``, ``"reference"`` or ``"sorted"``; seed: the permutation's seed.
    """
    if order == "sorted":
        return list(range(n))
    if order == "seeded":
        return np.random.default_rng(seed).permutation(n).tolist()
    g = torch.Generator().manual_seed(seed)
    return list(torch.utils.data.RandomSampler(range(n), generator=g))


def _selector(cfg: PseudoLabelConfig, num_classes: int) -> selectors.Selector:
    """The selector ``cfg.policy`` names, with its settings from ``cfg`` (the one place that reads the name)."""
    if cfg.policy == "ias":
        return selectors.IAS(
            num_classes, alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma, init=cfg.init, instance=cfg.instance
        )
    if cfg.policy == "cbst":
        return selectors.CBST(num_classes, p=cfg.cbst_p)
    if cfg.policy == "constant":
        return selectors.Constant(num_classes, threshold=cfg.constant_threshold)
    return selectors.NoThreshold(num_classes)


SUMMARY_FIELDS = {"config": dict, "classes": list, "class_values": list, "predicted_pixels": list}


def load_pseudo_summary(folder: str | Path) -> dict:
    """``summary.json`` of a finished pseudo-label folder (see the module docstring); InputError if there is none
    or it is not one this project wrote (a field missing or of another type)."""
    path = Path(folder) / "summary.json"
    if not path.exists():
        raise InputError(f"{folder}: no pseudo-labels here (summary.json missing); run `hias-nb pseudo-label`")
    summary = read_json(path)
    if not isinstance(summary, dict):
        raise InputError(f"{path}: not a pseudo-label summary (a JSON {type(summary).__name__}, not an object)")
    for field, kind in SUMMARY_FIELDS.items():
        if not isinstance(summary.get(field), kind):
            raise InputError(f"{path}: {field}: missing or not a {kind.__name__}; not a summary hias-nb wrote")
    return summary


def _inputs(cfg: PseudoLabelConfig, ds: SegDataset) -> dict[str, str]:
    """What the labels are made from, beyond the config: the model's bytes, the exact image set, and the data's
    identity (`runner.dataset_identity`: regenerated data under the same names changes it)."""
    ids = "\n".join(s.id for s in ds.samples).encode()
    return {
        "checkpoint_sha256": file_sha256(cfg.checkpoint),
        **dataset_identity(cfg.dataset, cfg.data_root, [cfg.split]),
        "images_sha256": hashlib.sha256(ids).hexdigest(),
    }


def _finished(out: Path, cfg: PseudoLabelConfig, inputs: dict[str, str]) -> bool:
    """True if `out` already holds these pseudo-labels (same config, same model bytes, same images); raise if it
    holds others or anything else (never mix)."""
    if (out / "summary.json").exists():
        summary = read_json(out / "summary.json")
        made = summary.get("inputs", {})  # folders written before inputs were recorded have none
        changed = [k for k in made if made[k] != inputs.get(k)]
        if changed:
            raise InputError(
                f"{out}: holds pseudo-labels made from other inputs ({changed[0]}: {made[changed[0]]} there, "
                f"{inputs.get(changed[0])} now: {cfg.checkpoint} or {cfg.data_root} changed); choose another --out"
            )
        old = summary["config"]
        new = config_to_dict(cfg)
        same = ("device", "progress", "forward_batch")  # settings that do not change the labels
        diff = [k for k in new if k not in same and old.get(k) != new[k]]
        if diff:
            raise InputError(
                f"{out}: holds pseudo-labels made with another config ({diff[0]}: {old.get(diff[0])!r}"
                f" there, {new[diff[0]]!r} now); choose another --out"
            )
        print(f"{out}: pseudo-labels already complete; nothing to do")
        return True
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: folder exists and is not a finished pseudo-label folder; refusing to mix")
    return False


def _predictions(
    model: torch.nn.Module,
    ds: SegDataset,
    batches: list[list[int]],
    per_forward: int,
    device: torch.device,
    bar: dict,
) -> Iterator[tuple[list[dict], torch.Tensor, torch.Tensor]]:
    """``(items, conf, pred)`` per selection batch, in order: conf float32 `[B,H,W]` (max softmax probability),
    pred int64 `[B,H,W]` (argmax). ``per_forward`` batches share one model forward (eval mode: the outputs do not
    depend on the forward's batch size). `bar`: tqdm keywords.

    Under torchrun the forwards are shared: process r runs forward r of every `world_size` consecutive ones, and
    rank 0 receives them all and yields them in the visiting order (other ranks yield nothing), so the selector
    sees exactly what one process would."""
    world, rank = distributed.world_size(), distributed.rank()
    forwards = [batches[j : j + per_forward] for j in range(0, len(batches), per_forward)]
    with tqdm(total=len(batches), **{**bar, "disable": bar.get("disable") or rank > 0}) as progress:
        for k in range(0, len(forwards), world):
            mine = forwards[k + rank] if k + rank < len(forwards) else []
            own = [ds[i] for idx in mine for i in idx]
            out = None
            if own:
                conf, pred = predict_probs(model, torch.stack([it["image"] for it in own]).to(device)).max(1)
                out = (conf.float(), pred) if world == 1 else (conf.float().cpu(), pred.to(torch.uint8).cpu())
            results = distributed.all_gather_object(out) if world > 1 else [out]
            if rank > 0:
                continue
            for r, (group, res) in enumerate(zip(forwards[k : k + world], results, strict=False)):
                items = own if r == 0 else [ds[i] for idx in group for i in idx]
                conf, pred = res[0].to(device), res[1].to(device).long()
                start = 0
                for idx in group:
                    sl = slice(start, start + len(idx))
                    yield items[sl], conf[sl], pred[sl]
                    start += len(idx)
                    progress.update()


def _image_stats(
    lab: torch.Tensor, conf: torch.Tensor, pred: torch.Tensor, gt: torch.Tensor | None, num_classes: int
) -> tuple[pd.DataFrame, pd.Series]:
    """Per-class statistics of one image, and which classes it has (in `pred` or `gt`: its ``stats.parquet`` rows).

    Shape: `lab` (selected labels, 255 ignored), `conf`, `pred`, `gt` `[H,W]` on one device. Columns ``class``,
    ``predicted_pixels``, ``selected_pixels`` (and ``gt_pixels``, ``correct_selected`` with `gt`),
    ``mean_conf_predicted``, ``mean_conf_selected`` (NaN where a class has no such pixels).
    """
    kept = lab != IGNORE
    zeros = torch.zeros(num_classes, device=conf.device, dtype=torch.float64)
    counts = {  # per class [C], computed on the device, moved to the CPU once per image
        "predicted_pixels": torch.bincount(pred.flatten(), minlength=num_classes),
        "selected_pixels": torch.bincount(lab[kept], minlength=num_classes),
        "sum_pred": zeros.clone().index_add_(0, pred.flatten(), conf.flatten().double()),
        "sum_sel": zeros.clone().index_add_(0, lab[kept], conf[kept].double()),
    }
    if gt is not None:
        counts["gt_pixels"] = torch.bincount(gt[gt != IGNORE], minlength=num_classes)
        counts["correct_selected"] = torch.bincount(lab[kept & (lab == gt)], minlength=num_classes)
    per = pd.DataFrame({k: v.cpu().numpy() for k, v in counts.items()})
    per.insert(0, "class", np.arange(num_classes))
    with np.errstate(invalid="ignore", divide="ignore"):  # NaN where a class has no pixels
        per["mean_conf_predicted"] = per.pop("sum_pred") / per["predicted_pixels"]
        per["mean_conf_selected"] = per.pop("sum_sel") / per["selected_pixels"]
    present = per["predicted_pixels"] > 0
    if gt is not None:
        present |= per["gt_pixels"] > 0
    return per, present


class _Records:
    """What the selection pass writes besides the labels: per-image statistics, confidence histograms, donors
    (docs/method.md §2.6 ``samples_with_class``) and the class values."""

    def __init__(self, num_classes: int, class_value_gamma: float, has_gt: bool):
        self.num_classes, self.has_gt = num_classes, has_gt
        self.values = selectors.ClassValues(num_classes, gamma=class_value_gamma)
        self.stats: list[pd.DataFrame] = []
        self.histograms: list[pd.DataFrame] = []
        self.donors: dict[int, list] = {c: [] for c in range(num_classes)}

    def add(self, items: list[dict], conf: torch.Tensor, pred: torch.Tensor, labels: torch.Tensor) -> None:
        """One selection batch: `conf`, `pred`, `labels` `[B,H,W]`, `items` the dataset items in that order."""
        self.values.update(conf, labels)
        gts = None
        if self.has_gt and all(tuple(it["label"].shape) == tuple(pred.shape[1:]) for it in items):
            gts = torch.stack([it["label"] for it in items])  # diagnostics: the replay's precision and recall
        hist = pd.DataFrame(selectors.confidence_histograms(conf, pred, gt=gts))
        hist["image"] = [items[i]["name"] for i in hist["image"].to_numpy()]
        self.histograms.append(hist)
        for b, item in enumerate(items):
            gt = item["label"].to(conf.device) if self.has_gt else None  # diagnostics only
            if gt is not None and gt.shape != labels[b].shape:
                gt = None
            per, present = _image_stats(labels[b], conf[b], pred[b], gt, self.num_classes)
            per.insert(0, "image", item["name"])
            for c, n in zip(per["class"], per["selected_pixels"], strict=True):
                if n:
                    self.donors[int(c)].append([item["name"], int(n)])
            self.stats.append(per[present])

    def write(self, folder: Path, selector: selectors.Selector) -> pd.DataFrame:
        """Write the Parquet files and ``donors.json`` into `folder`; returns the statistics table."""
        stats = pd.concat(self.stats, ignore_index=True)
        stats.to_parquet(folder / "stats.parquet", index=False)
        pd.concat(self.histograms, ignore_index=True).to_parquet(folder / "histograms.parquet", index=False)
        if selector.history is not None:  # thresholds that evolve along the stream (IAS)
            selector.history.to_parquet(folder / "thresholds.parquet", index=False)
        write_json(folder / "donors.json", {str(c): v for c, v in self.donors.items()})
        return stats


def _summary(
    cfg: PseudoLabelConfig,
    ds: SegDataset,
    order: list[int],
    selector: selectors.Selector,
    values: selectors.ClassValues,
    stats: pd.DataFrame,
) -> dict:
    """The content of ``summary.json`` but for ``seconds``: `stats` is the ``stats.parquet`` table."""
    totals = stats.groupby("class")[["predicted_pixels", "selected_pixels"]].sum()
    totals = totals.reindex(range(len(ds.protocol.classes)), fill_value=0)
    return {
        "config": config_to_dict(cfg),
        "protocol": ds.protocol.name,
        "classes": list(ds.protocol.classes),
        "num_images": len(ds),
        "order": [ds.samples[i].id for i in order],
        "thresholds": [float(t) for t in selector.thresholds.tolist()],
        "class_values": [float(v) for v in values.values.tolist()],
        "predicted_pixels": totals["predicted_pixels"].astype(int).tolist(),
        "selected_pixels": totals["selected_pixels"].astype(int).tolist(),
    }


@torch.no_grad()
def generate_pseudo_labels(cfg: PseudoLabelConfig) -> Path:
    """Run G over the split, select, and write the folder described in the module docstring; returns it.

    A ``two_pass`` selector (CBST) first observes the whole split, then every selector selects batch by batch
    in the visiting order. The folder appears atomically: everything is written to a temporary sibling first.

    Args:
        cfg: the run's settings; ``cfg.out`` is the folder.
    """
    cfg.validate()
    out = Path(cfg.out)
    check_writable(out / "summary.json", "out")
    t0 = time.perf_counter()
    distributed.init_distributed(resolve_device(cfg.device))
    ds = SegDataset(cfg.dataset, cfg.data_root, cfg.split, size=cfg.resize)
    inputs = _inputs(cfg, ds)
    if _finished(out, cfg, inputs):
        return out
    main = distributed.is_main()
    # a second run into `out` is refused, not interleaved (rank 0 holds the lock; it alone writes)
    with run_lock(out.parent, f".{out.name}.lock") if main else contextlib.nullcontext():
        _generate(cfg, out, ds, inputs, t0)
    distributed.barrier()
    return out


def _generate(cfg: PseudoLabelConfig, out: Path, ds: SegDataset, inputs: dict[str, str], t0: float) -> Path:
    """`generate_pseudo_labels` once `out` is this process's."""
    device = resolve_device(cfg.device)
    num_classes = ds.protocol.num_classes
    model = load_model(cfg.checkpoint, device, num_classes=num_classes).eval()
    order = visiting_order(len(ds), cfg.batch_size, cfg.order, cfg.seed)
    selector = _selector(cfg, num_classes)
    main = distributed.is_main()
    tmp = out.parent / f".{out.name}.partial"
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)  # an interrupted earlier attempt: start over, never mix
        (tmp / "labels").mkdir(parents=True)

    batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    per_forward = max(1, cfg.forward_batch // cfg.batch_size)

    def predictions(desc: str, **bar) -> Iterator[tuple[list[dict], torch.Tensor, torch.Tensor]]:
        return _predictions(model, ds, batches, per_forward, device, dict(desc=desc, disable=not cfg.progress, **bar))

    if selector.two_pass:  # pass 1, e.g. CBST's class-balanced thresholds over the whole split (docs/method.md §2.3)
        for _, conf, pred in predictions(f"{type(selector).__name__} pass 1", leave=False):
            selector.observe(conf, pred)
    records = _Records(num_classes, cfg.class_value_gamma, has_gt=ds.samples[0].label is not None)
    for items, conf, pred in predictions(f"pseudo-label ({cfg.policy})", dynamic_ncols=True):
        labels = selector.select(conf, pred)
        for item, lab in zip(items, labels, strict=True):
            write_png(tmp / "labels" / f"{item['name']}.png", lab.to(torch.uint8).cpu().numpy())
        records.add(items, conf, pred, labels)
    if not main:
        return out  # the other processes only ran their share of the forwards

    stats = records.write(tmp, selector)
    summary = {**_summary(cfg, ds, order, selector, records.values, stats), "inputs": inputs}
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(tmp / "summary.json", summary)
    if out.exists():
        out.rmdir()  # empty (checked above)
    tmp.rename(out)
    print(summary_table(out).round(3).to_string())
    return out


def summary_table(folder: str | Path) -> pd.DataFrame:
    """Per-class table of a pseudo-label folder: threshold, class value, kept fraction, precision (if GT).

    Args:
        folder: a finished pseudo-label folder (``summary.json`` and ``stats.parquet``).
    """
    folder = Path(folder)
    s = load_pseudo_summary(folder)
    stats = pd.read_parquet(folder / "stats.parquet")
    per = stats.groupby("class").sum(numeric_only=True).reindex(range(len(s["classes"])), fill_value=0)
    df = pd.DataFrame(index=pd.Index(s["classes"], name="class"))
    if s["thresholds"] is not None:
        df["threshold"] = s["thresholds"]
    df["class_value"] = s["class_values"]
    df["predicted_px"] = per["predicted_pixels"].to_numpy()
    df["kept_fraction"] = (per["selected_pixels"] / per["predicted_pixels"].replace(0, np.nan)).to_numpy()
    if "correct_selected" in per:
        df["precision"] = (per["correct_selected"] / per["selected_pixels"].replace(0, np.nan)).to_numpy()
        df["recall"] = (per["correct_selected"] / per["gt_pixels"].replace(0, np.nan)).to_numpy()
    return df
