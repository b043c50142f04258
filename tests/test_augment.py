"""Tests for hias_nb.augment: weak view geometry, CCA operations (albumentations 1.0.3 semantics), photometric."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hias_nb.augment import (
    CCA_OPS,
    CCAOp,
    StrongViewParams,
    WeakViewParams,
    apply_strong,
    apply_weak,
    blur_sigma,
    crop_heights,
    gaussian_blur,
    make_views,
    normalize,
    opencv_fixed_point_kernel,
    opencv_gaussian_kernel,
    photometric,
    rgb_to_gray,
    sample_blur_ksize,
    sample_strong_params,
    sample_weak_params,
    scaled_blur_limit,
    scaled_weak_defaults,
    some_strong,
    strong_view,
    weak_view,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=gen(seed))


# ------------------------------------------------------------------------------------------------ weak view


def test_scaled_weak_defaults_cityscapes_row():
    cfg = scaled_weak_defaults((64, 128))
    assert cfg.out_size == (64, 128) and cfg.h_range == (43, 125) and cfg.ratio == 2.0
    full = scaled_weak_defaults((512, 1024))
    assert full.h_range == (341, 1000)


def test_weak_hand_computed_crop_and_flip():
    # 4x6 image, crop 2x4 at (1, 1) of the flipped image, output = crop size -> a pure slice.
    img = torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(1, 3, 4, 6)
    lab = torch.arange(24).reshape(1, 4, 6)
    p = WeakViewParams(
        flip=torch.tensor([True]),
        top=torch.tensor([1]),
        left=torch.tensor([1]),
        height=torch.tensor([2]),
        width=torch.tensor([4]),
        in_size=(4, 6),
        out_size=(2, 4),
    )
    out, (lab_out,) = apply_weak(img, [lab], p)
    # flipped row r is [r*6+5, r*6+4, ..., r*6]; columns 1..4 of it are r*6+4 .. r*6+1
    assert lab_out.tolist() == [[[10, 9, 8, 7], [16, 15, 14, 13]]]
    assert torch.equal(out[0, 0], lab_out[0].float())
    assert torch.equal(out[0, 2], lab_out[0].float() + 48)
    # Upscaling x2 with nearest: every source pixel repeated twice in both directions.
    _, (up,) = apply_weak(img, [lab], p, out_size=(4, 8))
    assert up[0].tolist() == [[10, 10, 9, 9, 8, 8, 7, 7]] * 2 + [[16, 16, 15, 15, 14, 14, 13, 13]] * 2


def reference_weak(img: torch.Tensor, maps: list[torch.Tensor], p: WeakViewParams, i: int):
    """Slow per-image reference: flip, slice the crop, F.interpolate (bilinear / nearest)."""
    x = img[i : i + 1].float()
    ms = [m[i : i + 1] for m in maps]
    if p.flip[i]:
        x = torch.flip(x, dims=[-1])
        ms = [torch.flip(m, dims=[-1]) for m in ms]
    t, l_, h, w = int(p.top[i]), int(p.left[i]), int(p.height[i]), int(p.width[i])
    x = x[:, :, t : t + h, l_ : l_ + w]
    ms = [m[:, t : t + h, l_ : l_ + w] for m in ms]
    x = F.interpolate(x, size=p.out_size, mode="bilinear", align_corners=False)
    ms = [F.interpolate(m[:, None].float(), size=p.out_size, mode="nearest")[:, 0].long() for m in ms]
    return x[0], [m[0] for m in ms]


@pytest.mark.parametrize("out_size", [(16, 32), (9, 14)])
def test_weak_matches_per_image_reference(out_size):
    B, H, W = 6, 20, 36
    img = torch.rand(B, 3, H, W, generator=gen(1)) * 255
    label = torch.randint(0, 19, (B, H, W), generator=gen(2))
    label[:, :3] = 255
    prov = torch.where(torch.rand(B, H, W, generator=gen(3)) < 0.3, label, torch.full_like(label, 255))
    # h range spans both down- and up-scaling of the crop, with some crops clamped to the image.
    p = sample_weak_params(B, (H, W), out_size, (6, 25), 1.5, gen(4))
    out, (lab_out, prov_out) = apply_weak(img, [label, prov], p)
    assert out.dtype == torch.float32 and lab_out.dtype == torch.int64
    for i in range(B):
        ref_img, (ref_lab, ref_prov) = reference_weak(img, [label, prov], p, i)
        # Same float32 formula as F.interpolate, blended in a different order: |diff| ~ 1e-5 on a 0..255 scale.
        torch.testing.assert_close(out[i], ref_img, atol=1e-3, rtol=0)
        assert torch.equal(lab_out[i], ref_lab)
        assert torch.equal(prov_out[i], ref_prov)
    # The provenance map got the label's exact transform: equal wherever it is defined.
    defined = prov_out != 255
    assert torch.equal(prov_out[defined], lab_out[defined])
    assert set(lab_out.unique().tolist()) <= set(label.unique().tolist())


def test_weak_params_within_bounds_many_draws():
    H, W = 40, 70
    p = sample_weak_params(4000, (H, W), (8, 16), (10, 38), 1.7, gen(5))
    h, w, t, l_ = p.height, p.width, p.top, p.left
    assert torch.equal(w, torch.tensor([int(x * 1.7) for x in h.tolist()]))
    assert (t >= 0).all() and (t + h <= H).all() and (l_ >= 0).all() and (l_ + w <= W).all()
    # h fits iff int(h * 1.7) <= 70 -> h <= 41; the whole range [10, 38] fits so no clamping happens.
    assert set(h.tolist()) == set(range(10, 39))
    assert abs(p.flip.float().mean().item() - 0.5) < 0.04
    # top = int((H - h) * u): for the smallest crop, both extremes of the offsets are reached.
    assert t.min() == 0 and (t + h).max() >= H - 1


def test_weak_oversized_crop_is_clamped():
    # Cityscapes-sized h range on a 10x12 image with r = 2: the largest fitting crop is h = 6, w = 12.
    p = sample_weak_params(200, (10, 12), (8, 16), (5, 40), 2.0, gen(6))
    assert p.height.max() == 6 and set(p.height.tolist()) <= {5, 6}
    assert (p.width == 2 * p.height).all() and (p.left + p.width <= 12).all() and (p.top + p.height <= 10).all()
    img = rand_images(200, 10, 12)
    out, _ = apply_weak(img, [], p)
    assert out.shape == (200, 3, 8, 16) and out.dtype == torch.uint8


def test_make_views_is_weak_then_strong_on_one_generator():
    img = rand_images(4, 32, 64, seed=3)
    lab = torch.randint(0, 5, (4, 32, 64), generator=gen(4))
    prov = torch.where(lab == 2, lab, torch.full_like(lab, 255))
    v = make_views(img, lab, prov, generator=gen(5), crop_scale=(0.5, 1.0), crop_ratio=2.0)
    # The same draws, spelled out: weak view from the generator, then CCA on it with the scaled blur range.
    g = gen(5)
    weak, wl, (wp,) = weak_view(img, lab, (prov,), out_size=(32, 64), h_range=(16, 32), ratio=2.0, generator=g)
    strong, ops = strong_view(weak, g, blur_limit=(3, 3))
    assert torch.equal(v.weak, weak) and torch.equal(v.strong, strong) and v.strong_ops == ops
    assert torch.equal(v.label, wl) and torch.equal(v.provenance, wp)
    # The provenance moves exactly like the label (it is a masked copy of it here).
    assert torch.equal(v.provenance, torch.where(v.label == 2, v.label, torch.full_like(v.label, 255)))


def test_make_views_options():
    img = rand_images(2, 20, 40, seed=6)
    lab = torch.randint(0, 5, (2, 20, 40), generator=gen(7))
    v = make_views(img, lab, generator=gen(8), strong=False, crop_size=(10, 20), crop_scale=(0.6, 1.0), crop_ratio=2.0)
    assert v.strong is v.weak and v.weak.shape == (2, 3, 10, 20) and v.strong_ops == [[], []]
    assert (v.provenance == 255).all() and v.provenance.shape == (2, 10, 20)
    assert crop_heights((7, 9), (0.1, 0.2), 100) == (7, 9) and crop_heights(None, (0.5, 1.0), 20) == (10, 20)


def test_weak_view_convenience_deterministic_and_uint8():
    img = rand_images(5, 24, 48)
    lab = torch.randint(0, 5, (5, 24, 48), generator=gen(7))
    kw = dict(out_size=(12, 24), h_range=(8, 23), ratio=2.0)
    a = weak_view(img, lab, (lab.clone(),), generator=gen(8), **kw)
    b = weak_view(img, lab, (lab.clone(),), generator=gen(8), **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2][0], a[1])
    assert a[0].dtype == torch.uint8 and a[0].shape == (5, 3, 12, 24) and a[1].shape == (5, 12, 24)
    # uint8 output = rounded float output of the same params.
    p = sample_weak_params(5, (24, 48), (12, 24), (8, 23), 2.0, gen(9))
    out_u8, _ = apply_weak(img, [], p)
    out_f, _ = apply_weak(img.float(), [], p)
    assert torch.equal(out_u8, out_f.round().clamp(0, 255).to(torch.uint8))


# ------------------------------------------------------------------------------------------------ CCA ops


def one_op(name: str, params: dict, batch: int = 1) -> StrongViewParams:
    """Params where only `name` fires (the two other drawn ops are not fired)."""
    others = [n for n in CCA_OPS if n != name][:2]
    ops = [CCAOp(name, True, params), CCAOp(others[0], False, {}), CCAOp(others[1], False, {})]
    return StrongViewParams([list(ops) for _ in range(batch)])


def np_img(x: torch.Tensor) -> np.ndarray:
    """[1,3,H,W] -> uint8 HxWx3 (numpy/OpenCV layout)."""
    return x[0].permute(1, 2, 0).numpy().astype(np.uint8)


def to_t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.uint8)).permute(2, 0, 1)[None]


def test_posterize_solarize_exact():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()
    a = np_img(x)
    assert torch.equal(apply_strong(x, one_op("posterize", {"bits": 4})), to_t(a & 0xF0))
    sol = np.where(a < 128, a, 255 - a)
    assert torch.equal(apply_strong(x, one_op("solarize", {"threshold": 128})), to_t(sol))
    assert apply_strong(x, one_op("solarize", {}))[0, 0, 8, 0].item() == 127  # 128 -> 127, 127 -> 127


@pytest.mark.parametrize("alpha", [1.0, 1.37, 2.5, 3.999])
def test_random_contrast_is_pure_gain(alpha):
    x = rand_images(1, 8, 9, seed=11)
    lut = np.clip(np.arange(256, dtype=np.float32) * np.float32(alpha), 0, 255).astype(np.uint8)
    assert torch.equal(apply_strong(x, one_op("random_contrast", {"alpha": alpha})), to_t(lut[np_img(x)]))


@pytest.mark.parametrize("beta", [-0.5, -0.123, 0.0, 0.31, 0.5])
def test_random_brightness_adds_beta_255(beta):
    x = rand_images(1, 8, 9, seed=12)
    lut = np.arange(256, dtype=np.float32) + np.float32(beta * 255)
    lut = np.clip(lut, 0, 255).astype(np.uint8)
    assert torch.equal(apply_strong(x, one_op("random_brightness", {"beta": beta})), to_t(lut[np_img(x)]))


def test_to_gray_opencv_weights():
    x = rand_images(1, 10, 10, seed=13)
    a = np_img(x).astype(np.int64)
    grey = (a[..., 0] * 9798 + a[..., 1] * 19235 + a[..., 2] * 3735 + 16384) >> 15
    out = apply_strong(x, one_op("to_gray", {}))
    assert torch.equal(out, to_t(np.repeat(grey[..., None], 3, axis=2)))
    exact = a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114
    assert np.abs(grey - exact).max() <= 0.5 + 1e-3  # the fixed-point weights round like the float formula
    assert torch.equal(rgb_to_gray(torch.tensor([[[[255.0]], [[255.0]], [[255.0]]]])), torch.tensor([[[[255.0]]]]))


def test_equalize_hand_computed_lut():
    r = np.array([[0, 0, 1], [1, 1, 3]])  # hist 0:2 1:3 3:1, P = 6 -> scale 255/4 = 63.75
    g = np.array([[5, 7, 9], [5, 7, 9]])  # hist 5:2 7:2 9:2 -> scale 255/4: 7 -> round(127.5) = 128 (half even)
    b = np.full((2, 3), 42)  # constant channel stays as it is
    x = to_t(np.stack([r, g, b], axis=-1))
    out = apply_strong(x, one_op("equalize", {}))
    assert out[0, 0].tolist() == [[0, 0, 191], [191, 191, 255]]  # round(3*63.75)=191, round(4*63.75)=255
    assert out[0, 1].tolist() == [[0, 128, 255], [0, 128, 255]]
    assert out[0, 2].tolist() == [[42] * 3] * 2


def test_equalize_batched_equals_per_image():
    x = rand_images(4, 7, 5, seed=14) // 3
    batched = apply_strong(x, one_op("equalize", {}, batch=4))
    for i in range(4):
        assert torch.equal(batched[i : i + 1], apply_strong(x[i : i + 1], one_op("equalize", {})))
        assert batched[i].amax(dim=(1, 2)).eq(255).all() and batched[i].amin(dim=(1, 2)).eq(0).all()


def test_blur_ksize_distribution():
    ks = sample_blur_ksize(gen(15), 39000, (3, 41))
    counts = Counter(ks)
    assert set(counts) == set(range(3, 42, 2))
    others = [counts[k] for k in range(5, 42, 2)]
    # P(3) = 1/39 (1000 expected), P(k) = 2/39 (2000 expected) for k = 5..41.
    assert 850 < counts[3] < 1150 and all(1800 < c < 2200 for c in others)
    assert 0.42 < counts[3] / np.mean(others) < 0.58
    assert set(sample_blur_ksize(gen(0), 500, scaled_blur_limit((64, 128)))) == {3, 5}
    with pytest.raises(ValueError):
        sample_blur_ksize(gen(0), 1, (3, 40))


def test_gaussian_kernel_sigma_rule_and_small_tables():
    for k in (9, 15, 41):
        sigma = 0.3 * ((k - 1) / 2 - 1) + 0.8
        assert blur_sigma(k) == pytest.approx(sigma)
        xs = np.arange(k) - (k - 1) / 2
        w = np.exp(-(xs**2) / (2 * sigma**2))
        np.testing.assert_allclose(opencv_gaussian_kernel(k).numpy(), w / w.sum(), rtol=1e-12)
    # OpenCV's fixed kernels for ksize <= 7 with sigma <= 0.
    assert opencv_gaussian_kernel(3).tolist() == [0.25, 0.5, 0.25]
    assert opencv_gaussian_kernel(5).tolist() == [1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16]
    assert opencv_gaussian_kernel(7).sum().item() == pytest.approx(1.0)


def np_blur_reflect101(a: np.ndarray, kern: np.ndarray) -> np.ndarray:
    """Direct separable filter on HxWxC float64 with numpy 'reflect' (= OpenCV reflect-101) padding."""
    p = len(kern) // 2
    ap = np.pad(a.astype(np.float64), ((0, 0), (p, p), (0, 0)), mode="reflect")
    h = sum(kern[t] * ap[:, t : t + a.shape[1]] for t in range(len(kern)))
    hp = np.pad(h, ((p, p), (0, 0), (0, 0)), mode="reflect")
    return sum(kern[t] * hp[t : t + a.shape[0]] for t in range(len(kern)))


def test_fixed_point_kernel_is_the_float_kernel_in_256ths():
    """OpenCV's uint8 weights: integers summing to 256, symmetric, each within one 256th of 256 × the float
    kernel (error diffusion keeps the running sum within half a unit); the small tables exactly ×256."""
    assert opencv_fixed_point_kernel(3).tolist() == [64, 128, 64]
    assert opencv_fixed_point_kernel(7).tolist() == [8, 28, 56, 72, 56, 28, 8]
    for k in (9, 15, 25, 41):
        q = opencv_fixed_point_kernel(k)
        assert q.sum() == 256 and torch.equal(q, q.flip(0))
        exact = 256 * opencv_gaussian_kernel(k)
        assert (q - exact).abs().max() <= 1
        assert (q[: k // 2].cumsum(0) - exact[: k // 2].cumsum(0)).abs().max() <= 0.5 + 1e-9


@pytest.mark.parametrize("k", [3, 5, 9, 13, 41])
def test_gaussian_blur_matches_direct_fixed_point_filter(k):
    """A direct separable filter with OpenCV's integer weights (slow, float64 on exact integers), rounded half
    up from 1/65536 units as OpenCV's uint8 path; and within one level of the float Gaussian."""
    x = rand_images(1, 12, 15, seed=16)
    out = apply_strong(x, one_op("gaussian_blur", {"ksize": k, "sigma": blur_sigma(k)}))
    got = out[0].permute(1, 2, 0).numpy().astype(np.float64)
    if k < 12:  # numpy's reflect padding needs the kernel to fit the image
        ints = np_blur_reflect101(np_img(x), opencv_fixed_point_kernel(k).numpy().astype(np.float64))
        assert np.array_equal(got, np.floor((ints + 2**15) / 2**16))
    ref = np_blur_reflect101(np_img(x), opencv_gaussian_kernel(k).numpy()) if k < 12 else None
    if ref is not None:
        assert np.abs(got - np.round(ref)).max() <= 1


