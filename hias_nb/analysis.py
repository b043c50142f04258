"""Computations behind the notebook series: tables, calibration, threshold histories, evaluation of stages.

Everything here returns numbers (numpy arrays, pandas DataFrames, report-like dicts) and nothing draws: no
matplotlib import, so each function is unit-tested against hand-computed values or direct formulas
(``tests/test_analysis.py``); `hias_nb.viz` turns the results into figures. The functions read what a run
writes (``report.json``, ``log.csv``, the pseudo-label folder of docs/method.md §2.6, checkpoints) or take
arrays. Sections follow the notebooks: 1 class frequencies, training logs, calibration and the domain gap,
2 pseudo-labels and the IAS thresholds (docs/method.md §2.2-§2.3), 4 ablations, 5 stages side by side,
6 dataset manifests. Computations that belong to a component live with it: the per-pixel loss maps in
`hias_nb.losses` (``loss_maps``) and the published checkpoint layout in `hias_nb.models`
(``write_published_layout``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Subset

from hias_nb.classes import CITYSCAPES_PALETTE, IGNORE, Protocol, colorize
from hias_nb.data import SegDataset, list_manifests, load_manifest
from hias_nb.errors import InputError
from hias_nb.evaluate import EvalResult, check_protocols, evaluate, predict_probs, stage_entry
from hias_nb.model_selection import HIGHER_IS_BETTER
from hias_nb.pseudo_label import summary_table
from hias_nb.train import load_model

__all__ = [
    "overlay",
    "selection_map",
    "round_teachers",
    "student_mious",
    # notebook 1
    "class_frequencies",
    "read_log",
    "collect_predictions",
    "calibration_table",
    "expected_calibration_error",
    "class_calibration",
    "split_iou_report",
    # notebook 2
    "threshold_matrix",
    "keep_fraction_table",
    "pseudo_label_table",
    # notebook 4
    "ABLATION_COLUMNS",
    "load_ablation",
    "VARIANT_NOTES",
    "last_round",
    "ablation_differences",
    "difference_summary",
    # notebook 5
    "stage_checkpoints",
    "scoring_protocol",
    "stage_confusions",
    "checkpoint_report",
    "checkpoint_predictions",
    "gap_table",
    "student_teacher_table",
    "caveat",
    "bullets",
    "findings_gap",
    "findings_calibration",
    "findings_pseudo_labels",
    "findings_hpla",
    "findings_losses",
    "findings_stages",
    "GTA5_CITYSCAPES",
    "benchmark_calibration",
    "hardest_classes",
    "label_free_table",
    # notebook 6
    "manifest_table",
]


# ---------------------------------------------------------------------------------------------------------------
# Label overlays (the colours every figure uses)


def overlay(
    image: np.ndarray, label: np.ndarray, alpha: float = 0.5, palette: np.ndarray = CITYSCAPES_PALETTE
) -> np.ndarray:
    """Blend a label map `[H,W]` (class colours; ignored pixels stay unblended) over an image `[H,W,3]`:
    ``round((1 - alpha) * image + alpha * colour)`` as uint8 ``[H,W,3]``."""
    colours = colorize(label, palette).astype(np.float32)
    keep = (np.asarray(label) < len(palette))[..., None]
    out = np.where(keep, (1 - alpha) * image.astype(np.float32) + alpha * colours, image.astype(np.float32))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def selection_map(pseudo: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """RGB ``[H,W,3]`` uint8: green = pseudo-label correct, red = wrong, grey = ignored by the selector,
    black = no ground truth."""
    pseudo, gt = np.asarray(pseudo), np.asarray(gt)
    out = np.zeros((*pseudo.shape, 3), dtype=np.uint8)
    has_gt = gt != IGNORE
    kept = pseudo != IGNORE
    out[~kept & has_gt] = (150, 150, 150)
    out[kept & has_gt & (pseudo == gt)] = (40, 170, 60)
    out[kept & has_gt & (pseudo != gt)] = (220, 40, 40)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Notebook 1: class frequencies, training logs, calibration, the domain gap


def class_frequencies(
    root: str | os.PathLike,
    splits: Sequence[str] = ("source_train", "target_train"),
    max_images: int = 200,
    dataset: str = "toytown",
) -> pd.DataFrame:
    """Share of labelled pixels per class (0..1) in the first ``max_images`` labels of each split.

    Returns a DataFrame indexed by class name with one column per split (each column sums to 1 unless the
    split has no labelled pixel, then it is all NaN).
    """
    columns = {}
    classes: tuple[str, ...] = ()
    for split in splits:
        ds = SegDataset(dataset, root, split)
        classes = ds.protocol.classes
        counts = np.zeros(len(classes), dtype=np.int64)
        for i in range(min(max_images, len(ds))):
            label = ds[i]["label"].reshape(-1)
            counts += torch.bincount(label[label != IGNORE], minlength=len(classes)).numpy()[: len(classes)]
        total = counts.sum()
        columns[split] = counts / total if total else np.full(len(classes), np.nan)
    return pd.DataFrame(columns, index=pd.Index(list(classes), name="class"))


def read_log(path: str | os.PathLike) -> pd.DataFrame:
    """A run's ``log.csv`` (one row per iteration) as a DataFrame; `InputError` when it is missing."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no training log here")
    return pd.read_csv(path)


