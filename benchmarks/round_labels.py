"""The kept-pixel test of a toytown design: what do the pixels IAS keeps teach, and what do its errors cost?

    python benchmarks/round_labels.py --demo runs/demo [--labels pseudo true_kept eroded] [--rounds 2]
        [--erode 2] [--device cpu]

From a finished demo's warm-up model (``DEMO/warmup/model_final.pt``), runs the demo's own self-training rounds
(its resolved ``config.yaml``: pseudo-label and round settings, round k's learning rate, seeds) once per label set:

- ``pseudo``: the pseudo-labels as IAS made them (the demo's rounds);
- ``true_kept``: every kept pixel's label replaced by its true label (the kept region as IAS chose it from the
  model's own predictions, round by round; nothing else changes);
- ``eroded``: every kept region eroded by ``--erode`` px (a kept pixel is dropped when another label, or ignore,
  lies within that many pixels): the pseudo-labels without their boundary pixels;
- ``true_all``: the true label on every pixel, kept or not: what the round's machinery can learn in its budget
  at all (the headroom the other label sets are measured against);
- ``drop_rim`` / ``drop_region``: the pseudo-labels with one kind of their errors ignored — a *rim* error is a
  kept pixel labelled c whose true label is not c but which lies within ``--erode`` px of a true pixel of c (a
  dilated thing), a *region* error every other wrong kept pixel (a confused class);
- ``drop_wrong``: both kinds ignored — every wrong kept pixel: set against ``true_kept``, which labels the same
  pixels with their true class, it tells the errors' own cost from what their true labels teach.

``--set round.strong=false`` (repeatable; keys as on ``hias-nb demo``'s command line) changes the round's
settings; such runs go to ``DEMO/round_labels/<labels>+<key>=<value>.../`` so that they never mix with the
demo's own.

Round k+1's pseudo-labels come from round k's teacher and its student continues from round k's student, as in the
demo. Prints the teacher's target-val mIoU after each round and the share of kept pixels the edit changed; writes
into ``DEMO/round_labels/<labels>/round_<k>/`` (resumable: finished rounds are reused). ``pseudo`` reuses the
demo's own finished rounds (``DEMO/round_<k>/``: the same stages with the same settings) and runs only the rest.

On photographs the kept pixels teach the target look of a class to its unconfident pixels, so ``true_kept`` gains
over the warm-up; a toytown on which it does not gain cannot show what self-training does (docs/toytown.md, "Why
the rounds lose").
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hias_nb.config import parse_overrides
from hias_nb.data import SegDataset
from hias_nb.data.datasets import decode_label, read_raw_label
from hias_nb.demo import demo_config, stage_configs
from hias_nb.evaluate import evaluate_stage
from hias_nb.io import read_json, write_json, write_png
from hias_nb.pseudo_label import generate_pseudo_labels
from hias_nb.runs import resolve_device
from hias_nb.self_train import self_train
from hias_nb.train import load_model

IGNORE = 255
NEEDS_TRUTH = {"true_kept", "true_all", "drop_rim", "drop_region", "drop_wrong"}  # label sets that read the truth


def erode(label: np.ndarray, r: int) -> np.ndarray:
    """``[H,W]`` uint8 pseudo-label with every pixel that has another value within `r` px (Chebyshev) ignored."""
    x = torch.from_numpy(label).float()[None, None]
    hi = F.max_pool2d(x, 2 * r + 1, 1, r)
    lo = -F.max_pool2d(-x, 2 * r + 1, 1, r)
    out = label.copy()
    out[((hi != x) | (lo != x))[0, 0].numpy()] = IGNORE
    return out


def rim_errors(pseudo: np.ndarray, truth: np.ndarray, r: int) -> np.ndarray:
    """``[H,W]`` bool: kept pixels whose pseudo-label c is wrong but a true pixel of c lies within `r` px
    (Chebyshev)."""
    kept = pseudo != IGNORE
    n = int(max(truth.max(), pseudo[kept].max(initial=0))) + 1  # channels for every class that occurs
    onehot = F.one_hot(torch.from_numpy(truth.astype(np.int64)), n).permute(2, 0, 1)[None].float()
    near = F.max_pool2d(onehot, 2 * r + 1, 1, r)[0]  # [n, H, W]: a true pixel of each class within r
    c = torch.from_numpy(np.where(kept, pseudo, 0).astype(np.int64))
    near_own = near.gather(0, c[None])[0].bool().numpy()
    return kept & (pseudo != truth) & near_own


def edited_labels(src: Path, dst: Path, mode: str, r: int, truth: dict[str, np.ndarray]) -> float:
    """Copy the pseudo-label folder `src` to `dst` with its labels edited by `mode`; returns the share of kept
    pixels whose label changed (``true_*``) or that were dropped (``eroded``, ``drop_*``), also kept in
    ``dst/edit.json`` so that a resumed run reports it without editing again."""
    if (dst / "edit.json").exists():
        return read_json(dst / "edit.json")["share"]
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("labels"))
    (tmp / "labels").mkdir()
    kept = changed = 0
    for f in sorted((src / "labels").glob("*.png")):
        pl = np.array(Image.open(f))
        m = pl != IGNORE
        if mode == "true_all":
            out = truth[f.stem]
        elif mode == "true_kept":
            out = np.where(m, truth[f.stem], IGNORE).astype(np.uint8)
        elif mode == "drop_wrong":
            out = np.where(m & (pl != truth[f.stem]), IGNORE, pl).astype(np.uint8)
        elif mode in ("drop_rim", "drop_region"):
            rim = rim_errors(pl, truth[f.stem], r)
            wrong = m & (pl != truth[f.stem])
            out = np.where(rim if mode == "drop_rim" else wrong & ~rim, IGNORE, pl).astype(np.uint8)
        else:
            out = erode(pl, r)
        kept += int(m.sum())
        changed += int((out[m] != pl[m]).sum())
        write_png(tmp / "labels" / f.name, out)
    share = changed / max(kept, 1)
    write_json(tmp / "edit.json", {"mode": mode, "erode": r, "share": share})
    tmp.rename(dst)
    return share


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["round.strong=false"]`` -> ``{"round.strong": False}``, read as ``hias-nb demo --round.strong false``."""
    return parse_overrides([f"--{item}" for item in items])