def test_gaussian_blur_kernel_larger_than_image():
    """k = 41 on a 3x4 image: reflect-101 repeated as OpenCV's borderInterpolate does, per pixel, slowly."""

    def border(p: int, n: int) -> int:
        if n == 1:
            return 0
        while not 0 <= p < n:
            p = -p if p < 0 else n - 1 - (p - n) - 1
        return p

    x = rand_images(1, 3, 4, seed=17).float()
    kern = opencv_fixed_point_kernel(41).tolist()  # integers: the sums below are exact
    a = x[0].numpy()
    H, W = a.shape[1:]
    horiz = np.zeros_like(a, dtype=np.float64)
    for c in range(3):
        for i in range(H):
            for j in range(W):
                horiz[c, i, j] = sum(kern[t] * a[c, i, border(j + t - 20, W)] for t in range(41))
    ref = np.zeros_like(horiz)
    for c in range(3):
        for i in range(H):
            for j in range(W):
                ref[c, i, j] = sum(kern[t] * horiz[c, border(i + t - 20, H), j] for t in range(41))
    out = gaussian_blur(x, [41])
    assert np.array_equal(out[0].numpy(), np.floor((ref + 2**15) / 2**16))  # OpenCV's rounding of 1/65536 units
    single = gaussian_blur(torch.full((1, 3, 1, 1), 77.0), [41])  # one pixel: all borders map to it
    assert torch.equal(single, torch.full((1, 3, 1, 1), 77.0))


