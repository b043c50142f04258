"""The toytown ablation of HIAST (``hias-nb ablation``): selectors, components, and an equal-compute control.

For each seed the demo's source-only model and its adversarial warm-up are trained once; every variant then runs
the demo's self-training rounds from them with one setting changed:

- ``full``: the method as ``hias-nb demo`` runs it (warm-up, IAS, HPLA, region regularisation, consistency);
- ``no_warmup``: round 1 starts from the BN-recalibrated source model instead of the warm-up;
- ``cbst`` / ``constant`` / ``none``: another pseudo-label selector (docs/method.md §2.3);
- ``no_hpla``, ``no_rar`` (λc = λi = 0), ``no_consistency`` (λcst = 0): one component removed;
- ``no_strong``: the student sees the weak view instead of the CCA strong view;
- ``control``: no adaptation — the source model trained on source data for as many extra iterations as the
  warm-up and all rounds take together (and ``control_adabn``: the same with target BatchNorm statistics), so
  that a gain of self-training is not confused with a gain of more training (docs/toytown.md).

Settings: the demo's (`hias_nb.demo.DemoConfig`): ``--config FILE`` and ``--key value`` overrides apply to every
variant and the control; ``OUT/config.yaml`` records them. Results go to a long CSV, one row per (variant, seed,
stage): ``variant, seed, stage, miou``, one IoU column per class and the label-free model-selection scores
(``label_free_entropy``, ``label_free_coverage@0.9``, ``label_free_snd``: `hias_nb.model_selection`); the
notebooks read it. Beside it, ``label_free_ranks.csv``: each score's rank correlation with mIoU over every
checkpoint the ablation evaluated (the oracle, trained on target labels, left out; each seed's shared stages once)
and what picking a checkpoint by it costs (`hias_nb.model_selection.rank_correlations`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from hias_nb.analysis import last_round
from hias_nb.data import SegDataset
from hias_nb.demo import RESUME_FREE, DemoConfig, adabn_checkpoint, demo_config, resolved_config, run_demo
from hias_nb.errors import InputError
from hias_nb.evaluate import evaluate_stage
from hias_nb.io import atomic_path
from hias_nb.model_selection import rank_correlations
from hias_nb.runs import claim_run_folder, resolve_device
from hias_nb.train import train_source

__all__ = ["VARIANTS", "run_ablation", "ablation_table", "checkpoints"]

# Each variant is the demo with these settings changed (keys as on the demo's command line).
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "cbst": {"policy": "cbst"},
    "constant": {"policy": "constant"},
    "none": {"policy": "none"},
    "no_hpla": {"hpla": False},
    "no_rar": {"lambda_kld": 0.0, "lambda_ent": 0.0},
    "no_consistency": {"lambda_cst": 0.0},
    "no_strong": {"strong": False},
    "no_warmup": {"warmup.iterations": 0},
}


def _share_source(src: Path, dst: Path) -> None:
    """Give a variant the seed's finished source-only and warm-up stages: hard links (no copy, no retraining).

    Each run's ``config.yaml`` is rewritten so that its paths name the variant's own folder (the warm-up's
    ``init_checkpoint`` becomes the variant's ``source_only`` model, a link to the same file): the demo's
    same-config check then accepts the shared run as the one it would have trained."""

    def link_or_rebase(a: str, b: str) -> None:
        if Path(a).name != "config.yaml":
            os.link(a, b)
            return
        cfg = yaml.safe_load(Path(a).read_text()) or {}
        for k, v in cfg.items():
            if isinstance(v, str) and Path(v).is_relative_to(src):
                cfg[k] = str(dst / Path(v).relative_to(src))
        Path(b).write_text(yaml.safe_dump(cfg, sort_keys=False))

    for stage in ("source_only", "source_only_adabn", "warmup"):
        if (src / stage).exists() and not (dst / stage).exists():
            tmp = dst / f".{stage}.partial"  # renamed into place when complete: an interrupted share is redone
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src / stage, tmp, copy_function=link_or_rebase)
            tmp.rename(dst / stage)


def _control(seed_dir: Path, cfg: DemoConfig, device: str) -> list[dict]:
    """Equal-compute control: continue source training (the demo's source settings, no lr warm-up) for the
    warm-up's and the rounds' iterations, then evaluate."""
    out = seed_dir / "control"
    ckpt = train_source(
        dataclasses.replace(
            cfg.source,
            out=str(out / "train"),
            dataset="toytown",
            data_root=cfg.data_root,
            split="source_train",
            iterations=cfg.warmup.iterations + cfg.rounds * cfg.round.iterations,
            seed=cfg.seed + 100,
            device=device,
            warmup=0,
            init_checkpoint=str(seed_dir / "full" / "source_only" / "model_final.pt"),
        )
    )
    val = SegDataset("toytown", cfg.data_root, "target_val")
    entries = [evaluate_stage(out / "eval.json", "control", ckpt, val, device)]
    adabn = adabn_checkpoint(ckpt, out / "adabn.pt", cfg.data_root, cfg.adabn_batch_size, device, cfg.adabn_images)
    entries.append(evaluate_stage(out / "eval_adabn.json", "control_adabn", adabn, val, device))
    return entries


def run_ablation(
    out: str | Path = "runs/ablation",
    seeds: tuple[int, ...] = (0, 1),
    variants: tuple[str, ...] = tuple(VARIANTS),
    csv: str | Path | None = None,
    quick: bool = False,
    device: str | None = None,
    data_root: str | None = None,
    control: bool = True,
    config: str | Path | None = None,
    **overrides: Any,
) -> pd.DataFrame:
    """Run every variant for every seed (finished parts are reused) and write the long CSV; returns it.

    `config` (a demo YAML file) and `overrides` (keys as on the demo's command line; `device` and `data_root`
    too, where given) apply to every variant and the control (e.g. shorter runs in tests)."""
    out = Path(out)
    if "seed" in overrides:  # each variant runs once per seed of `seeds`; a fixed seed would silently be dropped
        raise InputError(f"seed: the ablation runs every seed of --seeds ({list(seeds)}); give --seeds instead")
    given = {k: v for k, v in (("device", device), ("data_root", data_root)) if v is not None}
    base = demo_config(quick, config, {**overrides, **given})  # checks every key once, before anything runs
    overrides = {**overrides, **given, "device": resolve_device(base.device)}
    demo = {k: v for k, v in resolved_config(base).items() if k not in ("out", "seed")}  # per variant and seed
    ablation = {"seeds": list(seeds), "variants": {v: VARIANTS[v] for v in variants}, "control": control}
    # seeds, variants and the control may be added to a finished ablation; the demo settings may not change
    claim_run_folder(out, {**ablation, "quick": quick, "demo": demo}, ("seeds", "variants", "control", "demo.device"))
    rows: list[dict] = []
    for seed in seeds:
        seed_dir = out / f"seed_{seed}"
        for name in variants:
            print(f"[ablation] seed {seed}, variant {name}")
            report = _variant(name, seed_dir, quick, config, {**overrides, "seed": seed})
            rows += [_row(name, seed, s) for s in report["stages"]]
        if control:
            cfg = demo_config(quick, config, {**overrides, "seed": seed})
            rows += [_row("control", seed, s) for s in _control(seed_dir, cfg, overrides["device"])]
    df = pd.DataFrame(rows)
    csv = Path(csv) if csv else out / "ablation.csv"
    with atomic_path(csv) as tmp:
        # IoU to 0.01; label-free scores to 6 decimals: rounded like the IoU they tie (0.95, 0.95, ...) and a
        # score's ranking read back from the CSV would differ from the one printed below
        scores = [c for c in df.columns if c.startswith("label_free_")]
        df.round(2).assign(**{c: df[c].round(6) for c in scores}).to_csv(tmp, index=False)
    ranks = rank_correlations(checkpoints(df))
    with atomic_path(csv.with_name("label_free_ranks.csv")) as tmp:
        ranks.to_csv(tmp, index=False, float_format="%.3f")
    print(ablation_table(df).round(1).to_string())
    print("label-free scores against mIoU (Spearman over checkpoints; regret: mIoU lost picking by the score):")
    print(ranks.round(3).to_string(index=False))
    return df


def _variant(name: str, seed_dir: Path, quick: bool, config: str | Path | None, overrides: dict) -> dict:
    """One variant's demo in ``seed_dir/name``; every variant but ``full`` starts from the full run's shared
    source-only and warm-up stages (the full run is made first where missing) and trains no oracle."""
    full, out = seed_dir / "full", seed_dir / name
    if name == "full":
        return run_demo(quick, config, **{**overrides, "out": str(out)})
    if not (full / "round_1").exists():
        run_demo(quick, config, **{**overrides, "out": str(full)})
    variant = {**overrides, "oracle": False, "out": str(out), **VARIANTS[name]}
    # the folder is the variant's demo run before the shared stages are linked into it (files without a
    # config.yaml would be a folder that is not a run, which the demo refuses)
    claim_run_folder(out, resolved_config(demo_config(quick, config, variant)), RESUME_FREE)
    _share_source(full, out)
    return run_demo(quick, config, **variant)


def _row(variant: str, seed: int, stage: dict) -> dict:
    scores = {f"label_free_{k}": v for k, v in stage.get("label_free", {}).items()}  # hias_nb.model_selection
    return {"variant": variant, "seed": seed, "stage": stage["name"], "miou": stage["miou"], **stage["per_class"],
            **scores}  # fmt: skip


def checkpoints(df: pd.DataFrame) -> pd.DataFrame:
    """The ablation's rows as distinct checkpoints a label-free score could pick from: every seed's shared stages
    (source-only, AdaBN, warm-up) once, every variant's rounds and the control; not the oracle (target labels)."""
    shared = df["stage"].isin(["source_only", "source_only_adabn", "warmup"])
    keep = ~df["stage"].eq("oracle") & ~(shared & df.duplicated(["seed", "stage"]))
    return df[keep].reset_index(drop=True)


def ablation_table(df: pd.DataFrame) -> pd.DataFrame:
    """mIoU of each variant's final stage (last round; the control's own stages), mean ± std over seeds."""
    finals = []
    for (variant, seed), g in df.groupby(["variant", "seed"], sort=False):
        final = last_round(g)
        pick = final if len(final) else g
        finals.append(pick.assign(variant=variant, seed=seed))
    f = pd.concat(finals)
    table = f.groupby(["variant", "stage"], sort=False)["miou"].agg(["mean", "std", "count"])
    # every variant of a seed shares its source-only and warm-up stages: count each (seed, stage) once
    shared = ["source_only", "source_only_adabn", "warmup", "oracle"]
    base = df[df["stage"].isin(shared)].drop_duplicates(["seed", "stage"])
    ref = base.groupby("stage", sort=False)["miou"].agg(["mean", "std", "count"])
    ref.index = pd.MultiIndex.from_tuples([("reference", s) for s in ref.index], names=["variant", "stage"])
    return pd.concat([ref, table])