@torch.no_grad()
def collect_predictions(
    model: torch.nn.Module, dataset: Dataset, device: str, max_images: int = 64, batch_size: int = 16
) -> dict[str, np.ndarray]:
    """Confidence, prediction and ground truth of `model` on the first ``max_images`` items of `dataset`.

    Returns ``conf`` float32 ``[N,H,W]`` (max softmax), ``pred`` and ``gt`` int64 ``[N,H,W]`` and ``image``
    uint8 ``[N,H,W,3]``.
    """
    model.eval()
    out: dict[str, list[np.ndarray]] = {"conf": [], "pred": [], "gt": [], "image": []}
    n = min(max_images, len(dataset))
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, n))]
        images = torch.stack([it["image"] for it in items]).to(device)
        conf, pred = predict_probs(model, images).max(1)
        out["conf"].append(conf.float().cpu().numpy())
        out["pred"].append(pred.cpu().numpy())
        out["gt"].append(torch.stack([it["label"] for it in items]).numpy())
        out["image"].append(images.permute(0, 2, 3, 1).cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def calibration_table(conf: np.ndarray, pred: np.ndarray, gt: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Reliability table over pixels with a label: per confidence bin ``[lo, hi)`` (the last bin closed),
    ``pixels``, ``mean_conf`` and ``accuracy`` (share of pixels whose prediction equals the label).
    The expected calibration error is ``sum(pixels * |accuracy - mean_conf|) / sum(pixels)``."""
    conf, pred, gt = (np.asarray(a).reshape(-1) for a in (conf, pred, gt))
    valid = gt != IGNORE
    conf, correct = conf[valid].astype(np.float64), (pred[valid] == gt[valid])
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, bins - 1)
    pixels = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=bins) / pixels
        accuracy = np.bincount(idx, weights=correct, minlength=bins) / pixels
    return pd.DataFrame({"lo": edges[:-1], "hi": edges[1:], "pixels": pixels, "mean_conf": mean_conf,
                         "accuracy": accuracy})  # fmt: skip


def expected_calibration_error(table: pd.DataFrame) -> float:
    """ECE of a ``calibration_table`` (pixel-weighted mean gap between accuracy and confidence)."""
    used = table["pixels"] > 0
    t = table[used]
    return float((t["pixels"] * (t["accuracy"] - t["mean_conf"]).abs()).sum() / max(t["pixels"].sum(), 1))


def class_calibration(
    conf: np.ndarray, pred: np.ndarray, gt: np.ndarray, classes: Sequence[str], bins: int = 10
) -> pd.DataFrame:
    """Per *predicted* class (pixels with a label): ``pixels``, ``mean_conf``, ``accuracy`` (precision of the
    prediction) and ``ece`` (of that class's own reliability table); NaN for a class never predicted."""
    conf, pred, gt = (np.asarray(a).reshape(-1) for a in (conf, pred, gt))
    rows = []
    for c, name in enumerate(classes):
        sel = pred == c
        t = calibration_table(conf[sel], pred[sel], gt[sel], bins)
        n = int(t["pixels"].sum())
        valid = sel & (gt != IGNORE)
        rows.append({
            "class": name,
            "pixels": n,
            "mean_conf": float(conf[valid].mean()) if n else np.nan,
            "accuracy": float((gt[valid] == c).mean()) if n else np.nan,
            "ece": expected_calibration_error(t) if n else np.nan,
        })  # fmt: skip
    return pd.DataFrame(rows).set_index("class")


def split_iou_report(
    model: torch.nn.Module,
    root: str | os.PathLike,
    splits: Sequence[str],
    device: str,
    dataset: str = "toytown",
    max_images: int | None = None,
) -> dict:
    """Evaluate `model` on several splits (the first ``max_images`` of each when given); a report-like dict
    (``classes``, ``protocol``, one stage per split) that ``stage_iou_bars`` draws (e.g. source_val vs
    target_val: the domain gap)."""
    stages, protocol = [], None
    for split in splits:
        ds = SegDataset(dataset, root, split)
        protocol = ds.protocol
        part = ds if max_images is None else Subset(ds, range(min(max_images, len(ds))))
        stages.append(stage_entry(split, evaluate(model, part, protocol, device, progress=False)))
    return {"protocol": protocol.name, "classes": list(protocol.classes), "stages": stages}


# ---------------------------------------------------------------------------------------------------------------
# Notebook 2: pseudo-labels and the evolution of the IAS thresholds


def threshold_matrix(pseudo_dir: str | os.PathLike) -> np.ndarray:
    """IAS thresholds after each instance, float64 ``[n_instances, C]``, from ``thresholds.parquet``."""
    path = Path(pseudo_dir) / "thresholds.parquet"
    if not path.exists():
        raise InputError(f"{path}: no threshold history (only the IAS policy writes one)")
    hist = pd.read_parquet(path)
    return hist.pivot(index="instance", columns="class", values="threshold").sort_index().to_numpy(np.float64)


def keep_fraction_table(history: pd.DataFrame, alpha: float, gamma: float, init: float = 0.9) -> pd.DataFrame:
    """Per (instance, class) with predicted pixels: the threshold before the instance (``prev_threshold``),
    the keep fraction IAS aims at, ``alpha * prev**gamma`` (``target_keep``), and the realised one,
    ``selected_pixels / predicted_pixels`` (``kept``). `history` is ``IAS.history`` / ``thresholds.parquet``."""
    h = history.sort_values(["class", "instance"]).copy()
    h["prev_threshold"] = h.groupby("class")["threshold"].shift(1).fillna(init)
    h = h[h["predicted_pixels"] > 0].copy()
    h["target_keep"] = np.minimum(alpha * h["prev_threshold"] ** gamma, 1.0)
    h["kept"] = h["selected_pixels"] / h["predicted_pixels"]
    return h.sort_values(["instance", "class"]).reset_index(drop=True)


def pseudo_label_table(pseudo_dir: str | os.PathLike) -> pd.DataFrame:
    """Per-class table of a pseudo-label folder: ``summary_table`` (threshold, class value, predicted pixels,
    kept fraction, precision, recall against the held-back labels) plus ``selected_px`` and ``gt_px``."""
    folder = Path(pseudo_dir)
    table = summary_table(folder)
    stats = pd.read_parquet(folder / "stats.parquet")
    per = stats.groupby("class").sum(numeric_only=True).reindex(range(len(table)), fill_value=0)
    table.insert(3, "selected_px", per["selected_pixels"].to_numpy())
    if "gt_pixels" in per:
        table["gt_px"] = per["gt_pixels"].to_numpy()
    return table


# ---------------------------------------------------------------------------------------------------------------
# Notebook 4: ablations


ABLATION_COLUMNS: tuple[str, ...] = ("variant", "seed", "stage", "miou")
_ROUND = re.compile(r"round_\d+$")  # a round's teacher (not "round_k_student")


def round_teachers(report: dict) -> list[str]:
    """The names of a report's round teachers in order (``round_1``, ``round_2``, ...): a `hias-nb run` report
    lists each round's student as a stage too (``round_k_student``), a demo report under ``students``."""
    return [s["name"] for s in report["stages"] if _ROUND.match(s["name"])]


def student_mious(report: dict) -> dict[str, float]:
    """``{round_k_student: mIoU}`` from either report layout (demo: ``students``; `hias-nb run`: ``stages``)."""
    listed = [*report.get("students", []), *report["stages"]]
    return {s["name"]: s["miou"] for s in listed if s["name"].startswith("round_") and s["name"].endswith("_student")}


def load_ablation(path: str | os.PathLike) -> pd.DataFrame | None:
    """The ablation CSV (long format: ``variant, seed, stage, miou`` plus one IoU column per class), or None
    when the file does not exist yet. A file without the required columns is an `InputError`."""
    path = Path(path)
    if not path.exists():
        return None
    df = pd.read_csv(path)
    missing = [c for c in ABLATION_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; expected {list(ABLATION_COLUMNS)} + class columns")
    return df


# What each variant is, for tables and figure legends (hias_nb.ablation.VARIANTS holds their settings).
VARIANT_NOTES: dict[str, str] = {
    "full": "the method as the demo runs it",
    "cbst": "CBST selector instead of IAS",
    "constant": "one constant threshold instead of IAS",
    "none": "every pixel kept (no selection)",
    "no_hpla": "without hard-class copy-paste",
    "no_rar": "without region regularisation (λc = λi = 0)",
    "no_consistency": "without the consistency term (λcst = 0)",
    "no_strong": "student sees the weak view, not the strong one",
    "no_warmup": "round 1 from the AdaBN source model",
    "warmup": "the warm-up itself: no round at all",
    "control_adabn": "equal compute as source training, BN re-estimated",
}


def last_round(group: pd.DataFrame) -> pd.DataFrame:
    """The row of the last round's teacher (``round_k``, not a student) of one (variant, seed) group of an
    ablation's long table; empty when the group has no round (the control)."""
    return group[group["stage"].str.match(_ROUND.pattern)].iloc[-1:]


def ablation_differences(df: pd.DataFrame, baseline: str = "full") -> pd.DataFrame:
    """Paired differences of an ablation's long table: per seed, each variant's final mIoU (its last round)
    minus the `baseline` variant's final mIoU on the same seed. Two references come as rows too: ``warmup``
    (the shared warm-up: what the rounds add, negated) and ``control_adabn`` (the equal-compute control). Columns
    ``variant, seed, diff``; a seed without the baseline is left out."""
    finals: dict[tuple[str, int], float] = {}
    for (variant, seed), g in df.groupby(["variant", "seed"], sort=False):
        final = last_round(g)
        if len(final):
            finals[(variant, seed)] = float(final["miou"].iloc[0])
        for ref in ("warmup", "control_adabn"):
            if ref in set(g["stage"]):
                finals.setdefault((ref, seed), float(g.loc[g["stage"] == ref, "miou"].iloc[0]))
    rows = [{"variant": v, "seed": s, "diff": m - finals[(baseline, s)]}
            for (v, s), m in finals.items() if v != baseline and (baseline, s) in finals]  # fmt: skip
    return pd.DataFrame(rows, columns=["variant", "seed", "diff"])


def difference_summary(diffs: pd.DataFrame) -> pd.DataFrame:
    """`ablation_differences` per variant: ``mean``, ``std`` (over seeds, ddof 1), ``seeds``, ``min``, ``max``,
    ``sign`` ("full better on every seed", "variant better on every seed" or "mixed": whether the seeds agree,
    the only verdict a handful of seeds supports) and what the variant is (``VARIANT_NOTES``)."""
    g = diffs.groupby("variant", sort=False)["diff"]
    out = pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "seeds": g.count(), "min": g.min(), "max": g.max()})
    out["sign"] = [
        "full better on every seed" if hi < 0 else "variant better on every seed" if lo > 0 else "mixed"
        for lo, hi in zip(out["min"], out["max"], strict=True)
    ]
    out["what"] = [VARIANT_NOTES.get(v, "") for v in out.index]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Notebook 5: stages side by side


def stage_checkpoints(run_dir: str | os.PathLike) -> dict[str, Path]:
    """The checkpoints of a demo run folder that exist, by stage name, in pipeline order: ``source_only``,
    ``source_only_adabn``, ``warmup``, ``round_k`` (EMA teacher), ``round_k_student``, ``oracle``."""
    run = Path(run_dir)
    found = {"source_only": run / "source_only" / "model_final.pt",
             "source_only_adabn": run / "source_only_adabn" / "model_final.pt",
             "warmup": run / "warmup" / "model_final.pt"}  # fmt: skip
    rounds = sorted((p for p in run.glob("round_*") if p.name[6:].isdigit()), key=lambda p: int(p.name[6:]))
    for r in rounds:
        found[r.name] = r / "train" / "teacher_final.pt"
        found[f"{r.name}_student"] = r / "train" / "student_final.pt"
    found["oracle"] = run / "oracle" / "model_final.pt"
    return {k: v for k, v in found.items() if v.exists()}


def scoring_protocol(dataset: SegDataset, name: str | None = None) -> Protocol:
    """The protocol checkpoints on `dataset` are scored under: the named one over the dataset's classes (e.g. a
    SYNTHIA run's ``synthia16``), or the dataset's own."""
    return dataset.protocol if name is None else check_protocols([name], dataset.protocol)[0]


def stage_confusions(
    checkpoints: Mapping[str, Path],
    dataset: Dataset,
    device: str,
    max_images: int | None = None,
    protocol: str | None = None,
    **settings: Any,
) -> dict[str, np.ndarray]:
    """Confusion matrix ``[C,C]`` (rows ground truth, columns prediction) of each checkpoint on `dataset`
    (the first ``max_images`` items when given), under `protocol` (a name, e.g. ``synthia16``; None: the
    dataset's own); `settings` go to `evaluate` (``size``, ``batch_size``, ``scales``, ``flip``). A run's own
    (``RunTarget.eval_settings``, protocol included) make the numbers its report's."""
    scored = scoring_protocol(dataset, protocol)
    if max_images is not None:
        dataset = Subset(dataset, range(min(max_images, len(dataset))))
    return {
        name: evaluate(load_model(path, device), dataset, scored, device, progress=False, **settings).matrix
        for name, path in checkpoints.items()
    }


def checkpoint_report(
    checkpoints: Mapping[str, os.PathLike | str],
    dataset: SegDataset,
    device: str,
    max_images: int | None = None,
    protocol: str | None = None,
    **settings: Any,
) -> dict:
    """Evaluate checkpoints on `dataset` (its first ``max_images`` items when given, `protocol` and `settings` as
    in `stage_confusions`); a report-like dict (``protocol``, ``classes``, one stage per checkpoint) for
    ``stage_iou_bars`` and ``report_table``."""
    paths = {k: Path(v) for k, v in checkpoints.items()}
    matrices = stage_confusions(paths, dataset, device, max_images, protocol, **settings)
    protocol = scoring_protocol(dataset, protocol)
    stages = [stage_entry(name, EvalResult(protocol, m, 0.0)) for name, m in matrices.items()]
    return {"protocol": protocol.name, "classes": list(protocol.classes), "stages": stages}


@torch.no_grad()
def checkpoint_predictions(
    checkpoints: Mapping[str, os.PathLike | str],
    dataset: Dataset,
    indices: Sequence[int],
    device: str,
    size: tuple[int, int] | None = None,
    scales: tuple[float, ...] = (1.0,),
    flip: bool = False,
) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, list[np.ndarray]]]:
    """Items `indices` of `dataset` and each checkpoint's prediction on them: ``(images, labels, predictions)``
    with images uint8 ``[H,W,3]``, labels int64 ``[H,W]`` and ``predictions[name]`` the argmax int64 ``[H,W]``
    per item (one list entry per index, so items may differ in size); `size`, `scales`, `flip` as in
    ``evaluate.predict_probs`` (a run's own: ``RunTarget.predict_settings``; default the item's size, one scale)."""
    items = [dataset[i] for i in indices]
    predictions = {}
    for name, path in checkpoints.items():
        model = load_model(Path(path), device).eval()
        probs = [predict_probs(model, it["image"][None].to(device), scales, flip, size) for it in items]
        predictions[name] = [p.argmax(1)[0].cpu().numpy() for p in probs]
    images = [it["image"].permute(1, 2, 0).numpy() for it in items]
    return images, [it["label"].numpy() for it in items], predictions


