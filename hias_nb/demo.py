"""``hias-nb demo``: the main job on the embedded toytown benchmark, stage by stage.

generate toytown (if absent) → generic pretraining of the backbone (`hias_nb.pretrain`, cached outside the demo
folder and timed apart, like a download) → source-only training → evaluation on target-val → the same model with
BatchNorm statistics re-estimated on target-train (``source_only_adabn``, the share of the gain BN alone explains) →
adversarial warm-up from the source-only model (docs/method.md §1.4, output-space discriminator; its BN statistics
then re-estimated on target-train: ``warmup``) → HIAST rounds: pseudo-labels (IAS) from the generator G, then one
self-training round (HPLA, views, RAR, consistency, EMA teacher); round 1 starts from the warm-up model (G and M
of docs/method.md §1.1), round k+1's pseudo-labels come from round k's teacher and its student continues from
round k's student → oracle (trained on target labels; upper reference only, skipped with ``--quick``) → per-class
IoU table with one column per stage, ``report.json`` (stages = teachers; ``students`` = the students), figures.
Every stage writes into its own sub-folder and is skipped when its outputs exist, so an interrupted demo resumes
where it stopped. ``warmup.iterations: 0`` skips the warm-up (round 1 then starts from the AdaBN model).

Settings: `DemoConfig` holds the demo's own settings and one config per stage (``source``, ``warmup``,
``pseudo``, ``round``), whose defaults are the stage configs' own: toytown's, in one place per stage. `QUICK` is
``--quick``; `stage_configs` is exactly what each stage receives. The resolved config goes to ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hias_nb.classes import get_protocol
from hias_nb.config import config_to_dict, load_config, override
from hias_nb.data import SegDataset
from hias_nb.data.toytown import VERSION as TOYTOWN_VERSION
from hias_nb.data.toytown import ensure_toytown, generator_digest
from hias_nb.errors import InputError
from hias_nb.evaluate import evaluate_stage, report_table, write_report
from hias_nb.io import write_json
from hias_nb.model_selection import dataset_agreement
from hias_nb.models import checkpoint_meta, save_checkpoint
from hias_nb.pretrain import PretrainConfig, pretrain
from hias_nb.pseudo_label import PseudoLabelConfig, generate_pseudo_labels
from hias_nb.runs import claim_run_folder, resolve_device
from hias_nb.self_train import SelfTrainConfig, self_train
from hias_nb.train import TrainConfig, load_model, recalibrate_bn, train_source
from hias_nb.warmup import WarmupConfig, adversarial_warmup

__all__ = [
    "DemoConfig",
    "QUICK",
    "PER_STAGE",
    "demo_config",
    "stage_configs",
    "resolved_config",
    "run_demo",
    "adabn_checkpoint",
    "summarise",
]

SECTIONS = ("pretrain", "source", "warmup", "pseudo", "round")  # the DemoConfig fields that hold a stage config

# Stage keys the demo sets itself for every stage it runs (`stage_configs`): folders, checkpoints, data, device
# and seeds. They are not settings (``--round.seed 3`` is refused); ``--seed``, ``--out`` etc. are the demo's own.
PER_STAGE = frozenset(
    {"out", "dataset", "data_root", "split", "init_checkpoint", "checkpoint", "pseudo_dir", "device", "seed",
     "pretrained", "size"}
)  # fmt: skip

# Pretraining keys that change no weight (left out of its cache folder's name).
RUN_ONLY = frozenset({"out", "device", "progress", "stop_after", "checkpoint_every", "max_loss", "num_workers"})

# Demo keys that may differ when a demo folder is re-used: where and on what it runs, and stages added to it.
RESUME_FREE = ("out", "device", "rounds", "oracle", "pretrain_root")


@dataclass
class DemoConfig:
    """``hias-nb demo``: the demo's own settings, then the stage configs it runs (defaults: each stage's own).

    On the command line ``--alpha 0.2`` sets a key of exactly one stage, ``--round.lr 1e-4`` a key several stages
    have (``lr``, ``iterations``, ``batch_size``, ...), ``--rounds 2`` a demo setting."""

    out: str = "runs/demo"
    data_root: str = "data/toytown"
    device: str = "auto"
    seed: int = 0  # source-only, warm-up and oracle train with `seed`; round k (pseudo-labels, training) seed + k
    images: int = 1000  # toytown target-train images
    data_seed: int = 0  # the benchmark's generation seed (fixed: `seed` varies training only)
    size: tuple[int, int] = (64, 128)  # toytown image size (H, W)
    oracle: bool = True  # also train `source` on target_train labels (an upper reference only)
    rounds: int = 1  # on toytown a second round regresses (README, "Results"); --rounds 2 shows it
    round_lr_decay: float = 0.67  # round k trains at round.lr × this ** (k - 1): the paper's 3e-6, 2e-6, 1e-6 shape
    adabn_images: int | None = None  # target_train images for the BN re-estimates (None: all of them)
    adabn_batch_size: int = 16  # images per forward pass of the BN re-estimates
    pretrain_root: str = "data/toytown_pretrain"  # cache of generic pretraining runs, one folder per setting
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # iterations 0: none (random init)
    source: TrainConfig = field(default_factory=TrainConfig)  # source-only training (and the oracle)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)  # iterations 0: none (round 1 from AdaBN)
    pseudo: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)  # every round's pseudo-labels
    round: SelfTrainConfig = field(default_factory=SelfTrainConfig)  # every round (lr: round 1's)

    def validate(self) -> None:
        if self.rounds < 1:
            raise InputError(f"rounds (--rounds): must be at least 1, got {self.rounds}")
        if self.pretrain.iterations > 0 and self.pretrain.backbone != self.source.backbone:
            raise InputError(
                f"pretrain.backbone: {self.pretrain.backbone!r} differs from source.backbone "
                f"{self.source.backbone!r} (the pretrained weights are loaded into it); set both"
            )
        for name in SECTIONS:
            if name in ("warmup", "pretrain") and getattr(self, name).iterations == 0:
                continue  # no warm-up / no pretraining
            try:
                getattr(self, name).validate()
            except InputError as e:
                raise InputError(f"{name}.{e}") from None


# ``--quick``: the small version (tests, notebook smoke runs), as overrides of the defaults; --config FILE and
# --key value overrides apply on top of it.
QUICK: dict[str, Any] = {
    "out": "runs/demo_quick",
    "oracle": False,
    "rounds": 1,
    "adabn_images": 256,
    "source.iterations": 120,
    "warmup.iterations": 80,
    "round.iterations": 40,
}


def demo_config(
    quick: bool = False, path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> DemoConfig:
    """The defaults (with `QUICK` applied when `quick`), updated by the YAML file at `path`, then by `overrides`
    (keys as on the command line: ``{"alpha": 0.2, "round.lr": 1e-4}``); every key and value checked."""
    base = override(DemoConfig(), QUICK, "--quick", PER_STAGE) if quick else DemoConfig()
    return load_config(DemoConfig, path, overrides, base=base, fixed=PER_STAGE)


def resolved_config(cfg: DemoConfig) -> dict[str, Any]:
    """`cfg` as a plain dict without the per-stage keys: the demo's ``config.yaml`` (valid as ``--config``)."""
    d = config_to_dict(cfg)
    for name in SECTIONS:
        d[name] = {k: v for k, v in d[name].items() if k not in PER_STAGE}
    return d


