"""``hias-nb run EXPERIMENT.yaml``: one of the paper's experiments end to end (docs/reproducing.md).

The stages, each one ``hias_nb`` stage with its own resumable run folder under ``out``:

1. ``source_only``: `train.train_source` on the source dataset (skipped with ``start_from``);
2. ``warmup``: `warmup.adversarial_warmup` on the source and target datasets (skipped with ``start_from``);
3. for each round k = 1..K: ``round_k/pseudo`` (`pseudo_label.generate_pseudo_labels` from the previous teacher,
   IAS with the round's α) and ``round_k/train`` (`self_train.self_train`, from the previous student);

and after each, an evaluation on the target's validation split under every listed protocol, cached as JSON.
``start_from`` is a model round 1 starts from instead of stages 1–2: the published warm-up
(``pseudo_resume_from.pth``, HIAST/IAST layout) or any hias_nb checkpoint.

The plan is printed first (every stage, and whether it is done, to resume, or to run); a finished stage is
skipped, an interrupted one resumes; the run ends with ``report.json`` (the demo's schema) and
``per_class_iou.png``. Everything is checked before any stage starts: the experiment file's keys and values,
both dataset roots and splits, the protocols against the target's classes, ``start_from``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hias_nb import distributed
from hias_nb.config import config_to_dict, load_config
from hias_nb.data import SegDataset
from hias_nb.errors import InputError
from hias_nb.evaluate import check_protocols, evaluate_stage, report_table, write_report
from hias_nb.models import checkpoint_architecture
from hias_nb.pseudo_label import PseudoLabelConfig, generate_pseudo_labels
from hias_nb.runs import claim_run_folder, resolve_device
from hias_nb.self_train import SelfTrainConfig, self_train
from hias_nb.train import TrainConfig, train_source
from hias_nb.warmup import WarmupConfig, adversarial_warmup

__all__ = ["EvalSettings", "ExperimentConfig", "SMOKE", "experiment_config", "experiment_plan", "run_experiment"]

# Section keys the experiment sets for each stage (where it runs, what it reads and starts from); not settable.
FIXED = frozenset({"out", "init_checkpoint", "checkpoint", "pseudo_dir", "dataset", "data_root", "split", "seed",
                   "source_dataset", "source_root", "source_split", "target_split", "device"})  # fmt: skip


@dataclass
class EvalSettings:
    """How every stage is evaluated on the target's validation split (docs/method.md §7)."""

    size: tuple[int, int] | None = (768, 1536)  # base evaluation size; the reference's for Cityscapes; None: full
    batch_size: int = 2
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False


def evaluation_settings(section: dict[str, Any] | None) -> dict[str, Any]:
    """An experiment's ``evaluate`` section (as its config.yaml or report.json holds it; a missing key takes the
    `EvalSettings` default) as keyword arguments of ``evaluate.evaluate``: ``size`` and ``scales`` as tuples."""
    ev = {**config_to_dict(EvalSettings()), **(section or {})}
    return {**ev, "size": tuple(ev["size"]) if ev["size"] else None, "scales": tuple(ev["scales"])}