def gap_table(report: dict) -> pd.DataFrame:
    """Per stage: ``miou``, ``gain`` over source_only and, when the report has an oracle that beats
    source_only, ``gap_closed``: the share of the source_only → oracle mIoU gap closed."""
    miou = {s["name"]: s["miou"] for s in report["stages"]}
    base, oracle = miou.get("source_only"), miou.get("oracle")
    rows = []
    for name, m in miou.items():
        row = {"stage": name, "miou": m, "gain": None if base is None else m - base}
        if base is not None and oracle is not None and oracle > base:
            row["gap_closed"] = (m - base) / (oracle - base)
        rows.append(row)
    return pd.DataFrame(rows).set_index("stage")


def student_teacher_table(report: dict) -> pd.DataFrame:
    """mIoU of each round's EMA teacher (the stage) and its student (``report["students"]``)."""
    students = student_mious(report)
    miou = {s["name"]: s["miou"] for s in report["stages"]}
    rows = [{"round": r, "teacher": miou[r], "student": students.get(f"{r}_student")} for r in round_teachers(report)]
    return pd.DataFrame(rows, columns=["round", "teacher", "student"]).set_index("round")


# Published GTA5 → Cityscapes figures (DeepLab-v2 / ResNet-101 from ImageNet weights) that toytown is calibrated
# against: source-only, oracle and output-space adversarial adaptation (the warm-up's kind) from AdaptSegNet
# (Tsai et al., CVPR 2018, Table 1), HIAST's final result (Zhu et al., TPAMI 2025).
GTA5_CITYSCAPES: dict[str, float] = {"source_only": 36.6, "warmup": 42.4, "final": 56.3, "oracle": 65.1}