def stage_configs(cfg: DemoConfig, device: str | None = None) -> dict[str, Any]:
    """Every stage config the demo runs, by its folder under ``cfg.out``, in running order: exactly what each
    stage receives (and records in its own ``config.yaml``), computed without running anything. `device`: the
    resolved device (default ``cfg.device`` as written)."""
    out = Path(cfg.out)
    common = {"dataset": "toytown", "data_root": cfg.data_root, "device": device or cfg.device}
    plan: dict[str, Any] = {}
    pretrained = None
    if cfg.pretrain.iterations > 0:
        plan["pretrain"] = pretrain_config(cfg, device)
        pretrained = str(Path(plan["pretrain"].out) / "backbone.pt")
    source = dataclasses.replace(
        cfg.source, out=str(out / "source_only"), split="source_train", init_checkpoint=None, seed=cfg.seed,
        pretrained=pretrained, **common,
    )  # fmt: skip
    plan["source_only"] = source
    student = out / "source_only_adabn" / "model_final.pt"  # without a warm-up, round 1 starts from the AdaBN model
    if cfg.warmup.iterations > 0:
        src_ckpt = str(out / "source_only" / "model_final.pt")
        wdir = str(out / "warmup" / "train")
        plan["warmup/train"] = dataclasses.replace(
            cfg.warmup, out=wdir, init_checkpoint=src_ckpt, seed=cfg.seed, **common
        )
        student = out / "warmup" / "model_final.pt"  # the warm-up model with target BN statistics (AdaBN)
    generator = student
    for k in range(1, cfg.rounds + 1):
        rdir, seed = out / f"round_{k}", cfg.seed + k
        plan[f"round_{k}/pseudo"] = dataclasses.replace(
            cfg.pseudo, out=str(rdir / "pseudo"), checkpoint=str(generator), split="target_train", seed=seed, **common
        )
        plan[f"round_{k}/train"] = dataclasses.replace(
            cfg.round,
            out=str(rdir / "train"),
            pseudo_dir=str(rdir / "pseudo"),
            init_checkpoint=str(student),
            split="target_train",
            lr=cfg.round.lr * cfg.round_lr_decay ** (k - 1),
            seed=seed,
            **common,
        )
        # docs/method.md §1.1: round k+1's pseudo-labels come from round k's EMA teacher; its student continues
        generator, student = rdir / "train" / "teacher_final.pt", rdir / "train" / "student_final.pt"
    if cfg.oracle:
        # without the strong view: it is there for the rounds' student, and costs a model trained on the target's
        # own labels 3.3 mIoU (docs/toytown.md), so the upper reference would be set lower than it is
        plan["oracle"] = dataclasses.replace(source, out=str(out / "oracle"), split="target_train", strong_prob=0.0)
    return plan