def test_color_jitter_brightness_contrast_exact():
    x = rand_images(1, 6, 7, seed=18)
    a = np_img(x)
    order = ("brightness", "contrast", "saturation", "hue")
    only = dict(brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0, order=order)
    out = apply_strong(x, one_op("color_jitter", {**only, "brightness": 1.13}))
    lut = np.clip(np.arange(256) * 1.13, 0, 255).astype(np.uint8)
    assert torch.equal(out, to_t(lut[a]))
    c = 0.85
    ai = a.astype(np.int64)
    grey = (ai[..., 0] * 9798 + ai[..., 1] * 19235 + ai[..., 2] * 3735 + 16384) >> 15
    lut = np.clip(np.arange(256) * c + grey.mean() * (1 - c), 0, 255).astype(np.uint8)
    out = apply_strong(x, one_op("color_jitter", {**only, "contrast": c}))
    assert torch.equal(out, to_t(lut[a]))
    s = 1.17
    out = apply_strong(x, one_op("color_jitter", {**only, "saturation": s}))
    sat = np.clip(np.round(a.astype(np.float64) * s + grey[..., None] * (1 - s)), 0, 255)
    assert np.abs(out[0].permute(1, 2, 0).numpy().astype(np.int64) - sat).max() <= 1  # float32 vs float64