def benchmark_calibration(report: dict, reference: Mapping[str, float] = GTA5_CITYSCAPES) -> pd.DataFrame:
    """A demo's stage statistics beside a reference benchmark's (default `GTA5_CITYSCAPES`): one row per
    statistic, columns ``toytown`` and ``reference``.

    Rows: ``source_only``, ``warmup``, ``final`` (the last round's teacher), ``oracle`` (mIoU);
    ``source/oracle``; ``gain`` (final − source-only); ``warmup_share`` ((warm-up − source-only) / gain) and
    ``rounds_share`` ((final − warm-up) / gain); ``rounds_gain`` (final − warm-up); ``gap_closed`` (gain /
    (oracle − source-only)). A stage the report lacks gives NaN in its rows."""
    miou = {s["name"]: s["miou"] for s in report["stages"]}
    rounds = round_teachers(report)
    ours = {"source_only": miou.get("source_only"), "warmup": miou.get("warmup"),
            "final": miou[rounds[-1]] if rounds else None, "oracle": miou.get("oracle")}  # fmt: skip

    def stats(m: Mapping[str, float | None]) -> dict[str, float]:
        src, wu, fin, orc = (np.float64("nan") if m[k] is None else np.float64(m[k]) for k in ours)
        gain = fin - src
        with np.errstate(divide="ignore", invalid="ignore"):  # a zero gain or gap: inf / NaN, not an exception
            return {"source_only": src, "warmup": wu, "final": fin, "oracle": orc, "source/oracle": src / orc,
                    "gain": gain, "warmup_share": (wu - src) / gain, "rounds_share": (fin - wu) / gain,
                    "rounds_gain": fin - wu, "gap_closed": gain / (orc - src)}  # fmt: skip

    return pd.DataFrame({"toytown": stats(ours), "reference": stats(reference)})


