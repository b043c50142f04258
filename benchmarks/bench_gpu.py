"""The paper-scale HIAST step on one GPU: DeepLab-v2-ResNet-101, 512×1024 crops, batch 6, in fp32, bf16 and fp16
autocast, each with and without channels_last and ``torch.compile``; iterations/s and peak memory, and
pseudo-labelling throughput (images/s at 768×1536, batch 2). Every variant is timed in this one run and printed
as a ratio to fp32 eager.

    python benchmarks/bench_gpu.py                       # on a GPU: the paper's sizes
    python benchmarks/bench_gpu.py --device cpu          # no GPU: a small size (64×128, batch 2, resnet18)
    python benchmarks/bench_gpu.py --amps bf16 --compile # fp32 eager and the four bf16 variants only

Without a GPU the figures say nothing about GPU speed; they only show that every variant runs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from hias_nb.evaluate import predict_probs
from hias_nb.models import DeepLabV2, freeze_bn
from hias_nb.runner import autocast_context, make_optimizer, make_scaler
from hias_nb.self_train import SelfTrainConfig, hiast_step


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def _median_seconds(fn, dev: str, repeats: int, warm: int = 3) -> float:
    times = []
    for i in range(warm + repeats):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        if i >= warm:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def variant(args, dev: str, amp: str, channels_last: bool, compiled: bool) -> dict[str, float]:
    """One configuration: seconds per HIAST step, peak memory of it, pseudo-labelling images/s."""
    (h, w), b = args.size, args.batch
    torch.manual_seed(0)
    student = DeepLabV2(args.backbone, 19, aspp_rates=(6, 12, 18, 24)).to(dev)
    freeze_bn(student, "affine")
    teacher = copy.deepcopy(student).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    student, teacher = student.to(memory_format=fmt), teacher.to(memory_format=fmt)
    opt = make_optimizer(student, "adam", 3e-6, 10, 5e-4)
    run_student = torch.compile(student) if compiled else student
    run_teacher = torch.compile(teacher) if compiled else teacher
    blur = (3, 41) if dev.startswith("cuda") else None  # the paper's kernels; scaled to the small CPU size
    cfg = SelfTrainConfig(device=dev, amp=amp, ema_gamma=0.999, crop_size=(h, w), blur_limit=blur)
    scaler = make_scaler(dev, amp)
    gen = torch.Generator(device=dev).manual_seed(0)
    labels = torch.randint(0, 19, (b, h, w), device=dev)
    labels[:, : h // 3] = 255
    batch = {"image": torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, device=dev), "label": labels,
             "provenance": torch.full((b, h, w), 255, device=dev)}  # fmt: skip
    student.train()
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    step = _median_seconds(lambda: hiast_step(run_student, run_teacher, opt, scaler, batch, cfg, gen, dev), dev,
                           args.repeats)  # fmt: skip
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.startswith("cuda") else float("nan")
    ph, pw = args.pseudo_size
    images = torch.randint(0, 256, (2, 3, ph, pw), dtype=torch.uint8, device=dev)
    with autocast_context(dev, amp):  # hias_nb labels in fp32 today: what autocast would give
        label = _median_seconds(lambda: predict_probs(run_teacher, images).argmax(1), dev, args.repeats)
    return {"step_s": step, "it_per_s": 1 / step, "peak_gib": peak, "pseudo_img_per_s": 2 / label}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="include torch.compile variants (default: on CUDA only)")  # fmt: skip
    ap.add_argument("--amps", nargs="+", choices=("off", "bf16", "fp16"), default=["off", "bf16", "fp16"],
                    help="precisions to time (fp32 eager is always timed: the ratios' base)")  # fmt: skip
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    args.backbone = "resnet101" if gpu else "resnet18"
    args.size, args.batch = ((512, 1024), 6) if gpu else ((64, 128), 2)
    args.pseudo_size = (768, 1536) if gpu else (96, 192)
    args.repeats = args.repeats or (10 if gpu else 3)
    compiled = (False, True) if (gpu if args.compile is None else args.compile) else (False,)
    amps = ["off"] + [a for a in args.amps if a != "off"]
    print(f"device {args.device} ({torch.cuda.get_device_name() if gpu else 'CPU'}), {args.backbone}, "
          f"step {args.size[0]}×{args.size[1]} batch {args.batch}, pseudo-labels {args.pseudo_size}, "
          f"median of {args.repeats}")  # fmt: skip
    rows = {}
    for amp in amps:
        for cl in (False, True):
            for comp in compiled:
                if amp == "off" and (cl or comp) and "off" not in args.amps:
                    continue  # only the base
                name = f"{'fp32' if amp == 'off' else amp}{' channels_last' if cl else ''}{' compile' if comp else ''}"
                rows[name] = variant(args, args.device, amp, cl, comp)
                r = rows[name]
                print(f"{name:<28} {r['it_per_s']:7.2f} it/s  peak {r['peak_gib']:6.1f} GiB  "
                      f"pseudo {r['pseudo_img_per_s']:6.2f} img/s", flush=True)  # fmt: skip
    base = rows["fp32"]
    print("\nratios to fp32 eager (higher is faster):")
    for name, r in rows.items():
        print(f"{name:<28} step ×{r['it_per_s'] / base['it_per_s']:5.2f}   pseudo-labels "
              f"×{r['pseudo_img_per_s'] / base['pseudo_img_per_s']:5.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