def test_color_jitter_hue_rotation():
    order = ("hue", "brightness", "contrast", "saturation")
    only = dict(brightness=1.0, contrast=1.0, saturation=1.0, order=order)
    prim = to_t(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]]))
    out = apply_strong(prim, one_op("color_jitter", {**only, "hue": 1 / 3}))
    # +120 degrees: red -> green -> blue -> red; grey has no hue.
    assert out[0].permute(1, 2, 0).tolist() == [[[0, 255, 0], [0, 0, 255], [255, 0, 0], [128, 128, 128]]]
    x = rand_images(1, 8, 8, seed=19)
    a = np_img(x)
    tv = pytest.importorskip("torchvision.transforms.v2.functional")
    for h in (-0.2, 0.07, 0.15):
        ours = apply_strong(x, one_op("color_jitter", {**only, "hue": h}))
        # Per pixel, slowly: OpenCV 4's uint8 RGB2HSV in integers (its division tables, 12 fractional bits),
        # H <- uint8((H + 180 h) mod 180), then HSV2RGB in float32 with the result x255 truncated.
        ref = np.zeros_like(a, dtype=np.int64)
        f32 = np.float32
        for i, j in np.ndindex(a.shape[:2]):
            r, g, b = (int(c) for c in a[i, j])
            v = max(r, g, b)
            d = v - min(r, g, b)
            s_cv = (d * round((255 << 12) / v) + 2048) >> 12 if v else 0
            hp = g - b if v == r else (b - r + 2 * d if v == g else r - g + 4 * d)
            h_cv = (hp * round((180 << 12) / (6 * d)) + 2048) >> 12 if d else 0
            h_cv += 180 if h_cv < 0 else 0
            h_new = math.floor((h_cv + 180 * h) % 180)
            hs, ss, vs = f32(h_new) * f32(6 / 180), f32(s_cv) * f32(1 / 255), f32(v) * f32(1 / 255)
            sector = int(np.floor(hs))
            fr = hs - f32(sector)
            tab = [vs, vs * (f32(1) - ss), vs * (f32(1) - ss * fr), vs * ((f32(1) - ss) + ss * fr)]
            pick = [[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]][sector]  # r, g, b
            ref[i, j] = [int(np.floor(tab[t] * f32(255))) for t in pick]
        assert np.array_equal(ours[0].permute(1, 2, 0).numpy().astype(np.int64), ref)
        # Same direction and size as torchvision's adjust_hue (H in [0, 1)): differences come from OpenCV's
        # 2-degree hue levels and the truncating LUT (up to 2 levels = 255 * 4/60 = 17 grey levels).
        diff = (ours.float() - tv.adjust_hue(x.float() / 255, h) * 255).abs()
        assert diff.max() <= 17 and diff.mean() < 2.5