def hardest_classes(report: dict, n: int = 5) -> list[str]:
    """The `n` classes with the lowest IoU in the final stage (the last round's teacher, else the last stage)."""
    stages = {s["name"]: s for s in report["stages"]}
    rounds = round_teachers(report)
    final = stages[rounds[-1]] if rounds else [s for n, s in stages.items() if n != "oracle"][-1]
    return sorted(final["per_class"], key=lambda c: final["per_class"][c])[:n]


def label_free_table(report: dict) -> pd.DataFrame:
    """Per evaluated model (stages, then students): its mIoU beside its label-free scores (``label_free`` of
    report.json, `hias_nb.model_selection`), and each score's rank in the direction that predicts a better model
    (``rank_*``: 1 = the model the score would pick)."""
    rows = [{"model": s["name"], "miou": s["miou"], **s.get("label_free", {})}
            for s in [*report["stages"], *report.get("students", [])]]  # fmt: skip
    df = pd.DataFrame(rows).set_index("model")
    higher_better = {"miou": True, **HIGHER_IS_BETTER}
    for col in df.columns:
        better = higher_better.get(col, col.startswith("coverage"))
        df[f"rank_{col}"] = df[col].rank(ascending=not better, method="min")
    return df


# ---------------------------------------------------------------------------------------------------------------
# "What we saw": each notebook's closing conclusions, computed from the run in front of the reader (markdown
# bullets; the notebooks add the caveats and the exercises)


