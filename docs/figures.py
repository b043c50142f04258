"""Redraw the README's pictures (``docs/toytown_samples.png``, ``docs/nb1_*.png`` … ``docs/nb6_*.png``) from a
finished demo run, with the functions the notebooks call, so the pictures follow the benchmark and its defaults:

    python docs/figures.py --run runs/demo [--data data/toytown] [--out docs]

Each picture is the notebook's own figure for that run: 1 the source-only model's per-class IoU on source-val
and target-val; 2 the IAS thresholds of round 1's pseudo-labels (CBST dotted, constant dashed); 3 an HPLA preview
(seed 0); 4 the loss maps of the first pseudo-labelled image under the round's λs (notebook 4's batch of four);
5 every stage's per-class IoU; 6 predictions of the source-only model and the last round's teacher on target-val.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from hias_nb import analysis, selectors, viz, widgets
from hias_nb.hpla import hard_classes
from hias_nb.io import read_json
from hias_nb.pseudo_label import load_pseudo_summary
from hias_nb.self_train import PseudoLabelledTarget
from hias_nb.train import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished `hias-nb demo` folder")
    ap.add_argument("--data", default="data/toytown")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    run, out = Path(args.run), Path(args.out)
    report = read_json(run / "report.json")
    tgt = widgets.run_target(report, args.data)
    pseudo = run / "round_1" / "pseudo"
    summary = load_pseudo_summary(pseudo)
    classes, cfg = list(summary["classes"]), summary["config"]
    round_cfg = widgets.round_config(run, 1)

    def save(fig, name: str) -> None:
        fig.savefig(out / name, dpi=80, bbox_inches="tight")
        print("wrote", out / name)

    save(viz.toytown_grid(args.data, n=3), "toytown_samples.png")

    model = load_model(run / "source_only" / "model_final.pt", "cpu").eval()
    gap = analysis.split_iou_report(model, args.data, ["source_val", "target_val"], "cpu", max_images=200)
    save(viz.stage_iou_bars(gap, title="Notebook 1: the domain gap of the source-only model (mIoU in brackets)"),
         "nb1_domain_gap.png")  # fmt: skip

    hard, _ = hard_classes(np.asarray(summary["class_values"]), round_cfg.num_hard)
    cbst = selectors.cbst_from_histograms(pd.read_parquet(pseudo / "histograms.parquet"), len(classes), cfg["cbst_p"])
    curves = viz.threshold_curves(analysis.threshold_matrix(pseudo), classes, hard=hard.tolist(), cbst=cbst,
                                  constant=cfg["constant_threshold"], instance=cfg["instance"])  # fmt: skip
    save(curves, "nb2_thresholds.png")

    preview = widgets.HPLAPreview(pseudo, tgt.root, tgt.dataset, tgt.train_split, config=round_cfg, seed=0)
    save(preview.panels.figure, "nb3_hpla_preview.png")

    target = PseudoLabelledTarget(tgt.train(), pseudo)
    student, teacher = run / "round_1" / "train" / "student_final.pt", run / "round_1" / "train" / "teacher_final.pt"
    explorer = widgets.LossMapExplorer(student, teacher, target, "cpu", config=round_cfg, indices=(0, 1, 2, 3))
    save(explorer.panels.figure, "nb4_loss_maps.png")

    save(viz.stage_iou_bars(report), "nb5_stages.png")

    checkpoints = analysis.stage_checkpoints(run)
    last = analysis.round_teachers(report)[-1]
    picked = {k: checkpoints[k] for k in ("source_only", last)}
    save(viz.prediction_gallery(picked, tgt.val(), range(2), "cpu"), "nb6_predictions.png")


if __name__ == "__main__":
    main()
