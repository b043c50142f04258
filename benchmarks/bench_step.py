"""One HIAST self-training step vs one plain supervised step of the same model, batch and resolution.

HIAST step = weak view → strong view → teacher forward (no grad) → student forward → CE + KLD + entropy +
consistency → backward → Adam step → EMA update. Plain step = weak view → forward → CE → backward → Adam step.
Both are timed alternately in one run (median of ``--repeats``) and the ratio printed; goal ≤ 1.5× (the teacher's
forward is the part that must be paid). HPLA belongs to the data pipeline (``self_train.HPLATarget``, in the
DataLoader workers, like image decoding for both steps), so it is timed on its own per batch and a second ratio
counts it inside the step, as when ``num_workers=0``.

    python benchmarks/bench_step.py [--device cuda] [--backbone resnet101 --size 512 1024 --batch 2 --no-skip]

The model is toytown's unless told otherwise: with the stride-4 skip branch (``--no-skip``: the paper's DeepLab-v2).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from hias_nb import augment
from hias_nb.hpla import HPLA
from hias_nb.models import DeepLabV2, freeze_bn
from hias_nb.runner import autocast_context, make_optimizer, make_scaler
from hias_nb.self_train import SelfTrainConfig, hiast_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--size", type=int, nargs=2, default=(64, 128))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", action=argparse.BooleanOptionalAction, default=True, help="toytown's skip branch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev, (h, w), b = args.device, args.size, args.batch
    rates = (6, 12, 18, 24) if h >= 256 else (1, 2, 4, 6)
    torch.manual_seed(0)
    student = DeepLabV2(args.backbone, 19, aspp_rates=rates, skip=args.skip).to(dev)
    plain = copy.deepcopy(student)
    freeze_bn(student, "affine")
    teacher = copy.deepcopy(student).eval()
    opt_s = make_optimizer(student, "adam", 1e-5, 10, 5e-4)
    opt_p = make_optimizer(plain, "adam", 1e-5, 10, 5e-4)
    images = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8)
    labels = torch.randint(0, 19, (b, h, w))
    labels[:, : h // 3] = 255
    donor = (torch.randint(0, 256, (3, h, w), dtype=torch.uint8), torch.randint(0, 19, (h, w)))
    hpla = HPLA(
        torch.arange(5, 19),
        torch.full((19,), 1 / 14).index_fill_(0, torch.arange(5), 0),
        {c: ["d"] for c in range(19)},
        lambda name: donor,
        generator=torch.Generator().manual_seed(0),
    )
    cfg = SelfTrainConfig(device=dev, amp="bf16", ema_gamma=0.999)
    gen = torch.Generator(device=dev).manual_seed(0)
    h_range = augment.scaled_weak_defaults((h, w)).h_range

    def sync() -> None:
        if dev.startswith("cuda"):
            torch.cuda.synchronize()

    pasted = [hpla(images[i], labels[i]) for i in range(b)]
    p_imgs, p_labs, p_prov = (torch.stack([p[k] for p in pasted]).to(dev) for k in range(3))

    def hpla_batch() -> None:
        for i in range(b):
            hpla(images[i], labels[i])

    scaler = make_scaler(dev, "bf16")
    batch = {"image": p_imgs, "label": p_labs, "provenance": p_prov}

    def step() -> None:
        hiast_step(student, teacher, opt_s, scaler, batch, cfg, gen, dev)

    def plain_step() -> None:
        imgs, labs, _ = augment.weak_view(
            images.to(dev), labels.to(dev), out_size=(h, w), h_range=h_range, ratio=2.0, generator=gen
        )
        with autocast_context(dev, "bf16"):
            logits = plain(augment.normalize(imgs))
        loss = F.cross_entropy(logits.float(), labs, ignore_index=255)
        opt_p.zero_grad(set_to_none=True)
        loss.backward()
        opt_p.step()

    student.train(), plain.train()
    times: dict[str, list[float]] = {"plain": [], "hiast": [], "hpla": []}
    for i in range(args.repeats + 2):
        for name, fn in (("plain", plain_step), ("hiast", step), ("hpla", hpla_batch)):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            if i >= 2:  # warm-up
                times[name].append(time.perf_counter() - t)
    p, s, d = (statistics.median(times[k]) for k in ("plain", "hiast", "hpla"))
    print(f"device={dev} backbone={args.backbone} batch={b} size={h}x{w} threads={args.threads}")
    print(f"plain supervised step: {1000 * p:8.1f} ms (median of {args.repeats})")
    print(f"HIAST step:            {1000 * s:8.1f} ms (median of {args.repeats})")
    print(f"HPLA, per batch:       {1000 * d:8.1f} ms (data pipeline: DataLoader workers)")
    print(f"ratio HIAST / plain:   {s / p:8.2f}x   (goal <= 1.5x)")
    print(f"  with HPLA in-step:   {(s + d) / p:8.2f}x   (num_workers=0)")


if __name__ == "__main__":
    main()