def caveat(quick: bool) -> str:
    """The caveat every "What we saw" ends with: what the numbers can and cannot say."""
    if quick:
        return ("_Quick mode: every stage ran a few iterations on few images, so these numbers show the method's parts "
                "at work, not its results; run with `QUICK = False` for those._")  # fmt: skip
    return ("_One training seed: differences of about one point between stages or settings are within what another "
            "seed changes (notebook 4's ablation shows the spread)._")  # fmt: skip


def bullets(lines: Sequence[str], quick: bool) -> str:
    """Findings as a markdown list followed by the `caveat`."""
    return "\n".join(f"- {line}" for line in lines) + "\n\n" + caveat(quick)


def _ranked(d: Mapping[str, float], n: int, largest: bool) -> str:
    """The `n` largest (or smallest) values of `d` as "name +1.0, ...", only those on that side of 0."""
    items = sorted(((v, k) for k, v in d.items() if np.isfinite(v) and (v > 0 if largest else v < 0)), reverse=largest)
    return ", ".join(f"{k} {v:+.1f}" for v, k in items[:n]) or "none"


def findings_gap(gap: dict) -> list[str]:
    """Notebook 1: a `split_iou_report` with source_val and target_val stages → the domain gap in words."""
    src, tgt = (next(s for s in gap["stages"] if s["name"] == n) for n in ("source_val", "target_val"))
    diff = {c: tgt["per_class"][c] - src["per_class"][c] for c in src["per_class"]}
    return [
        f"The source-only model scores **{src['miou']:.1f}** mIoU on source-val and **{tgt['miou']:.1f}** on "
        f"target-val: the domain gap is {src['miou'] - tgt['miou']:.1f} points.",
        f"Largest losses on the target: {_ranked(diff, 3, largest=False)} (IoU points).",
    ]


