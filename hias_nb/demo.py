"""``hias-nb demo``: the main job on the embedded toytown benchmark, stage by stage.

generate toytown (if absent) → source-only training → evaluation on target-val → the same model with BatchNorm
statistics re-estimated on target-train (``source_only_adabn``, the share of the gain BN alone explains) →
adversarial warm-up from the source-only model (SPEC 1.4, output-space discriminator; its BN statistics then
re-estimated on target-train: ``warmup``) → HIAST rounds: pseudo-labels (IAS) from the generator G, then one
self-training round (HPLA, views, RAR, consistency, EMA teacher); round 1 starts from the warm-up model (G and M
of SPEC 1.1), round k+1's pseudo-labels come from round k's teacher and its student continues from round k's
student → oracle (trained on target labels; upper reference only, skipped with ``--quick``) → per-class IoU table
with one column per stage, ``report.json`` (stages = teachers; ``students`` = the students), figures. Every stage
writes into its own sub-folder and is skipped when its outputs exist, so an interrupted demo resumes where it
stopped. ``warmup_iterations=0`` skips the warm-up (round 1 then starts from the AdaBN model).
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
from hias_nb.errors import InputError
from hias_nb.evaluate import EvalResult, evaluate, report_table, stage_entry, write_report
from hias_nb.io import read_json, write_json
from hias_nb.models import checkpoint_meta, save_checkpoint
from hias_nb.pseudo_label import PseudoLabelConfig, generate_pseudo_labels
from hias_nb.runs import resolve_device
from hias_nb.self_train import SelfTrainConfig, self_train
from hias_nb.train import TrainConfig, load_model, recalibrate_bn, train_source
from hias_nb.warmup import WarmupConfig, adversarial_warmup

__all__ = ["DemoConfig", "demo_config", "run_demo", "adabn_checkpoint", "evaluate_stage", "summarise"]


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    data_root: str = "data/toytown"
    device: str = "auto"
    seed: int = 0
    images: int = 1000  # toytown target-train images
    data_seed: int = 0  # the benchmark's generation seed (fixed: `seed` varies training only)
    size: tuple[int, int] = (64, 128)  # toytown image size (H, W)
    source_iterations: int = 300  # also the oracle's; ≤ 10 min in all on 2 CPU cores (README, "Results")
    oracle: bool = True
    batch_size: int = 16
    rounds: int = 1  # on toytown a second round regresses (README, "Results"); --rounds 2 shows it
    round_iterations: int = 120  # longer rounds drift: the EMA teacher peaks early (README)
    warmup_iterations: int = 300  # adversarial warm-up (0: none; round 1 starts from source_only_adabn)
    adv_weight: float = 0.15  # the reference's 0.05 is for GTA5 with a pretrained ResNet-101 (not re-measured here)
    adabn_images: int | None = None  # target_train images for the BN re-estimates (None: all of them)
    d_ndf: int = 32  # discriminator width; the reference's 64 is for 1024×512 maps (it makes a step 1.5× slower)
    round_lr: float = 2e-4  # lr of round 1; later rounds use round_lr_decay ** (k - 1) times it
    round_head_lr_mult: float = 1.0  # the paper's 10 suits an ImageNet backbone; toytown's is trained from scratch
    round_lr_decay: float = 0.67  # the paper's 3e-6, 2e-6, 1e-6 shape
    alpha: float = 0.5  # IAS, HIAST's setting
    ema_gamma: float = 0.99  # the paper's 0.999 suits 8000-iteration rounds; ours are ~30× shorter
    policy: str = "ias"
    hpla: bool = True
    hpla_mode: str = "reference"
    strong: bool = True  # the student's CCA strong view
    lambda_kld: float = 0.1
    lambda_ent: float = 1.0
    lambda_cst: float = 0.5


def demo_config(quick: bool, **overrides) -> DemoConfig:
    if quick:
        cfg = DemoConfig(
            out="runs/demo_quick",
            source_iterations=120,
            oracle=False,
            rounds=1,
            round_iterations=40,
            warmup_iterations=80,
            adabn_images=256,
        )
    else:
        cfg = DemoConfig()
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if cfg.rounds < 1:  # checked here so that the CLI and Python callers get the same error
        raise InputError(f"rounds (--rounds): must be at least 1, got {cfg.rounds}")
    return cfg


def evaluate_stage(path: Path, name: str, model, ds, device) -> dict:
    """Evaluate once and cache the stage entry as JSON (a resumed demo does not re-evaluate)."""
    if path.exists():
        return read_json(path)
    result: EvalResult = evaluate(model, ds, ds.protocol, device, desc=f"evaluate {name}")
    entry = stage_entry(name, result)
    write_json(path, entry)
    return entry


def adabn_checkpoint(
    source: Path, out: Path, data_root: str, batch_size: int, device: str, max_images: int | None = None
) -> Path:
    """`source` with its BatchNorm statistics re-estimated on toytown's target_train (AdaBN; the first
    `max_images` images, all by default), saved to `out` once; a later call finds it and returns at once."""
    if not out.exists():
        model = load_model(source, device)
        loader = torch.utils.data.DataLoader(SegDataset("toytown", data_root, "target_train"), batch_size=batch_size)
        max_batches = None if max_images is None else -(-max_images // batch_size)
        recalibrate_bn(model, (b["image"] for b in loader), device, max_batches=max_batches)
        save_checkpoint(out, model, {**checkpoint_meta(source), "adabn": "target_train"})
    return out


def run_demo(
    quick: bool = False,
    out: str | None = None,
    device: str = "auto",
    data_root: str | None = None,
    seed: int = 0,
    **overrides,
) -> dict:
    """Run every stage (see the module docstring); `overrides` replace `DemoConfig` fields (e.g. in tests)."""
    cfg = demo_config(quick, out=out, data_root=data_root, seed=seed, device=device, **overrides)
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # a resumed demo's wall_seconds cover this call only; the report says so
    resumed = any(out_dir.glob("*/eval*.json"))
    print(f"[demo] toytown in {cfg.data_root}")
    ensure_toytown(cfg.data_root, images=cfg.images, seed=cfg.data_seed, size=cfg.size)
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
    stages.append(evaluate_stage(out_dir / "source_only" / "eval.json", "source_only", model, val, device))

    def adabn(source: Path, out: Path) -> Path:  # the demo's one AdaBN setting, for both stages that use it
        return adabn_checkpoint(source, out, cfg.data_root, cfg.batch_size, device, cfg.adabn_images)

    print("[demo] stage source_only_adabn: BatchNorm statistics re-estimated on target_train")
    adabn_ckpt = adabn(src_ckpt, out_dir / "source_only_adabn" / "model_final.pt")
    model = load_model(adabn_ckpt, device)
    stages.append(evaluate_stage(out_dir / "source_only_adabn" / "eval.json", "source_only_adabn", model, val, device))

    generator = student = adabn_ckpt  # without a warm-up, round 1 starts from the BN-recalibrated source model
    if cfg.warmup_iterations > 0:
        print("[demo] stage warmup: adversarial warm-up (source CE + output-space discriminator on target)")
        wdir = adversarial_warmup(
            WarmupConfig(
                out=str(out_dir / "warmup" / "train"),
                init_checkpoint=str(src_ckpt),
                data_root=cfg.data_root,
                iterations=cfg.warmup_iterations,
                batch_size=cfg.batch_size,
                adv_weight=cfg.adv_weight,
                d_ndf=cfg.d_ndf,
                seed=cfg.seed,
                device=device,
            )
        )
        # joint source+target batches leave mixed BN running statistics: re-estimate them on target (AdaBN)
        generator = student = adabn(wdir / "model_final.pt", out_dir / "warmup" / "model_final.pt")
        model = load_model(student, device)
        stages.append(evaluate_stage(out_dir / "warmup" / "eval.json", "warmup", model, val, device))

    students: list[dict] = []
    for k in range(1, cfg.rounds + 1):
        print(f"[demo] stage round_{k}: pseudo-labels ({cfg.policy}) from {generator.parent.name}, then self-training")
        rdir = out_dir / f"round_{k}"
        pseudo = generate_pseudo_labels(
            PseudoLabelConfig(
                out=str(rdir / "pseudo"),
                checkpoint=str(generator),
                data_root=cfg.data_root,
                policy=cfg.policy,
                alpha=cfg.alpha,
                seed=cfg.seed + k,
                device=device,
            )
        )
        run = self_train(
            SelfTrainConfig(
                out=str(rdir / "train"),
                pseudo_dir=str(pseudo),
                init_checkpoint=str(student),
                data_root=cfg.data_root,
                iterations=cfg.round_iterations,
                batch_size=cfg.batch_size,
                lr=cfg.round_lr * cfg.round_lr_decay ** (k - 1),
                head_lr_mult=cfg.round_head_lr_mult,
                ema_gamma=cfg.ema_gamma,
                hpla=cfg.hpla,
                hpla_mode=cfg.hpla_mode,
                strong=cfg.strong,
                lambda_kld=cfg.lambda_kld,
                lambda_ent=cfg.lambda_ent,
                lambda_cst=cfg.lambda_cst,
                seed=cfg.seed + k,
                device=device,
            )
        )
        teacher_ckpt, student = run / "teacher_final.pt", run / "student_final.pt"
        stages.append(
            evaluate_stage(rdir / "eval_teacher.json", f"round_{k}", load_model(teacher_ckpt, device), val, device)
        )
        students.append(
            evaluate_stage(rdir / "eval_student.json", f"round_{k}_student", load_model(student, device), val, device)
        )
        generator = teacher_ckpt  # SPEC 1.1: round k+1's pseudo-labels come from round k's EMA teacher

    if cfg.oracle:
        print("[demo] stage oracle: the same model trained on target_train labels (upper reference only)")
        ora_ckpt = train_source(dataclasses.replace(base, out=str(out_dir / "oracle"), split="target_train"))
        model = load_model(ora_ckpt, device)
        stages.append(evaluate_stage(out_dir / "oracle" / "eval.json", "oracle", model, val, device))

    report = write_report(
        out_dir / "report.json",
        protocol,
        stages,
        time.perf_counter() - t0,
        {"demo": config_to_dict(cfg), "quick": quick},
        students=students,
        summary=summarise(stages),
        resumed=resumed,
    )
    table = report_table(report)
    print(table.round(1).to_string(na_rep="-"))
    for line in _summary_lines(report["summary"]):
        print(f"[demo] {line}")
    _figures(report, out_dir)
    note = " (this call only: finished stages were reused)" if resumed else ""
    print(f"[demo] done in {report['wall_seconds']:.0f} s{note}; report: {out_dir / 'report.json'}")
    return report


def summarise(stages: list[dict]) -> dict:
    """Gains of the final round over source-only and AdaBN, and the share of the source → oracle gap closed."""
    by = {s["name"]: s["miou"] for s in stages}
    rounds = [s["name"] for s in stages if s["name"].startswith("round_")]
    out: dict = {}
    if not rounds:
        return out
    final = by[rounds[-1]]
    out["final_stage"] = rounds[-1]
    out["gain_over_source_only"] = round(final - by["source_only"], 2)
    out["gain_over_adabn"] = round(final - by["source_only_adabn"], 2)
    if "oracle" in by and by["oracle"] > by["source_only"]:
        out["gap_closed"] = round((final - by["source_only"]) / (by["oracle"] - by["source_only"]), 3)
    return out


def _summary_lines(summary: dict) -> list[str]:
    if not summary:
        return []
    lines = [
        f"{summary['final_stage']}: {summary['gain_over_source_only']:+.1f} mIoU over source_only, "
        f"{summary['gain_over_adabn']:+.1f} over source_only_adabn"
    ]
    if "gap_closed" in summary:
        lines.append(f"source_only -> oracle gap closed: {100 * summary['gap_closed']:.1f}%")
    return lines


def _figures(report: dict, out_dir: Path) -> None:
    from hias_nb.viz import stage_iou_bars

    fig = stage_iou_bars(report)
    fig.savefig(out_dir / "per_class_iou.png", dpi=120, bbox_inches="tight")
