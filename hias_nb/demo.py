"""``hias-nb demo``: the main job on the embedded toytown benchmark, stage by stage.

generate toytown (if absent) → source-only training → evaluation on target-val → the same model with BatchNorm
statistics re-estimated on target-train (``source_only_adabn``) → [HIAST self-training rounds] → oracle
(trained on target labels; upper reference only, skipped with ``--quick``) → per-class IoU table with one column
per stage, ``report.json``, figures. Every stage writes into its own sub-folder and is skipped when its outputs
exist, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hias_nb.classes import get_protocol
from hias_nb.config import config_to_dict
from hias_nb.data import SegDataset
from hias_nb.data.toytown import ensure_toytown
from hias_nb.evaluate import EvalResult, evaluate, report_table, stage_entry, write_report
from hias_nb.io import read_json, write_json
from hias_nb.models import save_checkpoint
from hias_nb.runs import resolve_device
from hias_nb.train import TrainConfig, load_model, recalibrate_bn, train_source

__all__ = ["DemoConfig", "demo_config", "run_demo"]


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    data_root: str = "data/toytown"
    device: str = "auto"
    seed: int = 0
    images: int = 1000  # toytown target-train images
    source_iterations: int = 600
    oracle: bool = True
    batch_size: int = 16


def demo_config(quick: bool, **overrides) -> DemoConfig:
    cfg = DemoConfig(out="runs/demo_quick", source_iterations=250, oracle=False) if quick else DemoConfig()
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def _evaluated(path: Path, name: str, model, ds, device) -> dict:
    """Evaluate once and cache the stage entry as JSON (a resumed demo does not re-evaluate)."""
    if path.exists():
        return read_json(path)
    result: EvalResult = evaluate(model, ds, ds.protocol, device, desc=f"evaluate {name}")
    entry = stage_entry(name, result)
    write_json(path, entry)
    return entry


def run_demo(
    quick: bool = False, out: str | None = None, device: str = "auto", data_root: str | None = None, seed: int = 0
) -> dict:
    cfg = demo_config(quick, out=out, data_root=data_root, seed=seed, device=device)
    device = resolve_device(cfg.device)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    t0 = time.perf_counter()
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"[demo] toytown in {cfg.data_root}")
    ensure_toytown(cfg.data_root, images=cfg.images, seed=cfg.seed)
    protocol = get_protocol("cityscapes19")
    val = SegDataset("toytown", cfg.data_root, "target_val")
    stages: list[dict] = []

    base = TrainConfig(
        data_root=cfg.data_root,
        iterations=cfg.source_iterations,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device=device,
    )
    print("[demo] stage source_only: training on source_train")
    src_ckpt = train_source(dataclasses.replace(base, out=str(out_dir / "source_only")))
    model = load_model(src_ckpt, device)
    stages.append(_evaluated(out_dir / "source_only" / "eval.json", "source_only", model, val, device))

    print("[demo] stage source_only_adabn: BatchNorm statistics re-estimated on target_train")
    adabn_ckpt = out_dir / "source_only_adabn" / "model_final.pt"
    if not adabn_ckpt.exists():
        target = SegDataset("toytown", cfg.data_root, "target_train")
        loader = torch.utils.data.DataLoader(target, batch_size=cfg.batch_size, shuffle=False)
        recalibrate_bn(model, (b["image"] for b in loader), device)
        save_checkpoint(adabn_ckpt, model, {**_meta(src_ckpt), "adabn": "target_train"})
    model = load_model(adabn_ckpt, device)
    stages.append(_evaluated(out_dir / "source_only_adabn" / "eval.json", "source_only_adabn", model, val, device))

    print("[demo] HIAST self-training rounds: not implemented yet in this version")

    if cfg.oracle:
        print("[demo] stage oracle: the same model trained on target_train labels (upper reference only)")
        ora_ckpt = train_source(dataclasses.replace(base, out=str(out_dir / "oracle"), split="target_train"))
        model = load_model(ora_ckpt, device)
        stages.append(_evaluated(out_dir / "oracle" / "eval.json", "oracle", model, val, device))

    report = write_report(
        out_dir / "report.json",
        protocol,
        stages,
        time.perf_counter() - t0,
        {"demo": config_to_dict(cfg), "quick": quick},
    )
    table = report_table(report)
    print(table.round(1).to_string(na_rep="-"))
    _figures(report, out_dir)
    print(f"[demo] done in {report['wall_seconds']:.0f} s; report: {out_dir / 'report.json'}")
    return report


def _meta(ckpt: Path) -> dict:
    from hias_nb.models import checkpoint_meta

    return checkpoint_meta(ckpt)


def _figures(report: dict, out_dir: Path) -> None:
    from hias_nb.viz import stage_iou_bars

    fig = stage_iou_bars(report)
    fig.savefig(out_dir / "per_class_iou.png", dpi=120, bbox_inches="tight")
