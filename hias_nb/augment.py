"""Weak ("MS") and strong ("CCA") views, batched on the training device.

Implements docs/method.md §5.5 (augmentations), the randomness notes of §5.6 and B42: the
strong view re-implements the **albumentations 1.0.3** semantics of the published configuration (its
`RandomContrast` is a pure gain in [1, 4], its `RandomBrightness` adds up to +-0.5*255) instead of calling a
current library by name. Also the photometric augmentation used for source-only training and the ImageNet
normalisation.

Conventions
- Images are ``[B,3,H,W]`` RGB tensors on any device, either ``uint8`` or float holding values in [0, 255].
  Work is done in float32. An output keeps the input's kind: ``uint8`` in gives ``uint8`` out (rounded,
  clipped), float in gives float32 out.
- Label-like maps (labels, HPLA provenance masks, ...) are ``[B,H,W]`` integer tensors (255 = ignored / none);
  the weak view gives them exactly the image's flip and crop, resized with nearest neighbour.
- All randomness goes through an explicit ``torch.Generator``; parameters are drawn independently for each image
  of the batch. Draw on the generator's device, apply on the images' device.

Weak view "MS" (docs/method.md §5.5): horizontal flip with p = 0.5, then RandomSizedCrop. Resizing follows OpenCV
``INTER_LINEAR`` / ``INTER_NEAREST`` geometry as PyTorch implements it (``F.interpolate`` bilinear with
``align_corners=False`` and ``nearest``); it is done for the whole batch with gathers, so each sample's crop is
interpolated from its own pixels only (border clamping at the crop edge, as a per-image crop would).

Strong view "CCA" (docs/method.md §5.5 table): three distinct operations out of eight, applied in the drawn order, each
firing with p = 0.5. Every operation reads and writes uint8-valued images: values are rounded or truncated back
to integers in [0, 255] at the end of each operation (and of each ColorJitter sub-operation), exactly where
OpenCV/numpy would store a uint8 (documented per operation below).

`make_views` builds both views of a self-training step (and of the previews and loss maps) in one call.

Why one module over 600 lines: it is the paper's view component whole; the eight CCA operations are re-implemented
to the grey level (a library call would not give the published semantics), and the weak view, the strong view
and the source-only photometric augmentation share the same uint8-in/uint8-out helpers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hias_nb.errors import InputError

__all__ = [
    "CCA_OPS",
    "CITYSCAPES_MS",
    "CITYSCAPES_OMS",
    "GTA5_MS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OXFORD_OMS",
    "SYNTHIA_MS",
    "CCAOp",
    "StrongViewParams",
    "WeakViewConfig",
    "WeakViewParams",
    "apply_strong",
    "apply_weak",
    "blur_sigma",
    "equalize",
    "gaussian_blur",
    "normalize",
    "opencv_gaussian_kernel",
    "opencv_fixed_point_kernel",
    "photometric",
    "rgb_to_gray",
    "some_strong",
    "sample_blur_ksize",
    "sample_strong_params",
    "sample_weak_params",
    "scaled_blur_limit",
    "scaled_weak_defaults",
    "strong_view",
    "weak_view",
    "crop_heights",
    "check_crop_fits",
    "Views",
    "make_views",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------


def _check_images(images: Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B,3,H,W], got shape {tuple(images.shape)}")


def _to_float(images: Tensor) -> Tensor:
    """``[B,3,H,W]`` uint8 or float -> float32 copy (never aliases the input)."""
    _check_images(images)
    return images.to(torch.float32, copy=True)


def _quantize(x: Tensor) -> Tensor:
    """Round half to even and clip to [0, 255], like OpenCV's ``saturate_cast<uchar>`` (float32 kept)."""
    return x.round().clamp_(0.0, 255.0)


def _restore(x: Tensor, like: Tensor) -> Tensor:
    """Return ``x`` (float32, [0, 255]) as uint8 if ``like`` is uint8, else as float32."""
    if like.dtype == torch.uint8:
        return _quantize(x).to(torch.uint8)
    return x


def _rand(generator: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """U[0, 1) drawn on the generator's device, returned on CPU (parameters are few and small)."""
    return torch.rand(*shape, generator=generator, device=generator.device, dtype=dtype).cpu()


def _randint(generator: torch.Generator, low: int, high_inclusive: int, n: int) -> Tensor:
    """``n`` integers uniform in [low, high_inclusive] (like Python's ``random.randint``), int64 on CPU."""
    return torch.randint(
        low, high_inclusive + 1, (n,), generator=generator, device=generator.device, dtype=torch.int64
    ).cpu()


# ----------------------------------------------------------------------------------------------------------------
# Weak view "MS": horizontal flip + RandomSizedCrop (docs/method.md §5.5)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeakViewConfig:
    """One row of the docs/method.md §5.5 table: output size (H, W), crop-height range (inclusive) and ratio r = w/h."""

    out_size: tuple[int, int]
    h_range: tuple[int, int]
    ratio: float


CITYSCAPES_MS = WeakViewConfig((512, 1024), (341, 1000), 2.0)
GTA5_MS = WeakViewConfig((512, 1024), (341, 950), 2.0)
SYNTHIA_MS = WeakViewConfig((512, 1024), (341, 640), 2.0)
CITYSCAPES_OMS = WeakViewConfig((768, 1024), (341, 1000), 1280 / 960)
OXFORD_OMS = WeakViewConfig((768, 1024), (341, 900), 1280 / 960)


def scaled_weak_defaults(out_size: tuple[int, int], base: WeakViewConfig = CITYSCAPES_MS) -> WeakViewConfig:
    """Scale a paper row (default: Cityscapes target, out 512x1024, h in [341, 1000], r = 2) to ``out_size``.

    The crop-height bounds scale with ``out_size[0] / base.out_size[0]`` (rounded); the ratio is kept.
    Example: ``(64, 128)`` -> h in [43, 125], r = 2.
    """
    out_h, out_w = int(out_size[0]), int(out_size[1])
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"out_size must be positive, got {out_size}")
    s = out_h / base.out_size[0]
    h_min = max(1, round(base.h_range[0] * s))
    h_max = max(h_min, round(base.h_range[1] * s))
    return WeakViewConfig((out_h, out_w), (h_min, h_max), base.ratio)