@dataclass
class ExperimentConfig:
    """An experiment file (``configs/experiments/*.yaml``): datasets, rounds, and one section per stage kind whose
    keys are that stage's config (``source``, ``warmup``, ``pseudo``, ``round``, ``evaluate``)."""

    out: str = "runs/experiment"
    device: str = "auto"
    seed: int = 0  # source-only and warm-up train with `seed`; round k with seed + k
    source_dataset: str = "gta5"  # a dataset name (data_manifests/) or a manifest YAML
    source_root: str = "data/GTA5"
    source_split: str = "train"
    target_dataset: str = "cityscapes"
    target_root: str = "data/cityscapes"
    target_split: str = "train"  # pseudo-labelled, unlabelled use only
    val_split: str = "val"
    protocols: tuple[str, ...] = ("cityscapes19",)  # every stage's mean IoU under each; the first leads the report
    start_from: str | None = None  # round 1 starts from this model (published or hias_nb layout); no stages 1–2
    alpha: tuple[float, ...] = (0.5, 0.5, 0.5)  # IAS α per round (not pseudo.alpha); its length: the rounds
    round_lr: tuple[float, ...] = (3e-6, 2e-6, 1e-6)  # self-training lr per round (not round.lr)
    pseudo_resize: tuple[tuple[int, int], ...] | None = None  # per round (H, W); None: pseudo.resize every round
    source: TrainConfig = field(default_factory=TrainConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    pseudo: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    round: SelfTrainConfig = field(default_factory=SelfTrainConfig)
    evaluate: EvalSettings = field(default_factory=EvalSettings)

    @property
    def rounds(self) -> int:
        return len(self.alpha)

    def validate(self) -> None:
        if not self.alpha:
            raise InputError("alpha: give one IAS alpha per round (at least one)")
        for name in ("round_lr", "pseudo_resize"):
            value = getattr(self, name)
            if value is not None and len(value) != self.rounds:
                raise InputError(f"{name}: {len(value)} values for {self.rounds} rounds (one per alpha)")
        for key, section, per_round in (("round.lr", self.round, "round_lr"), ("pseudo.alpha", self.pseudo, "alpha")):
            name = key.split(".")[1]
            if getattr(section, name) != _default(type(section), name):  # it would be replaced: never silently
                raise InputError(f"{key}: set per round by {per_round} (e.g. {per_round}: [...], one per round)")
        if self.evaluate.batch_size < 1 or not all(s > 0 for s in self.evaluate.scales):
            raise InputError("evaluate: batch_size and scales must be positive")
        for section in ("source", "warmup", "pseudo", "round"):
            try:
                getattr(self, section).validate()
            except InputError as e:
                raise InputError(f"{section}.{e}") from None


def _default(cls: type, name: str) -> Any:
    (f,) = [f for f in dataclasses.fields(cls) if f.name == name]
    return f.default


# ``--smoke``: the same stages on tiny sizes and two iterations each (tests, a first try on a new machine).
SMOKE: dict[str, Any] = {
    "source.iterations": 2, "source.batch_size": 2, "source.resize": [128, 256], "source.crop_size": [64, 128],
    "source.crop_height_range": None, "source.pretrained": None, "source.checkpoint_every": 1,
    "source.backbone": "resnet18",  # the same path, a fifth of the compute (a --start_from model stays as it is)
    "warmup.iterations": 2, "warmup.batch_size": 2, "warmup.crop_size": [64, 128], "warmup.source_resize": None,
    "warmup.resize": [128, 256], "warmup.source_crop_height_range": None, "warmup.target_crop_height_range": None,
    "warmup.checkpoint_every": 1, "pseudo.resize": [64, 128], "pseudo_resize": None, "pseudo.batch_size": 2,
    "round.iterations": 2, "round.batch_size": 2, "round.resize": [128, 256], "round.crop_size": [64, 128],
    "round.crop_height_range": None, "round.blur_limit": None, "round.checkpoint_every": 1,
    "evaluate.size": [64, 128], "evaluate.batch_size": 2, "source.num_workers": 0, "round.num_workers": 0,
}  # fmt: skip


def experiment_config(
    path: str | Path, overrides: dict[str, Any] | None = None, smoke: bool = False
) -> ExperimentConfig:
    """The experiment file at `path`, then `SMOKE` when `smoke`, then `overrides` (command-line keys), checked."""
    cfg = load_config(ExperimentConfig, path, fixed=FIXED)
    if smoke:
        cfg = load_config(ExperimentConfig, None, SMOKE, base=cfg, fixed=FIXED)
    return load_config(ExperimentConfig, None, overrides or {}, base=cfg, fixed=FIXED)


def experiment_plan(cfg: ExperimentConfig, device: str | None = None) -> dict[str, Any]:
    """Every stage config in running order, by its folder under ``cfg.out``, computed without running anything."""
    out, dev = Path(cfg.out), device or cfg.device
    target = {"dataset": cfg.target_dataset, "data_root": cfg.target_root, "device": dev}
    plan: dict[str, Any] = {}
    if cfg.start_from is None:
        plan["source_only"] = dataclasses.replace(
            cfg.source, out=str(out / "source_only"), dataset=cfg.source_dataset, data_root=cfg.source_root,
            split=cfg.source_split, seed=cfg.seed, device=dev,
        )  # fmt: skip
        plan["warmup"] = dataclasses.replace(
            cfg.warmup, out=str(out / "warmup"), init_checkpoint=str(out / "source_only" / "model_final.pt"),
            source_dataset=cfg.source_dataset, source_root=cfg.source_root, source_split=cfg.source_split,
            target_split=cfg.target_split, seed=cfg.seed, **target,
        )  # fmt: skip
        student = out / "warmup" / "model_final.pt"
    else:
        student = Path(cfg.start_from)
    teacher = student
    for k in range(1, cfg.rounds + 1):
        rdir, seed = out / f"round_{k}", cfg.seed + k
        resize = cfg.pseudo_resize[k - 1] if cfg.pseudo_resize else cfg.pseudo.resize
        plan[f"round_{k}/pseudo"] = dataclasses.replace(
            cfg.pseudo, out=str(rdir / "pseudo"), checkpoint=str(teacher), split=cfg.target_split,
            alpha=cfg.alpha[k - 1], resize=resize, seed=seed, **target,
        )  # fmt: skip
        plan[f"round_{k}/train"] = dataclasses.replace(
            cfg.round, out=str(rdir / "train"), pseudo_dir=str(rdir / "pseudo"), init_checkpoint=str(student),
            split=cfg.target_split, lr=cfg.round_lr[k - 1], seed=seed, **target,
        )  # fmt: skip
        # docs/method.md §1.1: round k+1's pseudo-labels come from round k's EMA teacher; its student continues
        teacher, student = rdir / "train" / "teacher_final.pt", rdir / "train" / "student_final.pt"
    return plan


def _check_inputs(cfg: ExperimentConfig, smoke: bool) -> SegDataset:
    """Everything that can be checked before a stage starts; returns the validation set. A split with fewer
    images than its manifest lists (an incomplete copy) is refused, or only warned about with `smoke`."""
    found: dict[str, SegDataset] = {}
    for role, (name, root, split) in {
        "source": (cfg.source_dataset, cfg.source_root, cfg.source_split),
        "target": (cfg.target_dataset, cfg.target_root, cfg.target_split),
        "val": (cfg.target_dataset, cfg.target_root, cfg.val_split),
    }.items():
        if role == "source" and cfg.start_from is not None:
            continue
        try:
            ds = SegDataset(name, root, split)
        except InputError as e:
            raise InputError(f"{role}: {e}") from None
        found[role] = ds
        listed = ds.manifest.split(split).count
        if listed is not None and len(ds) < listed:
            what = f"{role}: {root}: {len(ds)} images of {ds.manifest.name}/{split}, its manifest lists {listed}"
            if not smoke:
                raise InputError(f"{what} (an incomplete copy?); --smoke accepts it")
            if distributed.is_main():
                print(f"[run] warning: {what} (--smoke)")
    if "source" in found and found["source"].protocol.classes != ds.protocol.classes:  # before any training
        n_src = found["source"].protocol.num_classes
        raise InputError(f"source_dataset: {cfg.source_dataset} labels {n_src} classes, {cfg.target_dataset} "
                         f"{ds.protocol.num_classes}: one class list is needed")  # fmt: skip
    check_protocols(cfg.protocols, ds.protocol)  # ds: the validation set
    if cfg.start_from is not None:
        arch = checkpoint_architecture(cfg.start_from)  # a missing or foreign file: exit 2 here
        if arch["num_classes"] != ds.protocol.num_classes:
            raise InputError(f"start_from: {cfg.start_from} has {arch['num_classes']} classes, "
                             f"{cfg.target_dataset} {ds.protocol.num_classes}")  # fmt: skip
    return ds


def _status(stage_cfg: Any, done: str) -> str:
    folder = Path(stage_cfg.out)
    if (folder / done).exists():
        return "done, skipped"
    if (folder / "state.pt").exists():
        return "resumes"
    return "runs"


def print_plan(cfg: ExperimentConfig, plan: dict[str, Any]) -> None:
    done = {"source_only": "model_final.pt", "warmup": "model_final.pt"}
    print(f"[run] {cfg.out}: {cfg.source_dataset} -> {cfg.target_dataset}, {cfg.rounds} round(s), "
          f"protocols {', '.join(cfg.protocols)}")  # fmt: skip
    if cfg.start_from is not None:
        print(f"[run]   round 1 starts from {cfg.start_from} (source-only and warm-up skipped)")
    for name, stage in plan.items():
        final = done.get(name) or ("summary.json" if name.endswith("/pseudo") else "teacher_final.pt")
        iters = f", {stage.iterations} iterations" if hasattr(stage, "iterations") else ""
        print(f"[run]   {name:<16} {_status(stage, final):<14} -> {stage.out}{iters}")


def _summary(report: dict, out: Path) -> None:
    """Print the per-class table and each stage's means; save the per-class figure."""
    print(report_table(report).round(1).to_string(na_rep="-"))
    for s in report["stages"]:
        means = ", ".join(f"{p} {v:.2f}" for p, v in s.get("miou_by_protocol", {}).items())
        print(f"[run] {s['name']}: {means}")
    from hias_nb.viz import stage_iou_bars  # local: matplotlib costs a second

    stage_iou_bars(report).savefig(out / "per_class_iou.png", dpi=120, bbox_inches="tight")
    print(f"[run] report: {out / 'report.json'}")


def run_experiment(path: str | Path, overrides: dict[str, Any] | None = None, smoke: bool = False) -> dict:
    """Run (or resume, or find complete) the experiment in the file at `path`; returns its report."""
    cfg = experiment_config(path, overrides, smoke)
    device = resolve_device(cfg.device)
    distributed.init_distributed(device)  # under torchrun every stage runs on all processes; rank 0 writes
    main = distributed.is_main()
    say = print if main else (lambda *a, **k: None)
    val = _check_inputs(cfg, smoke)
    plan = experiment_plan(cfg, device)
    out = Path(cfg.out)
    if main:
        claim_run_folder(out, config_to_dict(cfg), ("out", "device"))  # refuses another experiment
        print_plan(cfg, plan)
    distributed.barrier()
    t0 = time.perf_counter()
    settings = evaluation_settings(config_to_dict(cfg.evaluate))

    def evaluated(name: str, ckpt: Path, cache: Path) -> dict:
        return evaluate_stage(cache, name, ckpt, val, device, cfg.protocols, **settings)

    stages, students = [], []
    if cfg.start_from is None:
        say("[run] stage source_only")
        stages.append(evaluated("source_only", train_source(plan["source_only"]), out / "source_only" / "eval.json"))
        say("[run] stage warmup")
        warm = adversarial_warmup(plan["warmup"]) / "model_final.pt"
        stages.append(evaluated("warmup", warm, out / "warmup" / "eval.json"))
    else:
        stages.append(evaluated("start", Path(cfg.start_from), out / "start_eval.json"))
    for k in range(1, cfg.rounds + 1):
        say(f"[run] stage round_{k}: pseudo-labels (alpha {cfg.alpha[k - 1]}), then self-training")
        generate_pseudo_labels(plan[f"round_{k}/pseudo"])
        run = self_train(plan[f"round_{k}/train"])
        rdir = out / f"round_{k}"
        stages.append(evaluated(f"round_{k}", run / "teacher_final.pt", rdir / "eval_teacher.json"))
        students.append(evaluated(f"round_{k}_student", run / "student_final.pt", rdir / "eval_student.json"))
    report = {"stages": stages + students}
    if main:  # every process holds the same entries (evaluation sums its confusion matrices over all of them)
        report = write_report(
            out / "report.json", check_protocols(cfg.protocols, val.protocol)[0], stages + students,
            time.perf_counter() - t0, {"experiment": config_to_dict(cfg), "file": str(path), "smoke": smoke},
        )  # fmt: skip
        _summary(report, out)
    distributed.barrier()
    return report