def findings_calibration(table: pd.DataFrame, per_class: pd.DataFrame, min_pixels: int = 1000) -> list[str]:
    """Notebook 1: ECE and the most over-confident predicted class with at least `min_pixels` pixels."""
    out = [f"Expected calibration error on target-val: **{100 * expected_calibration_error(table):.1f} %**."]
    big = per_class[per_class["pixels"] >= min_pixels]
    if len(big):
        gap = (big["mean_conf"] - big["accuracy"]).sort_values(ascending=False)
        c = gap.index[0]
        r = big.loc[c]
        out.append(f"Most over-confident class (of those predicted on ≥ {min_pixels} pixels): **{c}** — "
                   f"{int(r['pixels'])} pixels at mean confidence {r['mean_conf']:.2f}, "
                   f"{100 * r['accuracy']:.0f} % of them right.")  # fmt: skip
    return out


def findings_pseudo_labels(table: pd.DataFrame, hard: Sequence[int]) -> list[str]:
    """Notebook 2: a `pseudo_label_table` → how much was kept and how right it is, hard classes against the rest."""
    sel, pred = table["selected_px"].sum(), table["predicted_px"].sum()
    out = [f"IAS kept **{100 * sel / max(pred, 1):.1f} %** of the target-train pixels."]
    if "precision" in table:
        right = float((table["precision"].fillna(0) * table["selected_px"]).sum()) / max(sel, 1)
        out.append(f"Of the kept pixels, **{100 * right:.1f} %** carry the right class.")
        names = list(table.index)
        is_hard = np.isin(np.arange(len(names)), list(hard))
        for label, mask in (("hard", is_hard), ("other", ~is_hard)):
            part = table[mask & (table["selected_px"].to_numpy() > 0)]
            if len(part):
                p = float((part["precision"] * part["selected_px"]).sum() / part["selected_px"].sum())
                out.append(f"Precision of the {label} classes' kept pixels: {100 * p:.1f} % ({len(part)} classes).")
        worst = table[table["selected_px"] > 0]["precision"].sort_values().head(3)
        out.append("Least precise: " + ", ".join(f"{c} {100 * v:.0f} %" for c, v in worst.items()) + ".")
    return out