@dataclass(frozen=True, eq=False)  # tensor fields: compare fields explicitly
class WeakViewParams:
    """Per-image weak-view parameters; every field is an int64/bool CPU tensor ``[B]``.

    ``top``/``left`` index the **flipped** image (the flip happens before the crop, as in docs/method.md §5.5);
    ``height``/``width`` are the crop size after clamping to the image; ``out_size`` is (H_out, W_out).
    """

    flip: Tensor
    top: Tensor
    left: Tensor
    height: Tensor
    width: Tensor
    in_size: tuple[int, int]
    out_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.flip.numel())


def sample_weak_params(
    batch: int,
    in_size: tuple[int, int],
    out_size: tuple[int, int],
    h_range: tuple[int, int],
    ratio: float,
    generator: torch.Generator,
) -> WeakViewParams:
    """Draw flip and crop for ``batch`` images of size ``in_size`` = (H, W).

    Per image: flip ~ Bernoulli(0.5); h ~ UniformInt[h_min, h_max]; w = int(h * ratio); top = int((H - h) * u1),
    left = int((W - w) * u2) with u ~ U[0, 1).

    Crops larger than the image: albumentations raises there; we clamp instead, so that small images work.
    h is first capped to H, then lowered until int(h * ratio) <= W (so the aspect ratio of the crop is kept and
    the crop always lies inside the image). The draws themselves are unchanged, so clamping only concentrates
    the large end of the distribution on the largest crop that fits.
    """
    H, W = int(in_size[0]), int(in_size[1])
    h_min, h_max = int(h_range[0]), int(h_range[1])
    if H <= 0 or W <= 0:
        raise ValueError(f"in_size must be positive, got {in_size}")
    if not 1 <= h_min <= h_max:
        raise ValueError(f"h_range must satisfy 1 <= h_min <= h_max, got {h_range}")
    if not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    if int(out_size[0]) <= 0 or int(out_size[1]) <= 0:
        raise ValueError(f"out_size must be positive, got {out_size}")
    # Largest h whose crop fits: h <= H and int(h * ratio) <= W (and at least 1 pixel wide).
    h_fit = min(H, math.floor(W / ratio) + 1)
    while h_fit > 1 and int(h_fit * ratio) > W:
        h_fit -= 1
    if int(h_fit * ratio) < 1:
        raise ValueError(f"ratio {ratio} gives an empty crop for image size {in_size}")

    flip = _rand(generator, batch) < 0.5
    h = _randint(generator, h_min, h_max, batch).clamp(max=h_fit)
    u = _rand(generator, batch, 2)
    # int(h * ratio) and int((H - h) * u) exactly as Python/albumentations compute them (float64, truncation).
    w = torch.tensor([int(hi * ratio) for hi in h.tolist()], dtype=torch.int64)
    top = ((H - h).double() * u[:, 0]).floor().long()
    left = ((W - w).double() * u[:, 1]).floor().long()
    return WeakViewParams(flip, top, left, h, w, (H, W), (int(out_size[0]), int(out_size[1])))


def _linear_taps(start: Tensor, length: Tensor, out: int) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear source taps of ``F.interpolate(..., align_corners=False)`` for a crop [start, start+length).

    start, length: int64 ``[B]``. Returns (i0, i1, lam), ``[B,out]``: absolute indices of the two taps and the
    weight of ``i1``. Computed in float32 like PyTorch's kernel (scale = length/out, src = scale*(j+0.5)-0.5,
    clamped at 0; past the last pixel both taps are the last pixel), so it matches a per-image resize.
    """
    j = torch.arange(out, dtype=torch.float32)
    scale = length.to(torch.float32)[:, None] / out
    src = (scale * (j + 0.5) - 0.5).clamp(min=0.0)
    i0 = src.floor()
    lam = src - i0
    i0 = i0.long()
    i1 = torch.minimum(i0 + 1, length[:, None] - 1)
    i0 = torch.minimum(i0, length[:, None] - 1)
    return start[:, None] + i0, start[:, None] + i1, lam


def _nearest_taps(start: Tensor, length: Tensor, out: int) -> Tensor:
    """Nearest source index ``floor(j * length/out)`` (cv2 ``INTER_NEAREST``, torch ``nearest``), ``[B,out]``.

    The product is taken in float32 as PyTorch does, so labels match a per-image ``F.interpolate`` exactly.
    """
    j = torch.arange(out, dtype=torch.float32)
    scale = length.to(torch.float32)[:, None] / out
    idx = torch.minimum((j * scale).floor().long(), length[:, None] - 1)
    return start[:, None] + idx


def _source_cols(cols: Tensor, flip: Tensor, width: int) -> Tensor:
    """Map column indices of the flipped image back to the original: c -> W-1-c where flipped."""
    return torch.where(flip[:, None], width - 1 - cols, cols)


def apply_weak(
    images: Tensor,
    labels_like: Sequence[Tensor],
    params: WeakViewParams,
    out_size: tuple[int, int] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Apply the same flip + crop + resize to images (bilinear) and label-like maps (nearest).

    Args:
        images: ``[B,3,H,W]`` uint8 or float in [0, 255].
        labels_like: any number of ``[B,H,W]`` integer maps (label, provenance mask, ...).
        params: from :func:`sample_weak_params` with ``in_size == (H, W)`` and ``len(params) == B``.
        out_size: (H_out, W_out); defaults to ``params.out_size``.

    Returns:
        images ``[B,3,H_out,W_out]`` (uint8 in -> rounded uint8 out, float in -> float32 out) and the maps
        ``[B,H_out,W_out]`` with their dtype and values preserved exactly.
    """
    _check_images(images)
    B, _, H, W = images.shape
    if len(params) != B or tuple(params.in_size) != (H, W):
        raise ValueError(
            f"params are for {len(params)} images of size {params.in_size}, got {B} images of size {(H, W)}"
        )
    for m in labels_like:
        if m.shape != (B, H, W):
            raise ValueError(f"label-like map must be [B,H,W] = {(B, H, W)}, got {tuple(m.shape)}")
    oh, ow = out_size if out_size is not None else params.out_size
    dev = images.device

    # Image: separable bilinear, rows then columns, each sample sampling only inside its own crop.
    r0, r1, ry = _linear_taps(params.top, params.height, oh)
    c0, c1, rx = _linear_taps(params.left, params.width, ow)
    c0, c1 = _source_cols(c0, params.flip, W), _source_cols(c1, params.flip, W)
    x = images.to(torch.float32)
    C = x.shape[1]

    def take_rows(idx: Tensor) -> Tensor:  # [B,oh] -> [B,C,oh,W]
        return torch.gather(x, 2, idx.to(dev)[:, None, :, None].expand(B, C, oh, W))

    ry_d = ry.to(dev)[:, None, :, None]
    rows = take_rows(r0) * (1 - ry_d) + take_rows(r1) * ry_d

    def take_cols(idx: Tensor) -> Tensor:  # [B,ow] -> [B,C,oh,ow]
        return torch.gather(rows, 3, idx.to(dev)[:, None, None, :].expand(B, C, oh, ow))

    rx_d = rx.to(dev)[:, None, None, :]
    out = take_cols(c0) * (1 - rx_d) + take_cols(c1) * rx_d

    # Label-like maps: nearest neighbour, values copied exactly.
    nr = _nearest_taps(params.top, params.height, oh).to(dev)
    nc = _source_cols(_nearest_taps(params.left, params.width, ow), params.flip, W).to(dev)
    maps = []
    for m in labels_like:
        m_rows = torch.gather(m, 1, nr[:, :, None].expand(B, oh, W))
        maps.append(torch.gather(m_rows, 2, nc[:, None, :].expand(B, oh, ow)))
    return _restore(out, images), maps


