"""HPLA — hard-aware pseudo-label augmentation (copy-paste of hard-class pixels between target images).

Provenance: HIAST (Zhu et al., TPAMI 2025, arXiv 2302.06992); docs/method.md §3 (3.1 hard classes, 3.2
sampling probabilities, 3.3 donor lists, 3.4 paste procedure, 3.5 order) and section 9.1 (B1-B5).

Per training round, from the statistics of that round's pseudo-label generation:

1. ``hard_classes``: the K classes with the smallest class value ``v_c`` (mean confidence of their pseudo-
   labelled pixels) are *hard*; class c is drawn with probability ``(1 − v_c)^2`` normalised over them.
2. ``donor_lists``: for each class, the images whose pseudo-label contains it, minus the 10% with the fewest
   pixels of it.
3. ``HPLA(...)(image, label)``: draw a hard class, draw a donor image containing it, and paste **all** of the
   donor's hard-class pixels (not only the drawn class, B2) at the same positions into the recipient.

Fixes relative to the published code (docs/method.md §11.2): classes excluded by the protocol (SYNTHIA's 9, 14, 16)
get probability 0 instead of NaN (B3); classes without donors are skipped instead of crashing or looping
forever (B4); donors of another size are resized to the recipient (B5). ``mode="reference"`` pastes exactly
one donor, as the published code does in effect (B1); ``mode="intended"`` follows its comment: up to
``max_donors`` donors, each drawn for a hard class not yet covered, until half the hard classes are covered.

HPLA runs on the full-resolution image before the weak/strong views are made; the returned provenance map
(donor class id where pasted, 255 elsewhere) is a label-like map that must go through the same geometric
transform as the label.

Randomness comes only from the ``torch.Generator`` given to ``HPLA`` (a CPU generator). With
``generator=None`` torch's global generator is used; that is the right choice inside DataLoader workers,
which torch seeds differently per worker, whereas a generator object is copied with the same state into
every worker (B7): there, re-seed it per worker in ``worker_init_fn``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hias_nb.classes import IGNORE
from hias_nb.errors import InputError

__all__ = ["MODES", "hard_classes", "donor_lists", "drawable_classes", "draw_probabilities", "Draw", "HPLA"]

MODES: tuple[str, ...] = ("reference", "intended")


def _float64_cpu(values: np.ndarray | torch.Tensor | Sequence[float]) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to(device="cpu", dtype=torch.float64)
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def hard_classes(
    class_values: np.ndarray | torch.Tensor | Sequence[float], num_hard: int, ignored: Iterable[int] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """The hard classes and their sampling probabilities (docs/method.md §3.1, 3.2).

    Args:
        class_values: ``[C]`` class values ``v_c`` (numpy, torch or a sequence); lower means harder.
        num_hard: K, how many classes are hard (14 in HIAST).
        ignored: classes that are never hard, whatever their value (SYNTHIA's ``(9, 14, 16)``, B3).
    Returns:
        ``hard``: int64 ``[K']`` on the CPU, the ``K' = min(K, #eligible)`` eligible classes with the smallest
        values, ascending; ties keep class order (stable sort).
        ``probs``: float64 ``[C]`` on the CPU, ``(1 − v_c)^2`` normalised over ``hard`` and 0 elsewhere, so
        it sums to 1 whenever ``hard`` is not empty. If every hard class has weight 0 (all ``v_c = 1``),
        the probabilities fall back to uniform over ``hard``.
    Raises:
        ValueError: ``num_hard < 0``, ``class_values`` not 1-D, or a non-finite value for an eligible class.

    Example:
        >>> hard, probs = hard_classes([0.9, 0.5, 0.7, 0.5], num_hard=2)
        >>> hard.tolist(), probs.tolist()  # weights 0.25 and 0.25 for classes 1 and 3
        ([1, 3], [0.0, 0.5, 0.0, 0.5])
    """
    values = _float64_cpu(class_values)
    if values.dim() != 1:
        raise ValueError(f"class_values must be 1-D [C], got shape {tuple(values.shape)}")
    if num_hard < 0:
        raise ValueError(f"num_hard must be >= 0, got {num_hard}")
    num_classes = values.numel()
    eligible = torch.ones(num_classes, dtype=torch.bool)
    for c in ignored:
        if 0 <= c < num_classes:
            eligible[c] = False
    bad = (eligible & ~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"class_values must be finite for every class that may be hard; not for classes {bad}")

    candidates = eligible.nonzero().flatten()
    order = torch.sort(values[candidates], stable=True).indices
    hard = candidates[order[:num_hard]].to(torch.int64)

    probs = torch.zeros(num_classes, dtype=torch.float64)
    weights = (1.0 - values[hard]) ** 2
    if hard.numel() > 0:
        total = weights.sum()
        probs[hard] = weights / total if total > 0 else torch.full_like(weights, 1.0 / hard.numel())
    return hard, probs


def donor_lists(
    samples_with_class: Mapping[int, Sequence[tuple[str, int]]], drop_fraction: float = 0.1
) -> dict[int, list[str]]:
    """Donor images per class (docs/method.md §3.3).

    Args:
        samples_with_class: ``{class_id: [(image_name, pixel_count), ...]}`` as written by pseudo-label
            generation. String class keys (JSON) are converted to int; pairs may be lists.
        drop_fraction: share of images with the fewest pixels of the class to drop.
    Returns:
        ``{class_id: [image_name, ...]}``: sorted by pixel count ascending (stable), the first
        ``round(drop_fraction · n)`` dropped. Python's ``round`` rounds half to even, as the reference does,
        so lists of <= 5 images keep everything and 25 images lose 2. Names are kept exactly as given.
    """
    if not 0.0 <= drop_fraction < 1.0:
        raise ValueError(f"drop_fraction must be in [0, 1), got {drop_fraction}")
    lists: dict[int, list[str]] = {}
    for c, samples in samples_with_class.items():
        ranked = sorted(samples, key=lambda sample: sample[1])  # sorted() is stable
        lists[int(c)] = [str(name) for name, _ in ranked[round(drop_fraction * len(ranked)) :]]
    return lists


def drawable_classes(
    hard: torch.Tensor | Sequence[int], probs: torch.Tensor | Sequence[float], donors: Mapping[int, Sequence[str]]
) -> list[int]:
    """The hard classes a draw can pick (B4): those with at least one donor image and a non-zero probability,
    in the order of `hard`. A hard class without donors (no image keeps enough of its pixels, e.g. a class
    with no pseudo-labelled pixel, whose class value 0 gives it the largest weight) is never drawn."""
    p = _float64_cpu(probs).flatten()
    return [int(c) for c in torch.as_tensor(hard).flatten().tolist() if donors.get(int(c)) and float(p[int(c)]) > 0]


def draw_probabilities(
    hard: torch.Tensor | Sequence[int], probs: torch.Tensor | Sequence[float], donors: Mapping[int, Sequence[str]]
) -> torch.Tensor:
    """float64 ``[C]``: the probability with which HPLA's first draw picks each class — ``probs`` (from
    `hard_classes`) restricted to the `drawable_classes` and renormalised, 0 elsewhere; all 0 when no class is
    drawable (nothing is pasted). This, not ``probs``, is what ``HPLA`` samples from (docs/method.md §3.2, B4)."""
    p = _float64_cpu(probs).flatten()
    out = torch.zeros_like(p)
    drawable = drawable_classes(hard, p, donors)
    if drawable:
        out[drawable] = p[drawable] / p[drawable].sum()
    return out


@dataclass(frozen=True)
class Draw:
    """One paste of an HPLA call: the drawn hard class, the donor image and the hard classes it pasted."""

    cls: int
    donor: str
    pasted: tuple[int, ...]


class HPLA:
    """The HPLA paste procedure (docs/method.md §3.4), applied to one full-resolution target sample.

    Args:
        hard: int64 ``[K]`` hard classes (from ``hard_classes``).
        probs: float64 ``[C]`` class sampling probabilities (from ``hard_classes``).
        donors: ``{class_id: [image_name, ...]}`` (from ``donor_lists``).
        load_donor: ``name -> (image uint8 [3,H',W'], label int64 [H',W'])``, the donor's image and
            pseudo-label (255 = ignored).
        mode: ``"reference"`` pastes exactly one donor (B1); ``"intended"`` up to ``max_donors`` donors until
            at least half of the hard classes are covered by pasted pixels.
        max_donors: the donor limit of ``"intended"`` mode (3 in the published comment).
        generator: a CPU ``torch.Generator`` for the class and donor draws; None uses torch's global one.

    Calling it with ``image [3,H,W] uint8`` and ``label [H,W] int64`` returns new tensors
    ``(image, label, provenance)``, where ``provenance [H,W] int64`` holds the pasted donor class where a
    pixel was pasted and 255 elsewhere; the inputs are not modified. ``last_draws`` then lists the ``Draw``
    of each paste of that call (empty when nothing could be drawn), for the notebooks' preview.

    Example:
        >>> hard, probs = hard_classes(values, 14)
        >>> rng = torch.Generator().manual_seed(0)
        >>> hpla = HPLA(hard, probs, donor_lists(stats), load_donor, generator=rng)
        >>> image, label, provenance = hpla(image, label)
    """

    def __init__(
        self,
        hard: torch.Tensor | Sequence[int],
        probs: torch.Tensor | np.ndarray | Sequence[float],
        donors: Mapping[int, Sequence[str]],
        load_donor: Callable[[str], tuple[torch.Tensor, torch.Tensor]],
        mode: str = "reference",
        max_donors: int = 3,
        generator: torch.Generator | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(repr(m) for m in MODES)}")
        if max_donors < 1:
            raise ValueError(f"max_donors must be >= 1, got {max_donors}")
        self.hard = torch.as_tensor(hard, dtype=torch.int64).cpu().flatten()
        self.probs = _float64_cpu(probs).flatten()
        if self.hard.numel() and int(self.hard.max()) >= self.probs.numel():
            raise ValueError(f"hard class {int(self.hard.max())} has no entry in probs [{self.probs.numel()}]")
        self.donors = {int(c): list(names) for c, names in donors.items()}
        self.load_donor = load_donor
        self.mode = mode
        self.max_donors = max_donors
        self.generator = generator
        self.last_draws: list[Draw] = []
        self.eligible: list[int] = drawable_classes(self.hard, self.probs, self.donors)  # B4

    def _draw_class(self, candidates: list[int]) -> int:
        """A class from ``probs`` restricted and renormalised to ``candidates`` (docs/method.md §3.2)."""
        weights = self.probs[candidates]
        return candidates[int(torch.multinomial(weights, 1, generator=self.generator))]

    def _draw_donor(self, cls: int) -> str:
        names = self.donors[cls]
        return names[int(torch.randint(len(names), (1,), generator=self.generator))]

    def _load(self, name: str, size: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Load a donor and bring it to the recipient's size: image bilinear, label nearest (B5 fixed)."""
        image, label = self.load_donor(name)
        image, label = torch.as_tensor(image), torch.as_tensor(label)
        if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise InputError(f"{name}: donor image must be uint8 [3,H,W], got {image.dtype} {tuple(image.shape)}")
        if tuple(label.shape) != tuple(image.shape[1:]):
            raise InputError(
                f"{name}: donor label shape {tuple(label.shape)} does not match its image {tuple(image.shape[1:])}"
            )
        image, label = image.to(device), label.to(device=device, dtype=torch.int64)
        if tuple(label.shape) != size:
            image = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
            image = image.round().clamp(0, 255).to(torch.uint8)
            label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].to(torch.int64)
        return image, label

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Paste hard-class pixels of donor(s) into ``image [3,H,W] uint8`` / ``label [H,W] int64``.

        Returns ``(image, label, provenance)``, new tensors of the same shapes; ``provenance`` is the pasted
        class id where pasted, 255 elsewhere.
        """
        if image.dim() != 3 or tuple(image.shape[1:]) != tuple(label.shape):
            raise ValueError(f"expected image [3,H,W] and label [H,W], got {tuple(image.shape)}, {tuple(label.shape)}")
        image, label = image.clone(), label.to(torch.int64, copy=True)
        provenance = torch.full_like(label, IGNORE, dtype=torch.int64)
        size = (label.shape[0], label.shape[1])
        hard = self.hard.to(label.device)
        self.last_draws = []
        covered: set[int] = set()

        for _ in range(self.max_donors if self.mode == "intended" else 1):
            # Reference: any eligible class (S = H). Intended: only classes not yet covered by pasted pixels.
            candidates = [c for c in self.eligible if c not in covered]
            if not candidates:
                break
            cls = self._draw_class(candidates)
            name = self._draw_donor(cls)
            donor_image, donor_label = self._load(name, size, image.device)

            # B2: every hard class of the donor is pasted, not only the drawn one; 255 is never hard.
            paste = torch.isin(donor_label, hard)
            image[:, paste] = donor_image[:, paste]
            label[paste] = donor_label[paste]
            provenance[paste] = donor_label[paste]

            pasted = tuple(int(c) for c in torch.unique(donor_label[paste]).tolist())
            self.last_draws.append(Draw(cls=cls, donor=name, pasted=pasted))
            covered.update(pasted)
            if 2 * len(covered) >= len(self.hard):
                break
        return image, label, provenance
