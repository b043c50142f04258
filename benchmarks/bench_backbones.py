"""Training-step cost of candidate toytown backbones at output stride 8, measured side by side in one run.

    python benchmarks/bench_backbones.py [--size 96 192] [--batch 16] [--steps 6] [--amp bf16|off]
        [--backbones resnet10t regnetx_002 ...] [--skip off|on|both] [--channels-last both] [--compile both]

Each candidate is the demo's model (`hias_nb.models.DeepLabV2`: the timm backbone at output stride 8 plus the
summed ASPP head with toytown's rates) doing forward, cross-entropy, backward and an AdamW step on random
inputs, on the threads torch is given (2 on the project's reference machine). Prints the median seconds per
step after one warm-up step, the parameter count and the ratio to the first row. ``--skip both`` measures each
backbone also with the stride-4 skip branch (`models.StrideFourSkip`), the two rows next to each other;
``--channels-last both`` and ``--compile both`` add rows with the model and its inputs in channels-last memory
format and with the model wrapped in ``torch.compile`` (the first steps, which compile, are not counted). The
mIoU each reaches per CPU-second is measured by training runs, not here (docs/toytown.md, "Design measurements").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from hias_nb.models import DeepLabV2
from hias_nb.runner import autocast_context, resolve_amp

CANDIDATES = ("resnet10t", "resnet14t", "resnet18", "regnetx_002", "regnety_002", "mobilenetv3_large_100",
              "efficientnet_lite0", "lcnet_100")  # fmt: skip


def step_seconds(
    backbone: str,
    size: tuple[int, int],
    batch: int,
    steps: int,
    amp: str,
    skip: bool = False,
    channels_last: bool = False,
    compiled: bool = False,
) -> tuple[float, float]:
    """Median seconds of one training step and the parameter count in millions."""
    torch.manual_seed(0)
    model = DeepLabV2(backbone, num_classes=19, aspp_rates=(1, 2, 4, 6), skip=skip)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    forward = torch.compile(model) if compiled else model
    x = torch.randn(batch, 3, *size).contiguous(memory_format=fmt)
    y = torch.randint(0, 19, (batch, *size))
    times = []
    unmeasured = 2 if compiled else 1  # compilation happens in the first steps
    for _ in range(steps + unmeasured):
        t0 = time.perf_counter()
        with autocast_context("cpu", amp):
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[unmeasured:]), sum(p.numel() for p in model.parameters()) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=2, default=(96, 192))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--amp", choices=("bf16", "off"), default="bf16",
                    help="autocast precision (bf16 is fast only with native bf16)")  # fmt: skip
    ap.add_argument("--backbones", nargs="+", default=list(CANDIDATES))
    ap.add_argument("--skip", choices=("off", "on", "both"), default="off", help="the stride-4 skip branch")
    both = {"off": (False,), "on": (True,), "both": (False, True)}
    ap.add_argument("--channels-last", choices=tuple(both), default="off", help="channels-last memory format")
    ap.add_argument("--compile", choices=tuple(both), default="off", help="torch.compile the model")
    args = ap.parse_args()
    precision = resolve_amp("cpu", args.amp)  # what autocast actually runs in on this machine
    print(
        f"threads {torch.get_num_threads()}, size {args.size[0]}x{args.size[1]}, batch {args.batch}, "
        f"amp {args.amp} (runs in {precision})"
    )
    variants = [(s, c, k) for s in both[args.skip] for c in both[args.channels_last] for k in both[args.compile]]
    base = None
    for name in args.backbones:
        for skip, channels_last, compiled in variants:
            row = name + ("+skip" if skip else "") + (" cl" if channels_last else "") + (" compile" if compiled else "")
            try:
                sec, params = step_seconds(
                    name, tuple(args.size), args.batch, args.steps, args.amp, skip, channels_last, compiled
                )
            except Exception as e:  # a candidate that timm cannot build at output stride 8 is reported, not fatal
                print(f"{row:36s} not measurable: {e}")
                continue
            base = base or (sec, row)
            print(f"{row:36s} {sec:6.3f} s/step  {params:5.1f} M params  ×{sec / base[0]:4.2f} of {base[1]}")


if __name__ == "__main__":
    main()
