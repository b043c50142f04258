"""Pseudo-label selectors: IAS, CBST, constant and no threshold (docs/method.md §2.2-2.6, §9.2, §11).

Every selector is a ``Selector``: ``select(conf, pred) -> labels`` per batch, ``thresholds`` float64 ``[C]``.
IAS updates its thresholds inside ``select`` (one stream, in visiting order); CBST is ``two_pass``: it must
``observe`` every batch of the split before its first ``select``.

IAS is the Instance Adaptive Selector of IAST (Mei et al., ECCV 2020) as HIAST (Zhu et al., TPAMI 2025) uses
it. Per instance (one generation batch, or one image) and class ``c``:

1. ``S_c = {theta_c} U {fp16(q_i) : pred_i = c}``: float16-rounded confidences plus the previous threshold;
2. ``psi_c = Quantile_lin(S_c, 1 - alpha * theta_c**gamma)``, numpy's default "linear" method, stored as float32;
3. ``theta_c <- beta * theta_c + (1 - beta) * psi_c`` (float64; numpy evaluates ``(1 - beta) * psi`` in
   float32 because ``psi`` is a float32 array), then ``theta_c >= 1 -> 0.999`` (no lower clip);
4. keep pixel ``i`` iff ``q_i >= theta[pred_i]`` with the *updated* thresholds and the fp32 ``q_i``.

The results are bit-identical to the slow reference (Python lists of float16 scalars and ``np.quantile``):
confidences in [0, 1] have at most 15361 distinct float16 values, so a class's sample set is a histogram over
float16 bit patterns ("codes"), whose order statistics come from cumulative counts; the quantile then repeats
numpy's arithmetic (virtual index ``(n - 1) * q``, floor, ``_lerp``) on those order statistics. The slow
reference itself is ``ias_reference``: the documented definition, which the tests hold ``IAS`` to.

The same histograms, stored per image (``confidence_histograms``), replay IAS exactly for any alpha, beta,
gamma and instance mode without the model (``replay_ias``; used by the notebooks' sliders).

Shapes: ``conf`` float32 ``[B,H,W]`` (max softmax probability), ``pred`` int64 ``[B,H,W]`` (argmax class);
returned labels int64 ``[B,H,W]`` with 255 where ignored.

Why one module over 600 lines: it is the paper's selection component whole — the four policies, the slow
definition of IAS the fast one is tested against, and the histogram replay built on the same float16 code table
and quantile. Splitting them would put the shared exact arithmetic in a third place a reader has to find.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
import torch

from hias_nb.classes import IGNORE
from hias_nb.errors import InputError

__all__ = [
    "NUM_CODES",
    "Selector",
    "IAS",
    "ias_reference",
    "ias_reference_instance",
    "CBST",
    "Constant",
    "NoThreshold",
    "cbst_from_histograms",
    "ClassValues",
    "confidence_histograms",
    "replay_correct",
    "ConfidenceHistogram",
    "replay_ias",
]

NUM_CODES = 15361
"""Float16 bit patterns 0 .. 0x3C00 are exactly the float16 values in [0, 1], in increasing order."""

_CODE_VALUES = np.arange(NUM_CODES, dtype=np.uint16).view(np.float16).astype(np.float64)

Instance = Literal["batch", "image"]


# ---------------------------------------------------------------------------------------------------------------
# Input checks


def _check_inputs(conf, pred, num_classes: int | None, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (conf float32, pred int64) tensors `[B,H,W]` or raise InputError naming what is wrong."""
    conf = torch.as_tensor(conf).detach()  # selection is never differentiated
    pred = torch.as_tensor(pred).detach()
    if conf.dtype != torch.float32:
        raise InputError(f"{where}: conf must be float32 (max softmax probability), got {conf.dtype}")
    if pred.dtype.is_floating_point or pred.dtype.is_complex or pred.dtype == torch.bool:
        raise InputError(f"{where}: pred must be an integer tensor of class ids, got {pred.dtype}")
    if conf.dim() != 3 or conf.shape != pred.shape:
        raise InputError(
            f"{where}: conf and pred must both be [B,H,W] of the same shape, got conf {tuple(conf.shape)} "
            f"and pred {tuple(pred.shape)}"
        )
    if conf.device != pred.device:
        raise InputError(f"{where}: conf is on {conf.device} but pred on {pred.device}")
    if conf.numel() == 0:
        raise InputError(f"{where}: conf and pred are empty (shape {tuple(conf.shape)})")
    pred = pred.long()
    lo, hi = torch.aminmax(pred)
    lo, hi = int(lo), int(hi)
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        bad = lo if lo < 0 else hi
        limit = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
        raise InputError(f"{where}: pred holds class {bad}, outside {limit} (pred must be argmax ids, no 255)")
    lo, hi = torch.aminmax(conf)
    lo, hi = float(lo), float(hi)
    if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
        raise InputError(f"{where}: conf must lie in [0, 1] (softmax probabilities), found range [{lo}, {hi}]")
    return conf, pred