# ------------------------------------------------------------------------------------------------ strong view


def test_strong_params_three_distinct_ops_fire_half():
    p = sample_strong_params(3000, gen(20))
    assert len(p) == 3000
    assert all(len(ops) == 3 and len({o.name for o in ops}) == 3 for ops in p.ops)
    fired = np.array([[o.fired for o in ops] for ops in p.ops])
    assert abs(fired.mean() - 0.5) < 0.03 and all(abs(fired[:, s].mean() - 0.5) < 0.05 for s in range(3))
    drawn = Counter(o.name for ops in p.ops for o in ops)
    assert set(drawn) == set(CCA_OPS) and all(abs(n / 3000 - 3 / 8) < 0.04 for n in drawn.values())
    firsts = Counter(ops[0].name for ops in p.ops)  # uniform order: each op first ~ 1/8 of the time
    assert all(abs(n / 3000 - 1 / 8) < 0.03 for n in firsts.values())
    for ops in p.ops:
        for o in ops:
            if o.name == "color_jitter":
                assert all(0.8 <= o.params[k] <= 1.2 for k in ("brightness", "contrast", "saturation"))
                assert -0.2 <= o.params["hue"] <= 0.2 and sorted(o.params["order"]) == sorted(
                    ("brightness", "contrast", "saturation", "hue")
                )
            elif o.name == "random_contrast":
                assert 1.0 <= o.params["alpha"] <= 4.0
            elif o.name == "random_brightness":
                assert -0.5 <= o.params["beta"] <= 0.5
            elif o.name == "gaussian_blur":
                assert o.params["ksize"] % 2 == 1 and 3 <= o.params["ksize"] <= 41
    records = p.records()
    assert all(len(r) == sum(o.fired for o in ops) for r, ops in zip(records, p.ops, strict=True))


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_strong_view_batch_dtype_and_determinism(batch, dtype):
    x = rand_images(batch, 12, 20, seed=21).to(dtype)
    before = x.clone()
    a, rec_a = strong_view(x, gen(22), blur_limit=(3, 7))
    b, rec_b = strong_view(x, gen(22), blur_limit=(3, 7))
    assert torch.equal(x, before)  # the input is not modified
    assert torch.equal(a, b) and rec_a == rec_b and len(rec_a) == batch
    assert a.shape == x.shape and a.dtype == dtype
    assert torch.equal(a, a.round()) and a.min() >= 0 and a.max() <= 255
    c, _ = strong_view(x.to(torch.uint8 if dtype != torch.uint8 else torch.float32), gen(22), blur_limit=(3, 7))
    assert torch.equal(a.float(), c.float())  # uint8 and float inputs give the same values


