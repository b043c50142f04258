"""Benchmark of hias_nb.selectors (run on demand, not a test).

1. IAS against the reference computation as docs/method.md §2.5 describes it (Python lists built with ``extend`` of
   float16 scalars, ``np.quantile`` per class, per-pixel threshold lookup through ``np.apply_along_axis`` with a
   Python lambda, built-in ``sum`` for the counts), on identical inputs, one thread. Thresholds and labels must
   be identical; both times and their ratio are printed from the same run.
2. ``replay_ias`` on a synthetic target set (default 1000 images of 64x128, like toytown): preparation once,
   then the per-call time of a slider redraw, for both instance modes; thresholds checked against IAS.

    .venv/bin/python benchmarks/bench_selectors.py                      # 2x256x512, 10 instances
    .venv/bin/python benchmarks/bench_selectors.py --size 768 1536 --instances 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from hias_nb.selectors import IAS, ConfidenceHistogram, confidence_histograms, replay_ias


def synthetic(rng: torch.Generator, batch: int, classes: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Max softmax and argmax of random logits: conf float32 [B,H,W], pred int64 [B,H,W]."""
    logits = 3.0 * torch.randn(batch, classes, h, w, generator=rng)
    logits[:, 0] += 1.5  # uneven class frequencies; the last class is never predicted
    logits[:, -1] -= 100.0
    conf, pred = logits.softmax(1).max(1)
    return conf.contiguous(), pred.contiguous()


def reference_instance(theta, conf, pred, num_classes, alpha, beta, gamma):
    """One instance as the published code does it (docs/method.md §2.2 and 2.5); conf float32, pred int64 numpy."""
    sample_lists = [[theta[c]] for c in range(num_classes)]
    for b in range(conf.shape[0]):
        conf16 = conf[b].astype(np.float16)
        for c in range(num_classes):
            sample_lists[c].extend(conf16[pred[b] == c])
    psi = np.zeros(num_classes, dtype=np.float32)
    for c in range(num_classes):
        psi[c] = np.quantile(sample_lists[c], 1 - alpha * theta[c] ** gamma)
    theta = beta * theta + (1 - beta) * psi
    theta[theta >= 1] = 0.999
    labels, counts = [], []
    for b in range(conf.shape[0]):
        thr = np.apply_along_axis(lambda px: theta[px[0]], 0, pred[b][np.newaxis])  # per-pixel Python call
        lab = np.where(conf[b] < thr, 255, pred[b])
        labels.append(lab)
        counts.append([sum(sum(lab == c)) for c in range(num_classes)])
    return theta, np.stack(labels), counts


def bench_ias(args: argparse.Namespace) -> None:
    h, w = args.size
    rng = torch.Generator().manual_seed(args.seed)
    data = [synthetic(rng, args.batch, args.classes, h, w) for _ in range(args.instances)]
    alpha, beta, gamma = args.alpha, 0.9, 8.0

    ias = IAS(args.classes, alpha=alpha, beta=beta, gamma=gamma)
    t0 = time.perf_counter()
    fast = [ias.select(conf, pred) for conf, pred in data]
    ias.history  # noqa: B018 (built lazily; included in the time)
    t_fast = time.perf_counter() - t0

    theta = np.full(args.classes, 0.9)
    ref_theta, ref_labels = [], []
    t0 = time.perf_counter()
    for conf, pred in data:
        theta, labels, _ = reference_instance(theta, conf.numpy(), pred.numpy(), args.classes, alpha, beta, gamma)
        ref_theta.append(theta.copy())
        ref_labels.append(labels)
    t_ref = time.perf_counter() - t0

    got = ias.history.pivot(index="instance", columns="class", values="threshold").to_numpy()
    assert np.array_equal(got, np.stack(ref_theta)), "thresholds differ"
    for f, r in zip(fast, ref_labels, strict=True):
        assert np.array_equal(f.numpy(), r), "labels differ"
    n = args.instances
    print(f"IAS {n} instances of {args.batch}x{h}x{w}, C={args.classes}, 1 thread: thresholds and labels identical")
    print(f"  reference (docs/method.md §2.5): {t_ref:8.3f} s  ({t_ref / n * 1e3:8.1f} ms/instance)")
    print(f"  hias_nb IAS         : {t_fast:8.3f} s  ({t_fast / n * 1e3:8.1f} ms/instance)")
    print(f"  speed-up            : {t_ref / t_fast:8.1f} x")


def bench_replay(args: argparse.Namespace) -> None:
    rng = torch.Generator().manual_seed(args.seed + 1)
    n, c, bs = args.replay_images, args.classes, 2
    parts, stream = [], []
    for s in range(0, n, bs):
        conf, pred = synthetic(rng, min(bs, n - s), c, 64, 128)
        stream.append((conf, pred))
        parts.append(confidence_histograms(conf, pred, first_image=s))
    rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    print(f"replay: {n} images of 64x128, C={c}: {len(rows['count'])} histogram rows")

    t0 = time.perf_counter()
    table = ConfidenceHistogram(rows, c)
    print(f"  ConfidenceHistogram(rows)          : {(time.perf_counter() - t0) * 1e3:7.1f} ms (once)")
    for instance in ("batch", "image"):
        ias = IAS(c, alpha=0.5, instance=instance)
        for conf, pred in stream:
            ias.select(conf, pred)
        expected = ias.history.pivot(index="instance", columns="class", values="threshold").to_numpy()
        t0 = time.perf_counter()
        thresholds, _ = replay_ias(table, c, 0.5, 0.9, 8.0, instance=instance, batch_size=bs)
        t_first = time.perf_counter() - t0
        assert np.array_equal(thresholds, expected), f"replay differs from IAS ({instance})"
        times = []
        for alpha in (0.2, 0.3, 0.4, 0.5, 0.6):
            t0 = time.perf_counter()
            replay_ias(table, c, alpha, 0.9, 8.0, instance=instance, batch_size=bs)
            times.append(time.perf_counter() - t0)
        print(
            f"  replay_ias instance={instance:5s}: first {t_first * 1e3:6.1f} ms (grouping), then median "
            f"{np.median(times) * 1e3:6.1f} ms per call; identical to IAS"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--instances", type=int, default=10)
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--replay-images", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-reference", action="store_true", help="only the replay benchmark")
    args = p.parse_args()
    torch.set_num_threads(1)
    if not args.skip_reference:
        bench_ias(args)
    bench_replay(args)


if __name__ == "__main__":
    main()