def _check_num_classes(num_classes: int, who: str) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes < IGNORE:
        raise InputError(f"{who} num_classes={num_classes!r}: must be an integer in 1..{IGNORE - 1}")
    return num_classes


def _check_unit(value: float, name: str, who: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise InputError(f"{who} {name}={value!r}: must be in [0, 1]")
    return value


def _check_gamma(gamma: float, who: str) -> float:
    value = float(gamma)
    if not (np.isfinite(value) and value >= 0):
        raise InputError(f"{who} gamma={gamma!r}: must be a finite number >= 0")
    return value


def _check_instance(instance: str, who: str) -> Instance:
    if instance not in ("batch", "image"):
        raise InputError(f"{who} instance={instance!r}: must be 'batch' or 'image'")
    return instance


# ---------------------------------------------------------------------------------------------------------------
# Exact order statistics of float16 samples, per segment (a class of one instance)


def _fp16_codes(conf: torch.Tensor) -> torch.Tensor:
    """Float16 bit patterns of `conf` as int64, same shape; they sort like the float16 values in [0, 1]."""
    codes = conf.to(torch.float16).view(torch.int16).to(torch.int64)
    return codes.clamp_(min=0)  # -0.0 (bit pattern 0x8000, negative as int16) is the value 0


def _histogram(key: torch.Tensor, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sparse histogram of int64 keys in [0, size): (distinct keys ascending, their counts), numpy int64.

    Counted on the keys' device; on the CPU with numpy, whose single-threaded bincount stays fast on a busy
    machine (torch's threaded bincount/nonzero over ~3e5 bins can be 100x slower there).
    """
    if key.device.type == "cpu":
        hist = np.bincount(key.numpy(), minlength=size)
        nz = np.flatnonzero(hist)
        return nz, hist[nz]
    hist = torch.bincount(key, minlength=size)
    nz = torch.nonzero(hist).squeeze(1)
    return nz.cpu().numpy(), hist[nz].cpu().numpy()


class _SortedSamples:
    """Float16 samples of several segments in sorted order, as sparse (code, count) rows.

    Rows are sorted by ``key = segment * NUM_CODES + code``; ``cum`` holds inclusive cumulative counts, so the
    k-th smallest sample of a segment sits in the first row whose ``cum`` exceeds the segment's offset + k.
    """

    def __init__(self, key: np.ndarray, count: np.ndarray, num_segments: int):
        self.key = key
        self.cum0 = np.zeros(len(count) + 1, dtype=np.int64)
        np.cumsum(count, out=self.cum0[1:])
        self.cum = self.cum0[1:]  # inclusive cumulative counts
        bounds = np.searchsorted(key, np.arange(num_segments + 1, dtype=np.int64) * NUM_CODES, side="left")
        self.before = self.cum0[bounds[:-1]]  # samples in earlier segments
        self.count = self.cum0[bounds[1:]] - self.before  # samples in each segment

    @classmethod
    def from_pixels(cls, conf: torch.Tensor, pred: torch.Tensor, num_classes: int) -> _SortedSamples:
        """One instance; segment = class. The histogram is built on the tensors' device."""
        key = pred.reshape(-1) * NUM_CODES + _fp16_codes(conf.reshape(-1))
        return cls(*_histogram(key, num_classes * NUM_CODES), num_classes)

    def rank_below(self, segs: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Number of samples of each segment strictly smaller than the matching float64 value."""
        first_code = np.searchsorted(_CODE_VALUES, values, side="left")  # codes below: values < value
        pos = np.searchsorted(self.key, segs * NUM_CODES + first_code, side="left")
        return self.cum0[pos] - self.before[segs]

    def at_or_above(self, segs: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Number of samples of each segment at or above the matching threshold (what a selection keeps)."""
        return self.count[segs] - self.rank_below(segs, values)

    def kth(self, segs: np.ndarray, k: np.ndarray) -> np.ndarray:
        """The k-th smallest sample (0-based) of each segment, float64; k is clipped to the valid range."""
        k = np.clip(k, 0, np.maximum(self.count[segs] - 1, 0))
        row = np.searchsorted(self.cum, self.before[segs] + k, side="right")
        row = np.minimum(row, max(len(self.cum) - 1, 0))
        return _CODE_VALUES[self.key[row] % NUM_CODES] if len(self.cum) else np.zeros(len(segs))


def _linear_quantile(level: np.ndarray, n: np.ndarray, order_stat: Callable[[np.ndarray], np.ndarray]):
    """numpy's default ("linear") quantile of n sorted values, vectorised over classes, same arithmetic.

    `level` float64 `[C]`, `n` int64 `[C]` (>= 1), `order_stat(j)` the j-th smallest value per class. Mirrors
    ``np.quantile``: virtual index ``(n - 1) * level``, neighbours ``floor`` and ``floor + 1`` (both the last
    value at the top), weight = index - floor, and ``_lerp``'s two-sided formula, so results are bit-identical.
    """
    virtual = (n - 1) * level
    prev = np.floor(virtual)
    top = virtual >= n - 1
    lo = np.where(top, n - 1, prev).astype(np.int64)
    hi = np.where(top, n - 1, lo + 1)
    t = virtual - prev
    a, b = order_stat(lo), order_stat(hi)
    diff = b - a
    out = a + diff * t
    return np.where(t >= 0.5, b - diff * (1 - t), out)  # numpy's _lerp: from the nearer end


def _ias_step(
    theta: np.ndarray, samples: _SortedSamples, segs: np.ndarray, alpha: float, beta: float, gamma: float
) -> np.ndarray:
    """One IAS update (docs/method.md §2.2 steps 1-4): float64 thresholds `[C]` -> updated float64 thresholds `[C]`."""
    # Quantile level per class, with Python floats: the scalar pow of the reference (SIMD pow may differ by 1 ulp).
    level = np.array([1.0 - alpha * t**gamma for t in theta.tolist()], dtype=np.float64)
    m = samples.count[segs]
    r = samples.rank_below(segs, theta)  # where the inserted previous threshold lands in the sorted set

    def order_stat(j: np.ndarray) -> np.ndarray:  # j-th smallest of {theta} U samples
        v = samples.kth(segs, np.where(j > r, j - 1, j))
        return np.where(j == r, theta, v)

    psi = _linear_quantile(level, m + 1, order_stat).astype(np.float32)
    new = beta * theta + (1 - beta) * psi
    new[new >= 1.0] = 0.999
    return new


def _ceil_float32(theta: np.ndarray) -> np.ndarray:
    """Smallest float32 >= each float64 threshold: for float32 q, ``q >= theta`` iff ``q >= _ceil_float32(theta)``."""
    t32 = theta.astype(np.float32)
    low = t32.astype(np.float64) < theta
    t32[low] = np.nextafter(t32[low], np.float32(np.inf))
    return t32


def _select(conf: torch.Tensor, pred: torch.Tensor, theta: np.ndarray) -> torch.Tensor:
    """Keep ``pred`` where ``conf >= theta[pred]`` (compared as numpy would, in float64), else 255."""
    thr = torch.from_numpy(_ceil_float32(theta)).to(conf.device)
    return torch.where(conf >= thr[pred], pred, IGNORE)


# ---------------------------------------------------------------------------------------------------------------
# Policies


class Selector:
    """The interface of every pseudo-label selector (docs/method.md §2.2-2.3).

    ``select(conf, pred)`` returns the labels of one batch: ``pred`` where ``conf >= thresholds[pred]``, else 255
    (a stream-updating selector, IAS, first updates its thresholds with the batch). ``thresholds`` are the current
    thresholds; ``history`` the thresholds after each instance where they evolve along the stream (IAS), else
    None. A ``two_pass`` selector (CBST) must ``observe`` every batch of the split before its first ``select``;
    the others ignore ``observe``. Subclasses define ``thresholds`` and, where they select otherwise, ``_labels``.

    Shapes: ``conf`` float32 `[B,H,W]` in [0, 1], ``pred`` integer `[B,H,W]` in 0..C-1; labels int64 `[B,H,W]`;
    ``thresholds`` float64 `[C]`.
    """

    two_pass: ClassVar[bool] = False
    num_classes: int

    @property
    def thresholds(self) -> torch.Tensor:
        """Current thresholds, float64 `[C]`."""
        raise NotImplementedError

    @property
    def history(self) -> pd.DataFrame | None:
        """Thresholds per instance of a stream-updating selector; None where they do not evolve."""
        return None

    def observe(self, conf: torch.Tensor, pred: torch.Tensor) -> None:
        """First pass of a ``two_pass`` selector: take in one batch (nothing to do for the others)."""

    def select(self, conf: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Labels `[B,H,W]` int64 of one batch: class id or 255 (ignored)."""
        conf, pred = _check_inputs(conf, pred, self.num_classes, f"{type(self).__name__}.select")
        return self._labels(conf, pred)

    def _labels(self, conf: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Labels of checked inputs: keep ``conf >= thresholds[pred]``."""
        return _select(conf, pred, self.thresholds.numpy())


class IAS(Selector):
    """Instance Adaptive Selector (docs/method.md §2.2): exact, fast, and equal to ``ias_reference`` bit for bit.

    ``select`` first updates the thresholds with the batch's instance(s), then keeps the pixels at or above the
    updated thresholds; calls must come in visiting order.

    Args:
        num_classes: C.
        alpha, beta, gamma: keep fraction scale, threshold EMA momentum, hard-class weight-decay exponent.
        init: initial threshold of every class.
        instance: ``"batch"``: each ``select`` call is one instance (the reference, with its batches of 2);
            ``"image"``: each image is one instance, in order (the paper's wording).

    Example::

        ias = IAS(19, alpha=0.5)
        labels = ias.select(conf, pred)  # conf float32 [B,H,W], pred int64 [B,H,W] -> int64 [B,H,W]
        ias.thresholds                   # float64 [19]
    """

    def __init__(
        self,
        num_classes: int,
        alpha: float = 0.2,
        beta: float = 0.9,
        gamma: float = 8.0,
        init: float = 0.9,
        instance: Instance = "batch",
    ):
        who = "IAS"
        self.num_classes = _check_num_classes(num_classes, who)
        self.alpha = _check_unit(alpha, "alpha", who)
        self.beta = _check_unit(beta, "beta", who)
        self.gamma = _check_gamma(gamma, who)
        self.init = _check_unit(init, "init", who)
        self.instance = _check_instance(instance, who)
        self._theta = np.full(num_classes, self.init, dtype=np.float64)
        self._records: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (theta, selected, predicted)

    @property
    def thresholds(self) -> torch.Tensor:
        """Current thresholds, float64 `[C]`."""
        return torch.from_numpy(self._theta.copy())

    def update(self, conf: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """The same as ``select`` (IAS's original verb, kept because user code calls it)."""
        return self.select(conf, pred)

    def _labels(self, conf: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Update the thresholds with this call's instance(s); labels selected with the updated ones."""
        classes = np.arange(self.num_classes)
        labels = torch.empty_like(pred)
        parts = [slice(None)] if self.instance == "batch" else [slice(b, b + 1) for b in range(conf.shape[0])]
        for part in parts:
            samples = _SortedSamples.from_pixels(conf[part], pred[part], self.num_classes)
            self._theta = _ias_step(self._theta, samples, classes, self.alpha, self.beta, self.gamma)
            labels[part] = _select(conf[part], pred[part], self._theta)
            label_ids, label_counts = _histogram(labels[part].reshape(-1), IGNORE + 1)
            selected = np.zeros(self.num_classes, dtype=np.int64)
            is_class = label_ids < self.num_classes  # drop the 255 bin
            selected[label_ids[is_class]] = label_counts[is_class]
            self._records.append((self._theta.copy(), selected, samples.count.copy()))
        return labels

    @property
    def history(self) -> pd.DataFrame:
        """One row per (instance, class): ``instance``, ``class``, ``threshold`` (after the instance's update),
        ``selected_pixels``, ``predicted_pixels``."""
        n, c = len(self._records), self.num_classes
        if n == 0:
            stack = np.zeros((0, c))
            theta, selected, predicted = stack, stack.astype(np.int64), stack.astype(np.int64)
        else:
            theta, selected, predicted = (np.stack(x) for x in zip(*self._records, strict=True))
        return pd.DataFrame(
            {
                "instance": np.repeat(np.arange(n, dtype=np.int64), c),
                "class": np.tile(np.arange(c, dtype=np.int64), n),
                "threshold": theta.reshape(-1).astype(np.float64),
                "selected_pixels": selected.reshape(-1).astype(np.int64),
                "predicted_pixels": predicted.reshape(-1).astype(np.int64),
            }
        )


class CBST(Selector):
    """Class-balanced thresholds (docs/method.md §2.3), exact and without the reference's 1/4 subsampling
    (docs/method.md B13).

    Two passes: ``observe`` every batch, then ``thresholds[c]`` is the ``1 - p`` linear quantile (float64) of all
    float16-rounded confidences predicted as c (1.0 for a class never predicted: the reference crashes there),
    and ``select`` keeps ``conf >= thresholds[pred]``. Memory is one histogram of ``C x 15361`` counts, whatever
    the number of pixels.

    Args:
        num_classes: C.
        p: the fraction of each class's predicted pixels to keep.
    """

    two_pass = True

    def __init__(self, num_classes: int, p: float = 0.2):
        self.num_classes = _check_num_classes(num_classes, "CBST")
        self.p = _check_unit(p, "p", "CBST")
        self._hist = np.zeros(num_classes * NUM_CODES, dtype=np.int64)  # counts per (class, float16 code)
        self._theta: np.ndarray | None = None

    def observe(self, conf: torch.Tensor, pred: torch.Tensor) -> None:
        """Add a batch's float16-rounded confidences to the per-class histograms."""
        conf, pred = _check_inputs(conf, pred, self.num_classes, "CBST.observe")
        key = pred.reshape(-1) * NUM_CODES + _fp16_codes(conf.reshape(-1))
        self._add(*_histogram(key, self.num_classes * NUM_CODES))

    def _add(self, key: np.ndarray, count: np.ndarray) -> None:
        """Add `count` samples at each distinct ``class * NUM_CODES + code`` key (int64 `[K]` each)."""
        self._hist[key] += count
        self._theta = None

    @property
    def thresholds(self) -> torch.Tensor:
        """float64 `[C]`: per class the ``1 - p`` quantile of everything observed (1.0 if never predicted)."""
        if self._theta is None:
            nz = np.flatnonzero(self._hist)
            samples = _SortedSamples(nz, self._hist[nz], self.num_classes)
            classes = np.arange(self.num_classes)
            n = samples.count
            level = np.full(self.num_classes, 1.0 - self.p)
            q = _linear_quantile(level, np.maximum(n, 1), lambda j: samples.kth(classes, j))
            self._theta = np.where(n > 0, q, 1.0)  # never predicted: 1.0
        return torch.from_numpy(self._theta.copy())


def cbst_from_histograms(hist: Mapping[str, np.ndarray] | pd.DataFrame, num_classes: int, p: float = 0.2) -> np.ndarray:
    """CBST thresholds (docs/method.md §2.3, without subsampling) from recorded float16 confidence histograms.

    The rows' counts fill a ``CBST``'s per-class histogram (no sample is expanded), so the result equals
    ``CBST(num_classes, p).thresholds`` after observing the same pixels: per class the ``1 - p`` linear quantile
    of every float16 confidence predicted as that class, 1.0 for a class never predicted.

    Args:
        hist: rows of ``confidence_histograms`` (a mapping or DataFrame with columns ``class``, ``code``,
            ``count``; other columns are ignored), e.g. a pseudo-label folder's ``histograms.parquet``.
        num_classes: C.
        p: the fraction of each class's predicted pixels to keep.

    Returns:
        float64 `[C]`.
    """
    cls, code, count = _histogram_rows(hist, num_classes, ("class", "code", "count"))
    key = cls.astype(np.int64) * NUM_CODES + code
    total = np.bincount(key, weights=count, minlength=num_classes * NUM_CODES)  # exact: integers < 2**53
    nz = np.flatnonzero(total)
    cbst = CBST(num_classes, p)
    cbst._add(nz, total[nz].astype(np.int64))
    return cbst.thresholds.numpy()


class Constant(Selector):
    """One fixed threshold for every class (docs/method.md §2.3 "CT"): keep ``conf >= threshold``.

    Args:
        num_classes: C.
        threshold: the threshold of every class.
    """

    def __init__(self, num_classes: int, threshold: float = 0.9):
        self.num_classes = _check_num_classes(num_classes, "Constant")
        self.threshold = float(threshold)
        if not np.isfinite(self.threshold):
            raise InputError(f"Constant threshold={threshold!r}: must be a finite number")

    @property
    def thresholds(self) -> torch.Tensor:
        """``threshold`` for every class, float64 `[C]`."""
        return torch.full((self.num_classes,), self.threshold, dtype=torch.float64)


class NoThreshold(Selector):
    """Plain argmax, nothing ignored (docs/method.md §2.3 "NT"); ``thresholds`` are zeros (every ``conf >= 0``).

    Args:
        num_classes: C.
    """

    def __init__(self, num_classes: int):
        self.num_classes = _check_num_classes(num_classes, "NoThreshold")

    @property
    def thresholds(self) -> torch.Tensor:
        """Zeros, float64 `[C]`."""
        return torch.zeros(self.num_classes, dtype=torch.float64)

    def _labels(self, conf: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        return pred.clone()


# ---------------------------------------------------------------------------------------------------------------
# IAS written plainly: the definition the fast IAS is tested against


def ias_reference_instance(
    theta: np.ndarray, conf: np.ndarray, pred: np.ndarray, num_classes: int, alpha: float, beta: float, gamma: float
) -> tuple[np.ndarray, np.ndarray]:
    """One IAS instance written plainly (docs/method.md §2.2): the method's formula, slow (lists, per pixel).

    For each class c, with the instance's confidences ``q_i`` of the pixels predicted c::

        S_c     = [theta_c] + [float16(q_i) for i with pred_i == c]     (the old threshold is one sample)
        psi_c   = float32(np.quantile(S_c, 1 - alpha * theta_c**gamma))  (numpy's default "linear" quantile)
        theta_c = beta * theta_c + (1 - beta) * psi_c,  then theta_c >= 1 -> 0.999  (no lower clip)

    and pixel i keeps ``pred_i`` iff its float32 ``q_i >= theta[pred_i]`` with the *updated* thresholds (compared
    as numpy does, in float64), else 255. ``IAS`` computes exactly this, bit for bit, from histograms.

    Args:
        theta: thresholds before the instance, float64 `[C]` (not modified).
        conf: max softmax probability, float32 numpy `[B,H,W]` (or any shape matching `pred`).
        pred: argmax class ids 0..C-1, integer numpy, same shape.
        num_classes, alpha, beta, gamma: as ``IAS``.

    Returns:
        (updated thresholds float64 `[C]`, labels int64 shaped like `pred`).
    """
    conf16 = conf.astype(np.float16).ravel()
    flat_pred = pred.ravel()
    psi = np.zeros(num_classes, dtype=np.float32)
    for c in range(num_classes):
        samples = [theta[c]]
        samples.extend(conf16[flat_pred == c])
        psi[c] = np.quantile(samples, 1 - alpha * theta[c] ** gamma)
    theta = beta * theta + (1 - beta) * psi
    theta[theta >= 1] = 0.999
    labels = np.empty(pred.size, dtype=np.int64)
    for i, (q, p) in enumerate(zip(conf.ravel(), flat_pred, strict=True)):
        labels[i] = p if q >= theta[p] else IGNORE  # fp32 q against float64 theta, as numpy compares
    return theta, labels.reshape(pred.shape)


def ias_reference(
    conf: np.ndarray,
    pred: np.ndarray,
    num_classes: int,
    alpha: float,
    beta: float,
    gamma: float,
    init: float,
    instance: Instance,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """IAS over a stream of images in visiting order, written plainly (``ias_reference_instance`` per instance).

    Instances are groups of ``batch_size`` consecutive images (the last may be smaller) or, for
    ``instance="image"``, single images; every threshold starts at ``init``.

    Args:
        conf: float32 numpy `[N,H,W]`; pred: integer numpy `[N,H,W]`, class ids 0..C-1.
        num_classes, alpha, beta, gamma, init, instance: as ``IAS``.
        batch_size: images per instance when ``instance="batch"``.

    Returns:
        (thresholds after each instance float64 `[n_instances, C]`, labels int64 `[N,H,W]`).
    """
    theta = np.full(num_classes, init, dtype=np.float64)
    size = 1 if instance == "image" else batch_size
    thetas, labels = [], []
    for s in range(0, len(conf), size):
        theta, lab = ias_reference_instance(
            theta, conf[s : s + size], pred[s : s + size], num_classes, alpha, beta, gamma
        )
        thetas.append(theta.copy())
        labels.append(lab)
    return np.stack(thetas), np.concatenate(labels)


# ---------------------------------------------------------------------------------------------------------------
# Class values


class ClassValues:
    """Class value ``v_c`` (docs/method.md §2.6): EMA over instances of the mean fp32 confidence of selected pixels.

    ``update(conf, labels)`` per instance: ``m_c`` = mean ``conf`` over pixels whose selected label is c
    (computed in float64); classes without such pixels are skipped; ``v_c <- m_c`` the first time
    (``v_c == 0``), else ``v_c <- gamma * v_c + (1 - gamma) * m_c``. ``values`` float64 `[C]`, 0 = never set.

    Args:
        num_classes: C.
        gamma: EMA momentum of the class values.
    """

    def __init__(self, num_classes: int, gamma: float = 0.99):
        self.num_classes = _check_num_classes(num_classes, "ClassValues")
        self.gamma = _check_unit(gamma, "gamma", "ClassValues")
        self._values = np.zeros(num_classes, dtype=np.float64)

    @property
    def values(self) -> torch.Tensor:
        return torch.from_numpy(self._values.copy())

    def update(self, conf: torch.Tensor, labels: torch.Tensor) -> None:
        """`conf` float32 `[B,H,W]`, `labels` int `[B,H,W]` in 0..C-1 or 255."""
        conf, labels = torch.as_tensor(conf).detach(), torch.as_tensor(labels).detach()
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise InputError(f"ClassValues.update: labels must be an integer tensor, got {labels.dtype}")
        if conf.shape != labels.shape or conf.device != labels.device:
            raise InputError(
                f"ClassValues.update: conf {tuple(conf.shape)} on {conf.device} and labels "
                f"{tuple(labels.shape)} on {labels.device} must match"
            )
        labels = labels.reshape(-1).long()
        valid = labels != IGNORE
        if labels.numel() and bool(((labels < 0) | (labels >= self.num_classes))[valid].any()):
            raise InputError(f"ClassValues.update: labels must be 0..{self.num_classes - 1} or {IGNORE}")
        lab = labels[valid]
        sums = torch.bincount(lab, weights=conf.reshape(-1)[valid].double(), minlength=self.num_classes)
        counts = torch.bincount(lab, minlength=self.num_classes)
        sums, counts = sums.cpu().numpy(), counts.cpu().numpy()
        seen = counts > 0
        m = sums[seen] / counts[seen]
        v = self._values[seen]
        self._values[seen] = np.where(v == 0, m, self.gamma * v + (1 - self.gamma) * m)


# ---------------------------------------------------------------------------------------------------------------
# Replay from per-image histograms (notebook sliders)


def confidence_histograms(
    conf: torch.Tensor, pred: torch.Tensor, first_image: int = 0, gt: torch.Tensor | None = None
) -> dict[str, np.ndarray]:
    """Sparse per-image, per-class histograms of float16 confidence codes of one batch.

    Returns columns ``image`` (int32, ``first_image + b``), ``class`` (int16), ``code`` (int16: the float16 bit
    pattern of the confidence, 0..15360), ``count`` (int32), sorted by (image, class, code), zero counts
    omitted: ``pd.DataFrame(rows)`` appends to Parquet as is. Enough to replay IAS exactly (``replay_ias``).
    With `gt`, also ``correct`` (int32): how many of the row's pixels the ground truth labels with the predicted
    class, so a replay can report the precision and recall of any α, β, γ (``replay_correct``) — a diagnostic,
    never an input of the selection.

    Args:
        conf: float32 `[B,H,W]`, max softmax probability; pred: integer `[B,H,W]`, argmax class ids.
        first_image: the ``image`` index of ``conf[0]`` (the batch's position in the stream).
        gt: integer `[B,H,W]` ground truth (255 = unlabelled: never correct), or None.
    """
    conf, pred = _check_inputs(conf, pred, None, "confidence_histograms")
    if gt is not None and tuple(gt.shape) != tuple(pred.shape):
        raise InputError(f"confidence_histograms: gt {tuple(gt.shape)} and pred {tuple(pred.shape)} differ in shape")
    num_classes = int(pred.max()) + 1
    out: dict[str, list[np.ndarray]] = {"image": [], "class": [], "code": [], "count": []}
    if gt is not None:
        out["correct"] = []
    for b in range(conf.shape[0]):  # one bincount per image: bins grow with C, not with the batch
        key = pred[b].reshape(-1) * NUM_CODES + _fp16_codes(conf[b].reshape(-1))
        nz, cnt = _histogram(key, num_classes * NUM_CODES)
        out["image"].append(np.full(len(nz), first_image + b, dtype=np.int32))
        out["class"].append((nz // NUM_CODES).astype(np.int16))
        out["code"].append((nz % NUM_CODES).astype(np.int16))
        out["count"].append(cnt.astype(np.int32))
        if gt is not None:  # the right pixels' keys: a subset of the image's, so their bins are among `nz`
            r_nz, r_cnt = _histogram(key[(pred[b] == gt[b].to(pred.device)).reshape(-1)], num_classes * NUM_CODES)
            correct = np.zeros(len(nz), dtype=np.int32)
            correct[np.searchsorted(nz, r_nz)] = r_cnt
            out["correct"].append(correct)
    return {k: np.concatenate(v) for k, v in out.items()}


class ConfidenceHistogram:
    """Recorded per-image histograms (rows of ``confidence_histograms``), prepared for fast IAS replays.

    ``rows``: a mapping or DataFrame with columns ``image``, ``class``, ``code``, ``count``. Images are taken in
    the order of their first row (the generation order when batches were appended in order); ``image`` may be
    an index or a name. The grouping into instances is prepared once per (instance, batch_size) and cached, so
    repeated ``replay_ias`` calls (slider redraws) only pay the per-instance loop.

    Args:
        rows: the histogram rows described above.
        num_classes: C.
    """

    def __init__(self, rows: Mapping[str, np.ndarray] | pd.DataFrame, num_classes: int):
        self.num_classes = _check_num_classes(num_classes, "ConfidenceHistogram")
        image, cls, code, count = _histogram_rows(rows, num_classes, ("image", "class", "code", "count"))
        position, self.images = _image_positions(image)  # images in recorded order
        # key = (position * C + class) * NUM_CODES + code, built in place in one int64 array
        key = position
        key *= num_classes
        key += cls
        key *= NUM_CODES
        key += code
        correct = np.asarray(rows["correct"], dtype=np.float64) if "correct" in rows else None
        if correct is not None and np.isnan(correct).any():  # some batches recorded without labels: none count
            correct = None
        correct = None if correct is None else correct.astype(np.int64)
        if len(key) > 1 and np.any(key[1:] < key[:-1]):
            order = np.argsort(key, kind="stable")
            key, count = key[order], count[order]
            correct = None if correct is None else correct[order]
        self._key, self._count, self._correct = key, count, correct
        self._cache: dict[tuple[int, bool], tuple[_SortedSamples, int]] = {}

    @property
    def has_correct(self) -> bool:
        """Whether the rows carry ground-truth ``correct`` counts (recorded with labels)."""
        return self._correct is not None

    @property
    def num_images(self) -> int:
        return len(self.images)

    def instances(self, instance: Instance, batch_size: int, correct: bool = False) -> tuple[_SortedSamples, int]:
        """Samples with segment = instance * C + class, and the number of instances (cached per group size).
        With `correct`, only the pixels the ground truth confirms (rows' ``correct`` counts), same segments."""
        size = 1 if instance == "image" else batch_size
        if correct and self._correct is None:
            raise InputError("histogram rows: no 'correct' column (generated without ground truth)")
        if (size, correct) not in self._cache:
            key, count = self._key, self._correct if correct else self._count
            if size > 1:  # group images; a group's rows are sorted runs, which a stable sort merges quickly
                per_image = self.num_classes * NUM_CODES
                key = key // per_image // size * per_image + key % per_image
                order = np.argsort(key, kind="stable")
                key, count = key[order], count[order]
            n = -(-self.num_images // size)
            self._cache[(size, correct)] = (_SortedSamples(key, count, n * self.num_classes), n)
        return self._cache[(size, correct)]


def _histogram_rows(
    rows: Mapping[str, np.ndarray] | pd.DataFrame, num_classes: int, columns: tuple[str, ...]
) -> list[np.ndarray]:
    """The named columns of histogram rows as numpy arrays, checked: present, classes in 0..C-1, codes float16
    bit patterns of [0, 1], counts positive."""
    missing = [c for c in columns if c not in rows]
    if missing:
        raise InputError(f"histogram rows: missing column(s) {missing}; expected {', '.join(columns)}")
    cls, code, count = (np.asarray(rows[c]) for c in ("class", "code", "count"))
    if len(cls) and (cls.min() < 0 or cls.max() >= num_classes):
        raise InputError(f"histogram rows: class ids must be in 0..{num_classes - 1}")
    if len(code) and (code.min() < 0 or code.max() >= NUM_CODES):
        raise InputError(f"histogram rows: code must be a float16 bit pattern in 0..{NUM_CODES - 1}")
    if len(count) and count.min() <= 0:
        raise InputError("histogram rows: count must be positive")
    return [np.asarray(rows[c]) for c in columns]


def _image_positions(image: np.ndarray) -> tuple[np.ndarray, pd.Index]:
    """Position of each row's image in the order of first appearance (int64), and the images in that order."""
    if len(image) == 0:
        return np.zeros(0, dtype=np.int64), pd.Index([])
    starts = np.flatnonzero(image[1:] != image[:-1]) + 1
    heads = image[np.concatenate([[0], starts])]
    _, names = pd.factorize(heads)
    if len(names) == len(heads):  # each image's rows are contiguous (as appended batch by batch)
        lengths = np.diff(np.concatenate([[0], starts, [len(image)]]))
        return np.repeat(np.arange(len(heads), dtype=np.int64), lengths), pd.Index(names)
    position, names = pd.factorize(image)
    return position.astype(np.int64), pd.Index(names)


def replay_ias(
    hist: ConfidenceHistogram | Mapping[str, np.ndarray] | pd.DataFrame,
    num_classes: int,
    alpha: float,
    beta: float,
    gamma: float,
    init: float = 0.9,
    instance: Instance = "batch",
    batch_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Replay IAS on recorded histograms: ``(thresholds [n_instances, C] float64, selected [n_instances, C])``.

    Instances are groups of ``batch_size`` consecutive images in the recorded order (the last group may be
    smaller, like a DataLoader's last batch), or single images for ``instance="image"``. ``thresholds[i]`` is
    identical to ``IAS.thresholds`` after the i-th instance of the same stream. ``selected`` counts the pixels
    with ``fp16(q) >= theta`` at float16 resolution: the real selection compares the fp32 ``q``, so pixels
    within one float16 step (2**-11 in [0.5, 1)) below a threshold may count here but be ignored by IAS.
    Pass a ``ConfidenceHistogram`` to reuse its prepared grouping across calls.

    Args:
        hist: rows of ``confidence_histograms`` (e.g. ``histograms.parquet``) or a prepared ``ConfidenceHistogram``.
        num_classes, alpha, beta, gamma, init, instance: as ``IAS``.
        batch_size: images per instance when ``instance="batch"`` (the generation's ``batch_size``).
    """
    who = "replay_ias"
    alpha, beta, init = _check_unit(alpha, "alpha", who), _check_unit(beta, "beta", who), _check_unit(init, "init", who)
    gamma = _check_gamma(gamma, who)
    instance = _check_instance(instance, who)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"{who} batch_size={batch_size!r}: must be a positive integer")
    if not isinstance(hist, ConfidenceHistogram):
        hist = ConfidenceHistogram(hist, num_classes)
    elif hist.num_classes != num_classes:
        raise InputError(f"{who}: histogram has {hist.num_classes} classes, num_classes={num_classes}")
    samples, n = hist.instances(instance, batch_size)
    thresholds = np.empty((n, num_classes), dtype=np.float64)
    selected = np.empty((n, num_classes), dtype=np.int64)
    theta = np.full(num_classes, init, dtype=np.float64)
    classes = np.arange(num_classes, dtype=np.int64)
    for i in range(n):
        segs = i * num_classes + classes
        theta = _ias_step(theta, samples, segs, alpha, beta, gamma)
        thresholds[i] = theta
        selected[i] = samples.at_or_above(segs, theta)
    return thresholds, selected


def replay_correct(
    hist: ConfidenceHistogram, thresholds: np.ndarray, instance: Instance = "batch", batch_size: int = 2
) -> np.ndarray:
    """``[n_instances, C]``: of the pixels a replay selects (``replay_ias``'s `thresholds`, same `instance` and
    `batch_size`), how many the ground truth confirms; needs histograms recorded with ``gt``. Summed over
    instances and divided by ``replay_ias``'s ``selected`` it is the selection's per-class precision, divided
    by the ground-truth pixels of the class its recall. Same float16 resolution as ``selected``."""
    samples, n = hist.instances(_check_instance(instance, "replay_correct"), batch_size, correct=True)
    if thresholds.shape != (n, hist.num_classes):
        raise InputError(f"replay_correct: thresholds {thresholds.shape}, expected {(n, hist.num_classes)}")
    classes = np.arange(hist.num_classes, dtype=np.int64)
    out = np.empty((n, hist.num_classes), dtype=np.int64)
    for i in range(n):
        segs = i * hist.num_classes + classes
        out[i] = samples.at_or_above(segs, thresholds[i])
    return out