def test_strong_batched_equals_per_image_and_labels_untouched():
    x = rand_images(8, 10, 14, seed=23)
    label = torch.randint(0, 19, (8, 10, 14), generator=gen(24))
    lab_before = label.clone()
    p = sample_strong_params(8, gen(25), blur_limit=(3, 9))
    batched = apply_strong(x, p)
    for i in range(8):
        single = apply_strong(x[i : i + 1], StrongViewParams([p.ops[i]]))
        assert torch.equal(batched[i : i + 1], single)
        if not any(o.fired for o in p.ops[i]):
            assert torch.equal(batched[i], x[i])
    assert torch.equal(label, lab_before)  # the strong view never sees labels: image-only by construction


def test_strong_ops_applied_in_drawn_order():
    x = rand_images(1, 6, 6, seed=26)
    a = np_img(x)
    seq = [CCAOp("solarize", True, {"threshold": 128}), CCAOp("posterize", True, {"bits": 4})]
    tail = CCAOp("to_gray", False, {})
    out = apply_strong(x, StrongViewParams([[*seq, tail]]))
    assert torch.equal(out, to_t(np.where(a < 128, a, 255 - a) & 0xF0))
    out_rev = apply_strong(x, StrongViewParams([[seq[1], seq[0], tail]]))
    p = a & 0xF0
    assert torch.equal(out_rev, to_t(np.where(p < 128, p, 255 - p)))


