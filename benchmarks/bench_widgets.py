"""Time one change of each notebook widget in the kernel: what a control's callback costs (recompute + redraw).

Goal (issue 16): < 0.15 s per change in the kernel, no model inference on a change. Needs a finished demo run
(default: the cached quick run) and its toytown folder:

    python benchmarks/bench_widgets.py [--run runs/demo_quick] [--data data/toytown]

- replay (notebook 2): α and γ slider moves of ``ThresholdReplay`` (IAS re-run over the cached histograms);
- HPLA preview (notebook 3): "draw again" (a new recipient, donors and strong view);
- loss maps (notebook 4): term checkboxes and the image slider of ``LossMapExplorer``, each setting drawn (its
  cache emptied before every move) and a return to one already seen (cached); the maps are computed once, at start;
- confusion picker (notebook 5): stage and "minus" choices, each drawn (cache emptied before every move), on
  confusion matrices of the run's stages over 16 images.
Each line prints the median and max over the moves; the first move of each widget is left out (one-off work).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from hias_nb import analysis, widgets
from hias_nb.self_train import PseudoLabelledTarget

GOAL_MS = 150


def timed(moves: list[Callable[[], object]]) -> list[float]:
    out = []
    for move in moves:
        t = time.perf_counter()
        move()
        out.append(time.perf_counter() - t)
    return out[1:]


def report(name: str, times: list[float]) -> None:
    med, worst = 1000 * statistics.median(times), 1000 * max(times)
    verdict = "ok" if med < GOAL_MS else "MISSED"
    print(f"{name:<28} median {med:6.0f} ms   max {worst:6.0f} ms   over {len(times)} changes", end="")
    print(f"  ({verdict}, goal < {GOAL_MS})")


def setter(control, value, cache: dict | None = None) -> Callable[[], None]:
    def move() -> None:
        if cache is not None:
            cache.clear()  # a choice not seen before: drawn, not taken from the widget's cache
        control.value = value  # runs the widget's observer: recompute + redraw

    return move


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo_quick")
    ap.add_argument("--data", default="data/toytown")
    args = ap.parse_args()
    run = Path(args.run)
    pseudo = run / "round_1" / "pseudo"
    cfg = widgets.round_config(run, 1)

    replay = widgets.ThresholdReplay(pseudo)
    moves = [setter(replay.alpha, 0.3 + 0.05 * i) for i in range(12)]
    moves += [setter(replay.gamma, v) for v in (6.0, 7.0, 9.0, 10.0)]
    report("replay: α / γ slider", timed(moves))

    preview = widgets.HPLAPreview(pseudo, args.data, config=cfg, seed=0)
    report("HPLA preview: draw again", timed([preview.draw] * 9))

    target = PseudoLabelledTarget(widgets.RunTarget("toytown", args.data, "target_train", "target_val").train(), pseudo)
    student, teacher = run / "round_1" / "train" / "student_final.pt", run / "round_1" / "train" / "teacher_final.pt"
    explorer = widgets.LossMapExplorer(student, teacher, target, "cpu", config=cfg)
    boxes = list(explorer.checks.values())
    first = [setter(boxes[i % len(boxes)], bool(i // len(boxes) % 2), explorer._pngs) for i in range(2 * len(boxes))]
    first += [setter(explorer.index, i, explorer._pngs) for i in (1, 2, 3)]
    report("loss maps: new setting", timed(first))
    report("loss maps: setting seen", timed([setter(explorer.index, i) for i in (0, 1, 2, 3, 0, 1)]))

    names = ("source_only", "warmup", "round_1")
    stages = {k: v for k, v in analysis.stage_checkpoints(run).items() if k in names}
    matrices = analysis.stage_confusions(stages, target.images, "cpu", max_images=16)  # real ones: sparse
    picker = widgets.ConfusionPicker(matrices, replay.classes)
    moves = [setter(picker.stage, s, picker._pngs) for s in ("source_only", "warmup", "round_1", "source_only")]
    moves += [setter(picker.minus, m, picker._pngs) for m in ("warmup", "(none)", "source_only")]
    report("confusion picker: new choice", timed(moves))


if __name__ == "__main__":
    main()