def weak_view(
    images: Tensor,
    label: Tensor,
    extra_maps: Sequence[Tensor] = (),
    *,
    out_size: tuple[int, int],
    h_range: tuple[int, int],
    ratio: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Weak view "MS" in one call: returns (images ``[B,3,oh,ow]``, label ``[B,oh,ow]``, extra maps)."""
    _check_images(images)
    B, _, H, W = images.shape
    params = sample_weak_params(B, (H, W), out_size, h_range, ratio, generator)
    out, maps = apply_weak(images, [label, *extra_maps], params, out_size)
    return out, maps[0], maps[1:]


# ----------------------------------------------------------------------------------------------------------------
# Operations of the strong view (albumentations 1.0.3 semantics on uint8-valued float32 images [N,3,H,W])
# ----------------------------------------------------------------------------------------------------------------

_ARANGE_256 = torch.arange(256, dtype=torch.float64)


def _apply_lut(x: Tensor, lut: Tensor) -> Tensor:
    """Per-sample lookup table, like ``cv2.LUT``: x ``[N,C,H,W]`` integer-valued, lut ``[N,256]`` -> float32."""
    N, C, H, W = x.shape
    idx = x.long().reshape(N, 1, C * H * W).expand(N, 1, C * H * W)
    return torch.gather(lut.to(x.device, torch.float32)[:, None, :], 2, idx).reshape(N, C, H, W)


def rgb_to_gray(x: Tensor) -> Tensor:
    """``cv2.cvtColor(RGB2GRAY)`` on uint8 values: ``(9798 R + 19235 G + 3735 B + 2^14) >> 15``.

    OpenCV 4's fixed-point form of 0.299/0.587/0.114 (15 bits; bit-exact with OpenCV 4.8 on all 2^24 colours;
    the 14-bit form of older versions differs by one level on 0.3 % of them). x ``[N,3,H,W]`` integer-valued ->
    ``[N,1,H,W]`` float32 (integer values).
    """
    xi = x.to(torch.int32)
    g = (xi[:, 0:1] * 9798 + xi[:, 1:2] * 19235 + xi[:, 2:3] * 3735 + (1 << 14)) >> 15
    return g.to(torch.float32)


def _jitter_brightness(x: Tensor, b: Tensor) -> Tensor:
    """ColorJitter brightness: LUT ``uint8(clip(v * b, 0, 255))`` (truncation, float64 as numpy)."""
    lut = (_ARANGE_256.to(x.device)[None] * b.to(x.device, torch.float64)[:, None]).clamp(0, 255).floor()
    return _apply_lut(x, lut)


def _jitter_contrast(x: Tensor, c: Tensor) -> Tensor:
    """ColorJitter contrast: LUT ``uint8(clip(v * c + m * (1 - c)))``, m = mean of the uint8 grey image."""
    m = rgb_to_gray(x).to(torch.float64).mean(dim=(1, 2, 3))
    c = c.to(x.device, torch.float64)
    lut = _ARANGE_256.to(x.device)[None] * c[:, None] + (m * (1 - c))[:, None]
    return _apply_lut(x, lut.clamp(0, 255).floor())


def _jitter_saturation(x: Tensor, s: Tensor) -> Tensor:
    """ColorJitter saturation: ``cv2.addWeighted(x, s, grey, 1 - s, 0)``, float32, rounded half to even."""
    s = s.to(x.device, torch.float32)[:, None, None, None]
    return _quantize(x * s + rgb_to_gray(x) * (1 - s))


# OpenCV HSV2RGB_f: (b, g, r) = tab[sector_data[sector]]; reordered here to (r, g, b).
_HSV_SECTOR_RGB = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


_HSV_SHIFT = 12
_I = torch.arange(256, dtype=torch.float64)
# OpenCV's RGB2HSV_b division tables (fixed point, 12 fractional bits; index 0 gives 0)
_SDIV = torch.where(_I > 0, torch.round((255 << _HSV_SHIFT) / _I.clamp(min=1)), torch.zeros(())).long()
_HDIV180 = torch.where(_I > 0, torch.round((180 << _HSV_SHIFT) / (6 * _I.clamp(min=1))), torch.zeros(())).long()


def _rgb_to_hsv_cv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``cv2.cvtColor(RGB2HSV)`` for uint8, bit-exact (checked on all 2^24 colours against OpenCV 4.8): H in
    [0, 180), S, V in [0, 255], integer-valued float32. OpenCV's integer path: with ``diff = V − min``,
    ``S = (diff·sdiv[V] + 2^11) >> 12`` and ``H = (h'·hdiv[diff] + 2^11) >> 12`` (+180 if negative), the tables
    ``round(255·2^12 / i)`` and ``round(180·2^12 / (6i))``; h' = G−B (V = R), B−R+2·diff (V = G), R−G+4·diff."""
    r, g, b = (x[:, k].long() for k in range(3))
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV.to(x.device)[v] + half) >> _HSV_SHIFT
    hp = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (hp * _HDIV180.to(x.device)[diff] + half) >> _HSV_SHIFT  # arithmetic shift: floor, as in C++
    h = torch.where(h < 0, h + 180, h)
    return h.float(), s.float(), v.float()