# ------------------------------------------------------------------------------------------------ photometric


def test_photometric_identity_range_and_determinism():
    x = rand_images(5, 16, 16, seed=27).float()
    assert torch.equal(photometric(x, gen(0), strength=0.0), x)
    a = photometric(x, gen(28))
    assert torch.equal(a, photometric(x, gen(28)))
    assert a.shape == x.shape and a.dtype == torch.float32 and a.min() >= 0 and a.max() <= 255
    assert not torch.equal(a, x)
    u8 = photometric(x.to(torch.uint8), gen(28))
    assert u8.dtype == torch.uint8 and torch.equal(u8, a.round().to(torch.uint8))
    # Weak strength stays close to the input; strong strength moves it further on average.
    d_weak = (photometric(x, gen(29), strength=0.1) - x).abs().mean()
    d_strong = (photometric(x, gen(29), strength=1.0) - x).abs().mean()
    assert d_weak < d_strong


def test_some_strong_takes_the_strong_view_on_the_drawn_share():
    x = rand_images(400, 8, 16, seed=30)
    g = gen(31)
    assert some_strong(x, g, 0.0) is x and torch.equal(g.get_state(), gen(31).get_state())  # draws nothing
    # prob 1: one uniform per image, then exactly the strong view of the whole batch
    g_ref = gen(32)
    torch.rand(len(x), generator=g_ref)
    expected, _ = strong_view(x, g_ref, scaled_blur_limit((8, 16)))
    assert torch.equal(some_strong(x, gen(32), 1.0), expected)
    # prob 0.3: the images whose draw is >= 0.3 come back untouched; about 30 % are drawn (binomial, 400 images)
    out = some_strong(x, gen(33), 0.3)
    drawn = torch.rand(len(x), generator=gen(33)) < 0.3
    assert torch.equal(out[~drawn], x[~drawn]) and out.dtype == x.dtype and out.shape == x.shape
    assert 0.3 - 4 * math.sqrt(0.3 * 0.7 / 400) < drawn.float().mean() < 0.3 + 4 * math.sqrt(0.3 * 0.7 / 400)
    changed = (out != x).flatten(1).any(1)
    assert changed[drawn].float().mean() > 0.8  # a drawn image almost always changes (an op fires)
    assert some_strong(x.float(), gen(33), 0.3).dtype == torch.float32
    with pytest.raises(ValueError, match="prob must be in"):
        some_strong(x, gen(0), 1.5)


