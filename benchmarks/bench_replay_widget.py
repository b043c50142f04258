"""Time one slider move of notebook 2's replay widget (re-run IAS over the cached histograms + redraw).

Goal: < 0.2 s per move on toytown, no model inference. Needs a finished run (default: the cached quick run):

    python benchmarks/bench_replay_widget.py [--run runs/demo_quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from hias_nb.widgets import ThresholdReplay


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo_quick")
    args = ap.parse_args()
    replay = ThresholdReplay(Path(args.run) / "round_1" / "pseudo")
    times = []
    for slider, values in ((replay.alpha, [0.3 + 0.05 * i for i in range(12)]), (replay.gamma, [6.0, 7.0, 9.0, 10.0])):
        for v in values:
            t = time.perf_counter()
            slider.value = v  # runs the widget's callback: replay + redraw
            times.append(time.perf_counter() - t)
    times = times[1:]  # the first move pays one-off grouping
    print(
        f"slider move incl. redraw: median {1000 * statistics.median(times):.0f} ms, "
        f"max {1000 * max(times):.0f} ms over {len(times)} moves (goal < 200 ms)"
    )


if __name__ == "__main__":
    main()