def _hsv_to_rgb_cv(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """``cv2.cvtColor(HSV2RGB)`` for uint8 (H in [0, 180)): OpenCV's sector formula in float32 on S/255 and V/255,
    the result ×255 truncated (equal to OpenCV 4.8 on all but 0.004 % of the 180·256² inputs, never by more than
    one grey level; measured in a side environment, docs/method.md §5.5)."""
    inv = torch.tensor(1 / 255.0, dtype=torch.float32)
    s, v = s * inv, v * inv
    h6 = h * torch.tensor(6 / 180.0, dtype=torch.float32)
    sector = torch.floor(h6)
    f = h6 - sector
    sector = sector.long().clamp(0, 5)
    one = torch.ones((), dtype=torch.float32)
    tab = torch.stack([v, v * (one - s), v * (one - s * f), v * ((one - s) + s * f)], dim=1)  # [N,4,H,W]
    idx = _HSV_SECTOR_RGB.to(h.device)[sector].permute(0, 3, 1, 2)  # [N,3,H,W]
    return torch.floor(torch.gather(tab, 1, idx) * 255.0).clamp(0, 255)


def _jitter_hue(x: Tensor, hue: Tensor) -> Tensor:
    """ColorJitter hue: RGB -> HSV (uint8), H <- uint8((H + 180 * hue) mod 180), HSV -> RGB (uint8)."""
    h, s, v = _rgb_to_hsv_cv(x)
    lut = torch.remainder(_ARANGE_256.to(x.device)[None] + 180.0 * hue.to(x.device, torch.float64)[:, None], 180)
    h = _apply_lut(h[:, None], lut.floor())[:, 0]
    out = _hsv_to_rgb_cv(h, s, v)
    return torch.where((hue == 0).to(x.device)[:, None, None, None], x, out)  # albumentations: factor 0 -> no-op


_JITTER_SUBOPS = ("brightness", "contrast", "saturation", "hue")
_JITTER_FNS = {
    "brightness": _jitter_brightness,
    "contrast": _jitter_contrast,
    "saturation": _jitter_saturation,
    "hue": _jitter_hue,
}


def _color_jitter(x: Tensor, params: list[dict]) -> Tensor:
    """ColorJitter(0.2, 0.2, 0.2, 0.2): the four sub-operations in each image's own drawn order."""
    for step in range(4):
        for sub in _JITTER_SUBOPS:
            sel = [i for i, p in enumerate(params) if p["order"][step] == sub]
            if sel:
                idx = torch.tensor(sel, device=x.device)
                factor = torch.tensor([params[i][sub] for i in sel], dtype=torch.float64)
                x[idx] = _JITTER_FNS[sub](x[idx], factor)
    return x


def blur_sigma(ksize: int) -> float:
    """OpenCV's sigma for ``sigma <= 0``: ``0.3 * ((ksize - 1) / 2 - 1) + 0.8``."""
    return 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8


# OpenCV getGaussianKernel uses these fixed kernels for odd ksize <= 7 when sigma <= 0 (the albumentations case).
_SMALL_GAUSSIAN = {
    1: (1.0,),
    3: (0.25, 0.5, 0.25),
    5: (0.0625, 0.25, 0.375, 0.25, 0.0625),
    7: (0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125),
}


def opencv_gaussian_kernel(ksize: int, sigma: float = 0.0) -> Tensor:
    """``cv2.getGaussianKernel(ksize, sigma)`` as float64 ``[ksize]``.

    With sigma <= 0: the fixed tables for ksize 1/3/5/7, else sigma from :func:`blur_sigma`;
    weights ``exp(-x^2 / (2 sigma^2))`` at x = i - (ksize-1)/2, normalised to sum 1.
    """
    if ksize < 1 or ksize % 2 != 1:
        raise ValueError(f"ksize must be a positive odd integer, got {ksize}")
    if sigma <= 0 and ksize in _SMALL_GAUSSIAN:
        return torch.tensor(_SMALL_GAUSSIAN[ksize], dtype=torch.float64)
    sigma = sigma if sigma > 0 else blur_sigma(ksize)
    xs = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2
    k = torch.exp(-(xs**2) / (2 * sigma**2))
    return k / k.sum()


def _reflect101_index(n: int, pad: int, device: torch.device) -> Tensor:
    """Indices of ``[-pad, n + pad)`` under OpenCV ``BORDER_REFLECT_101`` (gfedcb|abcdefgh|gfedcba), any pad.

    Repeated reflection (period 2(n-1)) as OpenCV's ``borderInterpolate``, so kernels larger than the image
    are handled exactly instead of being capped.
    """
    i = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    j = i.abs() % period
    return torch.where(j >= n, period - j, j)


def _separable_blur(x: Tensor, kernels: Tensor) -> Tensor:
    """Per-sample separable filter with reflect-101 borders.

    x ``[N,C,H,W]`` float32; kernels ``[N,K]`` (K odd, each sample's kernel centred and zero-padded to K).
    A sum of shifted slices in float32 rather than a convolution, so no TF32 / backend-dependent precision.
    """
    N, C, H, W = x.shape
    K = kernels.shape[1]
    p = K // 2
    taps = [t for t in range(K) if bool((kernels[:, t] != 0).any())]  # on CPU: no device syncs
    k = kernels.to(x.device, torch.float32)[:, :, None, None, None]  # [N,K,1,1,1]
    xp = x.index_select(3, _reflect101_index(W, p, x.device))
    horiz = torch.zeros_like(x)
    for t in taps:
        horiz.addcmul_(xp[..., t : t + W], k[:, t])
    hp = horiz.index_select(2, _reflect101_index(H, p, x.device))
    out = torch.zeros_like(x)
    for t in taps:
        out.addcmul_(hp[:, :, t : t + H], k[:, t])
    return out


def _pad_kernels(kernels: list[Tensor]) -> Tensor:
    """Centre 1-D kernels of odd lengths in a zero-padded ``[N,K]`` block."""
    K = max(int(k.numel()) for k in kernels)
    out = torch.zeros(len(kernels), K, dtype=torch.float64)
    for i, k in enumerate(kernels):
        o = (K - k.numel()) // 2
        out[i, o : o + k.numel()] = k
    return out


def opencv_fixed_point_kernel(ksize: int, bits: int = 8) -> Tensor:
    """The integer weights (summing to ``2**bits``) of ``cv2.GaussianBlur(img, (k, k), 0)`` on uint8 images:
    OpenCV's bit-exact path. ksize 3/5/7 are the fixed tables ×256; larger kernels are the Gaussian of σ =
    0.15·k + 0.35 (OpenCV's rule), normalised in float64, then quantised half by half with error diffusion
    (``round(w·2^bits + carried error)``), the centre taking the remainder. int64 ``[ksize]``."""
    if ksize < 1 or ksize % 2 != 1:
        raise ValueError(f"ksize must be a positive odd integer, got {ksize}")
    if ksize in _SMALL_GAUSSIAN:
        return torch.tensor([round(w * (1 << bits)) for w in _SMALL_GAUSSIAN[ksize]], dtype=torch.int64)
    sigma = ksize * 0.15 + 0.35
    scale2 = -0.125 / (sigma * sigma)
    half = [math.exp(float(x * x) * scale2) for x in range(1 - ksize, 0, 2)]  # x = 2 × the offset
    norm = 1.0 / (2 * sum(half) + 1.0)
    err, side = 0.0, []
    for w in half:
        adj = w * norm * (1 << bits) + err
        q = round(adj)  # half to even, as cvRound
        err = adj - q
        side.append(q)
    return torch.tensor([*side, (1 << bits) - 2 * sum(side), *side[::-1]], dtype=torch.int64)


def gaussian_blur(x: Tensor, ksizes: Sequence[int]) -> Tensor:
    """``cv2.GaussianBlur(img, (k, k), 0)`` per image: x ``[N,3,H,W]`` uint8-valued -> uint8-valued float32.

    Bit-exact with OpenCV's fixed-point uint8 path (checked against OpenCV 4.8 for every k in 3..41 on noise and
    binary images, docs/method.md §5.5): integer weights of `opencv_fixed_point_kernel`, a horizontal pass
    kept exact in 1/256 units, a vertical pass in 1/65536 units, rounded half up; reflect-101 borders, exact
    for any kernel size, even larger than the image.
    """
    kernels = _pad_kernels([opencv_fixed_point_kernel(int(k)).double() for k in ksizes]).to(torch.int32)
    N, C, H, W = x.shape
    K = kernels.shape[1]
    p = K // 2
    k = kernels.to(x.device)[:, :, None, None, None]  # [N,K,1,1,1]
    taps = [t for t in range(K) if bool((kernels[:, t] != 0).any())]
    xi = x.to(torch.int32)
    xp = xi.index_select(3, _reflect101_index(W, p, x.device))
    horiz = torch.zeros_like(xi)  # ≤ 255·256: exact in int32
    for t in taps:
        horiz += xp[..., t : t + W] * k[:, t]
    hp = horiz.index_select(2, _reflect101_index(H, p, x.device))
    out = torch.zeros_like(xi)  # ≤ 255·2^16
    for t in taps:
        out += hp[:, :, t : t + H] * k[:, t]
    return ((out + (1 << 15)) >> 16).clamp(0, 255).to(torch.float32)


def _lut_gain(x: Tensor, alpha: Tensor) -> Tensor:
    """RandomContrast (1.0.3): LUT ``uint8(clip(float32(v) * alpha, 0, 255))`` (truncation)."""
    a = alpha.to(x.device, torch.float32)[:, None]
    lut = _ARANGE_256.to(x.device, torch.float32)[None] * a
    return _apply_lut(x, lut.clamp(0, 255).floor())


def _lut_brightness(x: Tensor, beta: Tensor) -> Tensor:
    """RandomBrightness (1.0.3): LUT ``uint8(clip(float32(v) + beta * 255, 0, 255))`` (truncation)."""
    bb = (beta.to(x.device, torch.float64) * 255).to(torch.float32)[:, None]
    lut = _ARANGE_256.to(x.device, torch.float32)[None] + bb
    return _apply_lut(x, lut.clamp(0, 255).floor())


def _posterize(x: Tensor) -> Tensor:
    """Posterize(4 bits): ``v & 0xF0``."""
    return (x.to(torch.int32) & 0xF0).to(torch.float32)


def equalize(x: Tensor) -> Tensor:
    """Per-channel ``cv2.equalizeHist`` on uint8 values: x ``[N,C,H,W]`` -> float32 (integer values).

    For each (image, channel) with histogram ``hist`` over P pixels and lowest present value ``i``:
    if ``hist[i] == P`` the channel is constant and left as is; else
    ``lut[v] = round_half_even(float32(cumsum(hist)[v] - hist[i]) * float32(255 / (P - hist[i])))`` for v >= i
    (so ``lut[i] = 0``), which is OpenCV's formula (scale and product in float32, ``saturate_cast`` rounding).
    """
    N, C, H, W = x.shape
    P = H * W
    flat = x.long().reshape(N * C, P)
    hist = torch.zeros(N * C, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    cdf = hist.cumsum(dim=1)
    lowest = (hist > 0).long().argmax(dim=1, keepdim=True)
    h_low = hist.gather(1, lowest)
    denom = (P - h_low).clamp(min=1).to(torch.float32)
    scale = torch.tensor(255.0, dtype=torch.float32, device=x.device) / denom
    lut = ((cdf - h_low).to(torch.float32) * scale).round().clamp(0, 255)
    constant = h_low == P
    lut = torch.where(constant, torch.arange(256, device=x.device, dtype=torch.float32)[None], lut)
    out = torch.gather(lut, 1, flat)
    return out.reshape(N, C, H, W)


def _solarize(x: Tensor) -> Tensor:
    """Solarize(128): ``v`` if ``v < 128`` else ``255 - v``."""
    return torch.where(x < 128, x, 255 - x)


def _to_gray(x: Tensor) -> Tensor:
    """ToGray (1.0.3): OpenCV grey replicated to three channels (no inversion)."""
    return rgb_to_gray(x).expand_as(x).clone()


# ----------------------------------------------------------------------------------------------------------------
# Strong view "CCA" (docs/method.md §5.5): SomeOf(3 of 8, in drawn order), each op with p = 0.5
# ----------------------------------------------------------------------------------------------------------------

CCA_OPS = (
    "color_jitter",
    "gaussian_blur",
    "random_contrast",
    "random_brightness",
    "posterize",
    "equalize",
    "solarize",
    "to_gray",
)


@dataclass(frozen=True)
class CCAOp:
    """One drawn CCA operation: its name (one of ``CCA_OPS``), whether it fired (p = 0.5), its parameters."""

    name: str
    fired: bool
    params: dict


@dataclass(frozen=True)
class StrongViewParams:
    """Per image, the three drawn operations in order of application."""

    ops: list[list[CCAOp]]

    def __len__(self) -> int:
        return len(self.ops)

    def records(self) -> list[list[tuple[str, dict]]]:
        """Per image, ``(name, params)`` of the operations that fired, in order (for previews)."""
        return [[(op.name, op.params) for op in ops if op.fired] for ops in self.ops]


def scaled_blur_limit(
    out_size: tuple[int, int], base_size: tuple[int, int] = (512, 1024), blur_limit: tuple[int, int] = (3, 41)
) -> tuple[int, int]:
    """Scale the CCA blur kernel range from ``base_size`` (the paper's 512x1024 crops) to ``out_size``.

    Both ends scale with ``out_size[0] / base_size[0]``, go to the nearest odd integer and are kept >= 3.
    Example: ``(64, 128)`` -> (3, 5).
    """
    s = out_size[0] / base_size[0]

    def odd(v: float) -> int:
        return max(3, 2 * round((v - 1) / 2) + 1)

    lo = odd(blur_limit[0] * s)
    return lo, max(lo, odd(blur_limit[1] * s))


def sample_blur_ksize(generator: torch.Generator, n: int, blur_limit: tuple[int, int] = (3, 41)) -> list[int]:
    """GaussianBlur kernel sizes: k ~ UniformInt[lo, hi] (inclusive), an even k becomes k + 1.

    With (3, 41) this gives P(3) = 1/39 and P(k) = 2/39 for k = 5, 7, ..., 41, as docs/method.md §5.5 states.
    Both limits must be odd (albumentations would map an even upper limit + 1 to ksize 0).
    """
    lo, hi = int(blur_limit[0]), int(blur_limit[1])
    if lo < 1 or lo % 2 != 1 or hi % 2 != 1 or hi < lo:
        raise ValueError(f"blur_limit must be two odd integers lo <= hi, got {blur_limit}")
    k = _randint(generator, lo, hi, n)
    return (k + (k % 2 == 0).long()).tolist()


def sample_strong_params(
    batch: int, generator: torch.Generator, blur_limit: tuple[int, int] = (3, 41)
) -> StrongViewParams:
    """Draw, per image: 3 distinct operations of ``CCA_OPS`` in random order, a fire flag (p = 0.5) for each,
    and every operation's parameters:

    - color_jitter: brightness, contrast, saturation ~ U[0.8, 1.2], hue ~ U[-0.2, 0.2], random sub-op order;
    - gaussian_blur: ksize from :func:`sample_blur_ksize`, sigma by OpenCV's rule (recorded);
    - random_contrast: alpha = 1 + U[0, 3]; random_brightness: beta ~ U[-0.5, 0.5];
    - posterize: bits = 4; solarize: threshold = 128; equalize, to_gray: none.
    """
    choice = _rand(generator, batch, len(CCA_OPS)).argsort(dim=1)[:, :3].tolist()
    fired = (_rand(generator, batch, 3) < 0.5).tolist()
    jitter = _rand(generator, batch, 4)
    jitter_order = _rand(generator, batch, 4).argsort(dim=1).tolist()
    ksizes = sample_blur_ksize(generator, batch, blur_limit)
    gain_beta = _rand(generator, batch, 2)

    ops = []
    for i in range(batch):
        drawn = []
        for step, op_index in enumerate(choice[i]):
            name = CCA_OPS[op_index]
            if name == "color_jitter":
                b, c, s, h = jitter[i].tolist()
                params = {
                    "brightness": 0.8 + 0.4 * b,
                    "contrast": 0.8 + 0.4 * c,
                    "saturation": 0.8 + 0.4 * s,
                    "hue": -0.2 + 0.4 * h,
                    "order": tuple(_JITTER_SUBOPS[j] for j in jitter_order[i]),
                }
            elif name == "gaussian_blur":
                k = ksizes[i]
                params = {"ksize": k, "sigma": blur_sigma(k)}
            elif name == "random_contrast":
                params = {"alpha": 1.0 + 3.0 * float(gain_beta[i, 0])}
            elif name == "random_brightness":
                params = {"beta": -0.5 + float(gain_beta[i, 1])}
            elif name == "posterize":
                params = {"bits": 4}
            elif name == "solarize":
                params = {"threshold": 128}
            else:
                params = {}
            drawn.append(CCAOp(name, bool(fired[i][step]), params))
        ops.append(drawn)
    return StrongViewParams(ops)


def _apply_op(name: str, x: Tensor, params: list[dict]) -> Tensor:
    """Apply one CCA operation to a sub-batch ``x`` ``[n,3,H,W]`` with one params dict per image."""
    if name == "color_jitter":
        return _color_jitter(x, params)
    if name == "gaussian_blur":
        return gaussian_blur(x, [p["ksize"] for p in params])
    if name == "random_contrast":
        return _lut_gain(x, torch.tensor([p["alpha"] for p in params], dtype=torch.float64))
    if name == "random_brightness":
        return _lut_brightness(x, torch.tensor([p["beta"] for p in params], dtype=torch.float64))
    if name == "posterize":
        return _posterize(x)
    if name == "equalize":
        return equalize(x)
    if name == "solarize":
        return _solarize(x)
    if name == "to_gray":
        return _to_gray(x)
    raise ValueError(f"unknown CCA operation {name!r}")


def apply_strong(images: Tensor, params: StrongViewParams) -> Tensor:
    """Apply drawn CCA parameters to ``[B,3,H,W]`` images (uint8, or float rounded to integers first).

    Operations run step by step; at each step the images sharing an operation are processed together.
    Returns uint8 for uint8 input, else float32 with integer values in [0, 255].
    """
    x = _quantize(_to_float(images))
    if len(params) != x.shape[0]:
        raise ValueError(f"params are for {len(params)} images, got {x.shape[0]}")
    for step in range(3):
        for name in CCA_OPS:
            sel = [i for i, ops in enumerate(params.ops) if ops[step].fired and ops[step].name == name]
            if sel:
                idx = torch.tensor(sel, device=x.device)
                x[idx] = _apply_op(name, x[idx], [params.ops[i][step].params for i in sel])
    return _restore(x, images)


def strong_view(
    images: Tensor, generator: torch.Generator, blur_limit: tuple[int, int] = (3, 41)
) -> tuple[Tensor, list[list[tuple[str, dict]]]]:
    """Strong view "CCA" (image-only; labels are untouched by construction).

    Returns the augmented images (uint8 in -> uint8 out, float in -> float32 with integer values) and, per
    image, the ``(name, params)`` of the operations that fired, in the order applied.
    """
    _check_images(images)
    params = sample_strong_params(images.shape[0], generator, blur_limit)
    return apply_strong(images, params), params.records()


# ----------------------------------------------------------------------------------------------------------------
# The views of one self-training step: weak (teacher) and strong (student), label and provenance moved with them
# ----------------------------------------------------------------------------------------------------------------


def crop_heights(pixels: tuple[int, int] | None, scale: tuple[float, float], in_h: int) -> tuple[int, int]:
    """Inclusive crop-height range of the weak view: `pixels` when given (the paper's rows, docs/method.md §5.5),
    else `scale` × input height (the toytown default (0.6, 1.0))."""
    if pixels is not None:
        return int(pixels[0]), int(pixels[1])
    lo, hi = max(1, round(scale[0] * in_h)), max(1, round(scale[1] * in_h))
    if lo > hi:
        raise InputError(f"crop_scale: lower bound above upper bound: {scale}")
    return lo, hi


def check_crop_fits(resize: tuple[int, int] | None, pixels: tuple[int, int] | None, ratio: float) -> None:
    """Refuse a crop-height range (pixels) that images resized to `resize` cannot hold: every larger draw would
    be clamped to the image, silently concentrating the crops at one zoom (e.g. GTA5 at 720 rows with the
    reference's 341–950: half the crops at the maximum)."""
    if resize is None or pixels is None:
        return
    h, w = resize
    if pixels[1] > h or pixels[1] * ratio > w + 1:
        raise InputError(
            f"crop_height_range: crops up to {pixels[1]}×{int(pixels[1] * ratio)} px do not fit images resized to "
            f"{h}×{w} (resize): resize less or lower the range"
        )


@dataclass(eq=False)
class Views:
    """The two views of a batch. ``weak`` (the teacher's input) and ``strong`` (the student's) are uint8
    ``[B,3,h,w]``; ``label`` and ``provenance`` int64 ``[B,h,w]`` carry the weak view's flip and crop (the strong
    view changes colours only); ``strong_ops`` names, per image, the CCA operations that fired."""

    weak: Tensor
    strong: Tensor
    label: Tensor
    provenance: Tensor
    strong_ops: list[list[tuple[str, dict]]]


def make_views(
    images: Tensor,
    label: Tensor,
    provenance: Tensor | None = None,
    *,
    generator: torch.Generator,
    crop_scale: tuple[float, float],
    crop_ratio: float,
    crop_size: tuple[int, int] | None = None,
    crop_height_range: tuple[int, int] | None = None,
    strong: bool = True,
    blur_limit: tuple[int, int] | None = None,
) -> Views:
    """Weak view (flip + random-sized crop: height `crop_height_range` in pixels, else `crop_scale` × the input
    height, width/height `crop_ratio`, resized to `crop_size`, default the input size) and, on it, the strong
    view (CCA; with ``strong=False`` the student sees the weak view). The crop settings are the caller's stage
    config's (no defaults here, so a stage's config stays the one place they are set). The one place training,
    the HPLA preview and the loss maps build their views, so all three draw the same operations from the same
    `generator` state.

    Shape: ``images`` uint8 ``[B,3,H,W]``, ``label``/``provenance`` int64 ``[B,H,W]`` (provenance: HPLA's pasted
    class per pixel, 255 elsewhere; None = nothing pasted). `blur_limit` None scales the paper's 3–41 px kernels
    (for 512×1024 crops) to the crop size (`scaled_blur_limit`).
    """
    if provenance is None:
        provenance = torch.full_like(label, 255)
    out_size = tuple(crop_size) if crop_size else tuple(images.shape[-2:])
    h_range = crop_heights(crop_height_range, crop_scale, images.shape[-2])
    weak, label, (provenance,) = weak_view(
        images, label, (provenance,), out_size=out_size, h_range=h_range, ratio=crop_ratio, generator=generator
    )
    if not strong:
        return Views(weak, weak, label, provenance, [[] for _ in range(len(weak))])
    limit = blur_limit if blur_limit is not None else scaled_blur_limit(out_size)
    strong_images, ops = strong_view(weak, generator=generator, blur_limit=limit)
    return Views(weak, strong_images, label, provenance, ops)


# ----------------------------------------------------------------------------------------------------------------
# Photometric augmentation for source-only training, and normalisation
# ----------------------------------------------------------------------------------------------------------------


def photometric(images: Tensor, generator: torch.Generator, strength: float = 1.0) -> Tensor:
    """Photometric augmentation for source-only training (not part of HIAST; see the project's notes).

    Per image, with s = ``strength`` (0 = identity), in float32 without intermediate rounding:
    1. colour jitter: brightness x*b, contrast around the grey mean with factor c, saturation blend with grey
       with factor t; b, c, t ~ U[1 - 0.3 s, 1 + 0.3 s];
    2. gain/brightness: x*g + o with g ~ U[1 - 0.2 s, 1 + 0.2 s], o ~ U[-20 s, 20 s];
    3. Gaussian blur with p = 0.5, sigma ~ U[0.2, 0.2 + 1.3 s] (kernel 2 ceil(3 sigma) + 1, reflect-101);
    4. additive Gaussian noise with std ~ U[0, 6 s] (per image, i.i.d. per pixel and channel);
    5. clip to [0, 255].
    Returns uint8 (rounded) for uint8 input, else float32.
    """
    x = _to_float(images)
    if strength == 0:
        return _restore(x, images)
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    B = x.shape[0]
    dev = x.device
    s = float(strength)
    u = _rand(generator, B, 8, dtype=torch.float32).to(dev)

    def around_one(col: int, width: float) -> Tensor:
        return (1 - width * s + 2 * width * s * u[:, col])[:, None, None, None]

    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).clamp(0, 255)
    x = x * around_one(0, 0.3)
    c = around_one(1, 0.3)
    x = x * c + grey.mean(dim=(1, 2, 3), keepdim=True) * (1 - c)
    t = around_one(2, 0.3)
    grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    x = x * t + grey * (1 - t)
    x = x * around_one(3, 0.2) + (-20 * s + 40 * s * u[:, 4])[:, None, None, None]

    blur = (u[:, 5] < 0.5).cpu()
    if bool(blur.any()):
        sel = blur.nonzero()[:, 0]
        sigmas = (0.2 + 1.3 * s * u[sel.to(dev), 6]).tolist()
        kernels = [opencv_gaussian_kernel(2 * math.ceil(3 * sg) + 1, sg) for sg in sigmas]
        x[sel.to(dev)] = _separable_blur(x[sel.to(dev)], _pad_kernels(kernels))

    noise_std = (6 * s * u[:, 7])[:, None, None, None]
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32).to(dev)
    x = (x + noise * noise_std).clamp_(0, 255)
    return _restore(x, images)