def test_normalize_hand_values():
    x = torch.tensor([0, 255, 128], dtype=torch.uint8).reshape(1, 3, 1, 1)
    out = normalize(x)
    expected = [(0 - 0.485) / 0.229, (1 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    assert out.dtype == torch.float32 and out.flatten().tolist() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(normalize(x.float()), out)


def test_scaled_blur_limit():
    assert scaled_blur_limit((512, 1024)) == (3, 41)
    assert scaled_blur_limit((64, 128)) == (3, 5)
    lo, hi = scaled_blur_limit((256, 512))
    assert lo == 3 and hi % 2 == 1 and math.isclose(hi, 41 / 2, abs_tol=1.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = rand_images(4, 24, 48, seed=30)
    lab = torch.randint(0, 19, (4, 24, 48), generator=gen(31))
    pw = sample_weak_params(4, (24, 48), (12, 24), (8, 23), 2.0, gen(32))
    cpu_img, (cpu_lab,) = apply_weak(x, [lab], pw)
    gpu_img, (gpu_lab,) = apply_weak(x.cuda(), [lab.cuda()], pw)
    assert torch.equal(cpu_lab, gpu_lab.cpu())
    assert (cpu_img.int() - gpu_img.cpu().int()).abs().max() <= 1
    ps = sample_strong_params(4, gen(33), blur_limit=(3, 9))
    diff = (apply_strong(cpu_img, ps).int() - apply_strong(cpu_img.cuda(), ps).cpu().int()).abs()
    assert diff.max() <= 1
    g = torch.Generator(device="cuda").manual_seed(0)
    out, _ = strong_view(x.cuda(), g)
    assert out.device.type == "cuda"