def findings_hpla(
    classes: Sequence[str],
    hard: Sequence[int],
    probs: Sequence[float],
    used: Sequence[float],
    donor_counts: Sequence[int],
) -> list[str]:
    """Notebook 3: what HPLA will draw — the hard classes, the ones it cannot draw (no donor), the most likely."""
    hard = [int(c) for c in hard]
    dropped = [c for c in hard if donor_counts[c] == 0]
    out = [f"{len(hard)} hard classes; {len(hard) - len(dropped)} can be drawn."]
    if dropped:
        lost = float(sum(probs[c] for c in dropped))
        out.append(f"Without donors, never drawn: {', '.join(classes[c] for c in dropped)} — "
                   f"{100 * lost:.0f} % of the formula's probability, handed to the others.")  # fmt: skip
    top = [c for c in sorted(hard, key=lambda c: -used[c]) if used[c] > 0][:3]
    if top:
        out.append("Most likely draws: " + ", ".join(f"{classes[c]} {100 * used[c]:.0f} %" for c in top) + ".")
    return out


def findings_losses(scalars: Mapping[str, float], weights: Mapping[str, float]) -> list[str]:
    """Notebook 4: each loss term's share of the weighted total on the batch shown."""
    parts = {t: weights.get(t, 0.0) * v for t, v in scalars.items()}
    total = sum(parts.values())
    if total <= 0:
        return ["Every term is 0 on this batch."]
    shares = ", ".join(f"{t} {100 * v / total:.0f} %" for t, v in sorted(parts.items(), key=lambda kv: -kv[1]))
    return [f"Shares of the weighted total on this batch: {shares}."]


def findings_stages(report: dict) -> list[str]:
    """Notebook 5: the stages of a demo report in words — the final gain, the rounds' own part, the gap closed,
    the classes the rounds moved most, and the teacher against its student."""
    miou = {s["name"]: s["miou"] for s in report["stages"]}
    per = {s["name"]: s["per_class"] for s in report["stages"]}
    rounds = round_teachers(report)
    if not rounds:
        return ["This run has no self-training round."]
    final = rounds[-1]
    refs = (("source_only", "source-only"), ("source_only_adabn", "AdaBN"))
    over = ", ".join(f"{miou[final] - miou[ref]:+.1f} over {name}" for ref, name in refs if ref in miou)
    out = [f"The final stage ({final}'s teacher) scores **{miou[final]:.1f}** mIoU" + (f": {over}." if over else ".")]
    start = next((n for n in ("warmup", "source_only_adabn", "source_only") if n in miou), None)
    if start is None:  # a run started from a given model (`start_from`): no stage before the rounds
        return out
    rounds_gain = miou[final] - miou[start]
    verb = "add" if rounds_gain >= 0 else "lose"
    out.append(f"The self-training rounds {verb} **{abs(rounds_gain):.1f}** points against their start ({start}).")
    if len(rounds) > 1:
        steps = ", ".join(f"{a} → {b} {miou[b] - miou[a]:+.1f}" for a, b in zip(rounds, rounds[1:], strict=False))
        out.append(f"Round by round: {steps}.")
    if "oracle" in miou and "source_only" in miou and miou["oracle"] > miou["source_only"]:
        closed = (miou[final] - miou["source_only"]) / (miou["oracle"] - miou["source_only"])
        out.append(f"It closes **{100 * closed:.0f} %** of the source-only → oracle gap (oracle {miou['oracle']:.1f}).")
    moved = {c: per[final][c] - per[start][c] for c in per[final]}
    out.append(f"Classes the rounds helped most: {_ranked(moved, 3, largest=True)}; "
               f"hurt most: {_ranked(moved, 3, largest=False)} (IoU points, {start} → {final}).")  # fmt: skip
    students = student_mious(report)
    if f"{final}_student" in students:
        out.append(f"{final}'s EMA teacher {miou[final]:.1f} against its student {students[final + '_student']:.1f}.")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Notebook 6: dataset manifests


def manifest_table() -> pd.DataFrame:
    """One row per dataset split described in ``data_manifests/``: dataset, protocol, split, image pattern,
    expected count and size."""
    rows = []
    for name in list_manifests():
        m = load_manifest(name)
        for split, spec in m.splits.items():
            rows.append({"dataset": m.name, "protocol": m.protocol_name, "split": split, "image": spec.image,
                         "label": spec.label, "count": spec.count, "size": spec.size})  # fmt: skip
    return pd.DataFrame(rows)