def pretrain_config(cfg: DemoConfig, device: str | None = None) -> PretrainConfig:
    """The demo's pretraining run: at toytown's size, seeded by its own ``data_seed`` (shared by every training
    seed, like downloaded weights), in a folder of ``pretrain_root`` named by the benchmark version and a digest
    of its settings and of the generator's (`generator_digest`), so that runs of other settings sit beside it
    instead of being refused or mixed."""
    run = dataclasses.replace(cfg.pretrain, size=tuple(cfg.size), seed=cfg.pretrain.data_seed, out="",
                              device=device or cfg.device)  # fmt: skip
    key = {k: v for k, v in config_to_dict(run).items() if k not in RUN_ONLY}
    key["toytown_generator"] = generator_digest()  # scenes drawn by other code: another pretraining
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    name = f"v{TOYTOWN_VERSION}-{run.backbone}-{run.size[0]}x{run.size[1]}-{digest}"
    return dataclasses.replace(run, out=str(Path(cfg.pretrain_root) / name))


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


def run_demo(quick: bool = False, config: str | Path | None = None, **overrides: Any) -> dict:
    """Run every stage (see the module docstring) with ``demo_config(quick, config, overrides)``; returns the
    report. `overrides` take the command line's keys: ``run_demo(quick=True, alpha=0.2, **{"round.lr": 1e-4})``."""
    cfg = demo_config(quick, config, overrides)
    device = resolve_device(cfg.device)
    plan = stage_configs(cfg, device)
    t0 = time.perf_counter()
    out_dir = claim_run_folder(cfg.out, resolved_config(cfg), RESUME_FREE)  # refuses another demo's folder
    # a resumed demo's wall_seconds cover this call only; the report says so
    resumed = any(out_dir.glob("*/eval*.json"))
    print(f"[demo] toytown in {cfg.data_root}")
    setup = {"toytown": time.perf_counter()}
    ensure_toytown(cfg.data_root, images=cfg.images, seed=cfg.data_seed, size=cfg.size)
    setup["toytown"] = time.perf_counter() - setup["toytown"]
    if "pretrain" in plan:  # like a download: cached across demos, timed apart from the demo itself
        print(f"[demo] generic pretraining (cached): {plan['pretrain'].out}")
        setup["pretrain"] = time.perf_counter()
        pretrain(plan["pretrain"])
        setup["pretrain"] = time.perf_counter() - setup["pretrain"]
    stages, students = _run_stages(cfg, plan, device)
    report = write_report(
        out_dir / "report.json",
        get_protocol("cityscapes19"),
        stages,
        time.perf_counter() - t0 - sum(setup.values()),
        {"demo": resolved_config(cfg), "quick": quick},
        setup_seconds={k: round(v, 1) for k, v in setup.items()},
        students=students,
        summary=summarise(stages),
        resumed=resumed,
    )
    print(report_table(report).round(1).to_string(na_rep="-"))
    for line in _summary_lines(report["summary"]):
        print(f"[demo] {line}")
    _figures(report, out_dir)
    note = " (this call only: finished stages were reused)" if resumed else ""
    extra = ", ".join(f"{k} {v:.0f} s" for k, v in report["setup_seconds"].items())
    print(f"[demo] done in {report['wall_seconds']:.0f} s{note}, set-up apart ({extra})")
    print(f"[demo] report: {out_dir / 'report.json'}")
    return report