def run(demo: Path, modes: list[str], rounds: int, r: int, device: str, sets: list[str] = ()) -> None:
    overrides = parse_sets(list(sets))
    cfg = demo_config(path=demo / "config.yaml",
                      overrides={**overrides, "out": str(demo), "rounds": rounds, "device": device})  # fmt: skip
    tag = "".join(f"+{s}" for s in sets)
    plan = stage_configs(cfg, device)
    val = SegDataset("toytown", cfg.data_root, "target_val")
    truth = {}
    if NEEDS_TRUTH & set(modes):
        train = SegDataset("toytown", cfg.data_root, "target_train")
        for sample in train.samples:  # the label files only: the images are not needed
            raw = read_raw_label(sample.label, train.manifest.label)
            truth[sample.id] = decode_label(raw, train.manifest, sample.label)
    warm = demo / "warmup" / "model_final.pt"
    base = evaluate_stage(demo / "warmup" / "eval.json", "warmup", load_model(warm, device), val, device)
    print(f"warm-up {base['miou']:.1f}")
    for mode in modes:
        generator = student = warm
        for k in range(1, rounds + 1):
            rdir = demo / "round_labels" / (mode + tag) / f"round_{k}"
            if mode == "pseudo" and not tag and (demo / f"round_{k}" / "eval_teacher.json").exists():
                rdir = demo / f"round_{k}"  # the demo's own round: its stages find their outputs and skip
            raw = generate_pseudo_labels(dataclasses.replace(
                plan[f"round_{k}/pseudo"], out=str(rdir / ("pseudo" if mode == "pseudo" else "pseudo_raw")),
                checkpoint=str(generator)))  # fmt: skip
            pseudo, share = raw, 0.0
            if mode != "pseudo":
                pseudo = rdir / "pseudo"
                share = edited_labels(raw, pseudo, mode, r, truth)
            run_dir = self_train(dataclasses.replace(
                plan[f"round_{k}/train"], out=str(rdir / "train"), pseudo_dir=str(pseudo),
                init_checkpoint=str(student)))  # fmt: skip
            generator, student = run_dir / "teacher_final.pt", run_dir / "student_final.pt"
            entry = evaluate_stage(rdir / "eval_teacher.json", f"{mode} round {k}", load_model(generator, device),
                                   val, device)  # fmt: skip
            print(f"{mode + tag:9s} round {k}: teacher {entry['miou']:.1f} ({entry['miou'] - base['miou']:+.1f} on the "
                  f"warm-up); kept pixels edited {share:.3f}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", required=True, type=Path, help="a finished demo folder (with warmup/model_final.pt)")
    modes = ["pseudo", "true_kept", "eroded", "true_all", "drop_rim", "drop_region", "drop_wrong"]
    p.add_argument("--labels", nargs="+", default=["pseudo", "true_kept"], choices=modes)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a round setting, e.g. "
                   "round.strong=false (repeatable)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--erode", type=int, default=2, help="pixels, for --labels eroded, drop_rim, drop_region")
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    run(a.demo, a.labels, a.rounds, a.erode, resolve_device(a.device), a.set)


if __name__ == "__main__":
    main()