def some_strong(images: Tensor, generator: torch.Generator, prob: float) -> Tensor:
    """The CCA strong view on a random share of a supervised batch (not part of HIAST: toytown's source-only
    training, warm-up and oracle; docs/toytown.md, "What the strong view hides").

    Each image independently takes `strong_view` with probability `prob` (one uniform draw per image from
    `generator`, then the strong view's own draws for the chosen ones; blur scaled to the image size); the others
    are returned unchanged. A toytown model trained without it loses about 40 % of its mIoU on strong views, so
    a self-training student, which learns from strong views, first has to learn them. ``prob`` 0 draws nothing.

    Shape: ``images`` ``[B,3,H,W]`` uint8 or float with integer values in [0, 255] -> the same shape and dtype.
    """
    if not 0 <= prob <= 1:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    if prob == 0:
        return images
    u = torch.rand(images.shape[0], generator=generator, device=generator.device)
    pick = (u < prob).nonzero()[:, 0].cpu()
    if len(pick) == 0:
        return images
    pick = pick.to(images.device)
    strong, _ = strong_view(images[pick], generator, scaled_blur_limit(tuple(images.shape[-2:])))
    out = images.clone()
    out[pick] = strong.to(images.dtype)
    return out


def normalize(images: Tensor) -> Tensor:
    """``[B,3,H,W]`` RGB in [0, 255] (uint8 or float) -> float32 ``(x / 255 - mean) / std`` (ImageNet)."""
    _check_images(images)
    x = images.to(torch.float32) / 255.0
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device)[None, :, None, None]
    return (x - mean) / std