def _run_stages(cfg: DemoConfig, plan: dict[str, Any], device: str) -> tuple[list[dict], list[dict]]:
    """Run the stages of `plan` (`stage_configs`) in order, evaluating each; returns (stages, students)."""
    out = Path(cfg.out)
    val = SegDataset("toytown", cfg.data_root, "target_val")
    stages: list[dict] = []
    students: list[dict] = []

    def evaluated(name: str, ckpt: Path, path: Path) -> dict:  # cached in `path`
        return evaluate_stage(path, name, ckpt, val, device)

    def adabn(source: Path, stage: str) -> Path:  # the demo's one AdaBN setting, for both stages that use it
        dst = out / stage / "model_final.pt"
        return adabn_checkpoint(source, dst, cfg.data_root, cfg.adabn_batch_size, device, cfg.adabn_images)

    print("[demo] stage source_only: training on source_train")
    src_ckpt = train_source(plan["source_only"])
    stages.append(evaluated("source_only", src_ckpt, out / "source_only" / "eval.json"))
    print("[demo] stage source_only_adabn: BatchNorm statistics re-estimated on target_train")
    adabn_ckpt = adabn(src_ckpt, "source_only_adabn")
    stages.append(evaluated("source_only_adabn", adabn_ckpt, out / "source_only_adabn" / "eval.json"))
    if "warmup/train" in plan:
        print("[demo] stage warmup: adversarial warm-up (source CE + output-space discriminator on target)")
        wdir = adversarial_warmup(plan["warmup/train"])
        # joint source+target batches leave mixed BN running statistics: re-estimate them on target (AdaBN)
        warm_ckpt = adabn(wdir / "model_final.pt", "warmup")
        stages.append(evaluated("warmup", warm_ckpt, out / "warmup" / "eval.json"))
    for k in range(1, cfg.rounds + 1):
        pseudo = plan[f"round_{k}/pseudo"]
        generator = Path(pseudo.checkpoint).parent.name
        print(f"[demo] stage round_{k}: pseudo-labels ({pseudo.policy}) from {generator}, then self-training")
        generate_pseudo_labels(pseudo)
        run = self_train(plan[f"round_{k}/train"])
        rdir = out / f"round_{k}"
        stages.append(evaluated(f"round_{k}", run / "teacher_final.pt", rdir / "eval_teacher.json"))
        students.append(evaluated(f"round_{k}_student", run / "student_final.pt", rdir / "eval_student.json"))
        _add_agreement(stages[-1], run, val, device, rdir / "eval_teacher.json")
    if "oracle" in plan:
        print("[demo] stage oracle: the same model trained on target_train labels (upper reference only)")
        ora_ckpt = train_source(plan["oracle"])
        stages.append(evaluated("oracle", ora_ckpt, out / "oracle" / "eval.json"))
    return stages, students


def _add_agreement(entry: dict, run: Path, val: SegDataset, device: str, cache: Path) -> None:
    """A round's teacher–student agreement on target_val images (a label-free score), added to its entry once."""
    scores = entry.setdefault("label_free", {})
    if "agreement" not in scores:
        student, teacher = (load_model(run / f, device) for f in ("student_final.pt", "teacher_final.pt"))
        scores["agreement"] = round(dataset_agreement(student, teacher, val, device), 5)
        write_json(cache, entry)


def summarise(stages: list[dict]) -> dict:
    """The final round's row of `hias_nb.analysis.gap_table` (gain over source-only, share of the source → oracle
    gap closed), rounded, plus its gain over AdaBN; empty without a round."""
    from hias_nb.analysis import gap_table

    rounds = [s["name"] for s in stages if s["name"].startswith("round_")]
    if not rounds:
        return {}
    gaps = gap_table({"stages": stages})
    final = gaps.loc[rounds[-1]]
    out = {
        "final_stage": rounds[-1],
        "gain_over_source_only": round(float(final["gain"]), 2),
        "gain_over_adabn": round(float(final["miou"] - gaps.loc["source_only_adabn", "miou"]), 2),
    }
    if "gap_closed" in gaps:
        out["gap_closed"] = round(float(final["gap_closed"]), 3)
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
