"""Self-training losses of HIAST: pseudo-label CE, region-adaptive regularisation, consistency.

Provenance: HIAST (Zhu et al., TPAMI 2025, arXiv 2302.06992) and IAST (Mei et al., ECCV 2020); docs/method.md
§4 (CE, R_c, R_i), §5.3 (consistency) and B10. Notation follows docs/method.md:
``p = softmax(z)`` is the student's prediction on the strong view, ``ŷ`` the pseudo-label (255 = ignored),
``Ω_c = {i : ŷ_i ≠ 255}`` the confident region, ``Ω_ig = {i : ŷ_i = 255}`` the ignored region, ``q`` the
teacher's probabilities on the weak view, ``C`` the number of classes.

Two normalisations are offered (docs/method.md §11.1):

- ``"reference"`` (default) reproduces the published code, whose weights (λ_c = 0.1, λ_i = 1.0, λ_cst = 0.5)
  only make sense with it:
  ``R_c  = Σ_{i∈Ω_c}  Σ_c −(1/C)·log p_ic  / (C·N_c)``;
  ``R_i  = Σ_{i∈Ω_ig} Σ_c −p_ic·log p_ic   / (C·N_ig)``;
  ``L_cst = Σ_{i∈Ω, c} −q_ic·log p_ic / #{(i, c) : i∈Ω, −q_ic·log p_ic ≠ 0}`` (data dependent: the count
  of non-zero terms, usually ≈ C·N but smaller where q underflows to 0 or p rounds to 1).
- ``"pixel"``: the same sums divided by the region's pixel count N, i.e. per-pixel means.

Unlike the published code, a term whose region is empty is exactly 0 (not 0/0 = NaN, B10), and it still
carries a graph so that ``.backward()`` works. Everything is computed in (at least) float32 even under
autocast: ``log_softmax`` of fp16 logits loses the small probabilities that these terms are made of. (Under
autocast the elementwise ops used here are not down-cast, so casting the logits once is enough.)

`region_regularization_maps` and ``consistency(..., reduction="none")`` return the unnormalised per-pixel
values that the scalar losses sum, for display in the notebooks; each scalar equals its map's sum divided by
the normaliser above. ``loss_maps`` (at the end) computes them for a student and a teacher on the views of a
training step (``self_train.round_views``), already normalised, and ``total_loss_map`` weights them with the λ of a
round.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hias_nb import augment
from hias_nb.classes import IGNORE
from hias_nb.errors import InputError

__all__ = [
    "NORMALISATIONS",
    "REGIONS",
    "region_mask",
    "safe_divide",
    "target_cross_entropy",
    "region_regularization_maps",
    "region_regularization",
    "consistency",
    "LOSS_TERMS",
    "loss_maps",
    "total_loss_map",
]

NORMALISATIONS: tuple[str, ...] = ("reference", "pixel")
REGIONS: tuple[str, ...] = ("ignored", "confident", "all")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(repr(a) for a in allowed)}")


def _check_shapes(logits: torch.Tensor, pseudo_label: torch.Tensor) -> None:
    if logits.dim() != 4:
        raise ValueError(f"logits must be [B,C,H,W], got shape {tuple(logits.shape)}")
    b, _, h, w = logits.shape
    if tuple(pseudo_label.shape) != (b, h, w):
        raise ValueError(f"pseudo_label must be [B,H,W] = {(b, h, w)} to match logits, got {tuple(pseudo_label.shape)}")


def _check_teacher(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> None:
    if teacher_probs.shape != student_logits.shape:
        raise ValueError(
            f"teacher_probs must have the student logits' shape {tuple(student_logits.shape)}, "
            f"got {tuple(teacher_probs.shape)}"
        )


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast fp16/bf16 to fp32; float64 stays float64 (the tests compare against float64 loops)."""
    return x if x.dtype == torch.float64 else x.float()


def safe_divide(total: torch.Tensor, count: torch.Tensor | int | float) -> torch.Tensor:
    """``total / count``, or exactly 0 (keeping ``total``'s graph) when ``count`` is 0.

    An empty region makes ``total`` an empty sum, i.e. exactly 0, so dividing by ``max(count, 1)`` gives 0
    and a zero gradient instead of the published code's NaN.
    """
    count = torch.as_tensor(count, dtype=total.dtype, device=total.device)
    return total / count.clamp(min=1)


def region_mask(pseudo_label: torch.Tensor, region: str, ignore_index: int = 255) -> torch.Tensor:
    """Boolean mask ``[B,H,W]``: ``"confident"`` (ŷ ≠ ignore), ``"ignored"`` (ŷ = ignore) or ``"all"``."""
    _check_choice("region", region, REGIONS)
    if region == "confident":
        return pseudo_label != ignore_index
    if region == "ignored":
        return pseudo_label == ignore_index
    return torch.ones_like(pseudo_label, dtype=torch.bool)


def target_cross_entropy(logits: torch.Tensor, pseudo_label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Pseudo-label cross-entropy, mean over the confident region (docs/method.md §4, ``target_seg_loss``).

    Args:
        logits: student logits ``[B,C,H,W]``.
        pseudo_label: int64 ``[B,H,W]``, ``ignore_index`` where ignored.
    Returns:
        scalar ``(1/N_c) Σ_{i∈Ω_c} −log p_{i,ŷ_i}``; exactly 0 (with a graph) when Ω_c is empty.
    """
    _check_shapes(logits, pseudo_label)
    per_pixel = F.cross_entropy(_at_least_fp32(logits), pseudo_label, ignore_index=ignore_index, reduction="none")
    confident = pseudo_label != ignore_index
    return safe_divide(per_pixel[confident].sum(), confident.sum())


def region_regularization_maps(
    logits: torch.Tensor, pseudo_label: torch.Tensor, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel R_c and R_i before normalisation (docs/method.md §4).

    Args:
        logits: student logits ``[B,C,H,W]``.
        pseudo_label: int64 ``[B,H,W]``.
    Returns:
        ``kld_map [B,H,W]`` = ``Σ_c −(1/C)·log p_ic`` on Ω_c, 0 elsewhere;
        ``entropy_map [B,H,W]`` = ``Σ_c −p_ic·log p_ic`` on Ω_ig, 0 elsewhere.
        float32 (float64 for float64 logits).
    """
    _check_shapes(logits, pseudo_label)
    log_p = F.log_softmax(_at_least_fp32(logits), dim=1)
    confident = pseudo_label != ignore_index
    # KL(U || p_i) = Σ_c (1/C) log((1/C) / p_ic); the constant −log C is dropped, as in the reference.
    kld = -log_p.sum(dim=1) / log_p.shape[1]
    entropy = -(log_p.exp() * log_p).sum(dim=1)
    zero = kld.new_zeros(())
    return torch.where(confident, kld, zero), torch.where(confident, zero, entropy)


def region_regularization(
    logits: torch.Tensor,
    pseudo_label: torch.Tensor,
    ignore_index: int = 255,
    normalisation: str = "reference",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Region-adaptive regularisation: KLD-to-uniform on Ω_c (R_c) and entropy on Ω_ig (R_i), docs/method.md §4.

    Args:
        logits: student logits ``[B,C,H,W]`` (strong view).
        pseudo_label: int64 ``[B,H,W]``.
        normalisation: ``"reference"`` divides by ``C·N`` (the published code's extra 1/C), ``"pixel"`` by
            ``N``, where N is the region's pixel count.
    Returns:
        ``(kld_confident, entropy_ignored)``, float32 (or float64) scalars; a term with an empty region is
        exactly 0.

    Example:
        >>> logits = torch.zeros(1, 4, 2, 2)  # uniform prediction
        >>> label = torch.tensor([[[0, 255], [1, 255]]])
        >>> kld, ent = region_regularization(logits, label)  # kld = log(4)/4, ent = log(4)/4
    """
    _check_choice("normalisation", normalisation, NORMALISATIONS)
    kld_map, entropy_map = region_regularization_maps(logits, pseudo_label, ignore_index)
    n_confident = (pseudo_label != ignore_index).sum()
    per_class = logits.shape[1] if normalisation == "reference" else 1
    kld = safe_divide(kld_map.sum(), n_confident * per_class)
    entropy = safe_divide(entropy_map.sum(), (pseudo_label.numel() - n_confident) * per_class)
    return kld, entropy


def consistency(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    pseudo_label: torch.Tensor,
    region: str = "ignored",
    ignore_index: int = 255,
    normalisation: str = "reference",
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean-teacher consistency: soft CE of the student against the teacher's probabilities, docs/method.md §5.3.

    Args:
        student_logits: ``[B,C,H,W]``, the student on the strong view.
        teacher_probs: ``[B,C,H,W]`` softmax of the teacher on the weak view; detached here.
        pseudo_label: int64 ``[B,H,W]``, defines the region.
        region: ``"ignored"`` (HIAST), ``"confident"`` or ``"all"``.
        normalisation: ``"reference"`` divides the sum by the number of non-zero terms of the masked
            ``[B,C,H,W]`` product (data dependent, as published); ``"pixel"`` by the region's pixel count.
        reduction: ``"mean"`` (the loss) or ``"none"``: the per-pixel soft CE ``Σ_c −q_ic·log p_ic`` ``[B,H,W]``
            within the region, 0 elsewhere, before normalisation (for display).
    Returns:
        float32 (or float64) scalar; exactly 0 for an empty region or when every term is zero.
    """
    _check_choice("normalisation", normalisation, NORMALISATIONS)
    _check_choice("reduction", reduction, ("mean", "none"))
    _check_shapes(student_logits, pseudo_label)
    _check_teacher(student_logits, teacher_probs)
    log_p = F.log_softmax(_at_least_fp32(student_logits), dim=1)
    q = teacher_probs.detach().to(log_p.dtype)
    mask = region_mask(pseudo_label, region, ignore_index)  # [B,H,W]
    terms = torch.where(mask.unsqueeze(1), -q * log_p, log_p.new_zeros(()))  # −q_ic·log p_ic  [B,C,H,W]
    if reduction == "none":
        return terms.sum(dim=1)
    count = (terms != 0).sum() if normalisation == "reference" else mask.sum()
    return safe_divide(terms.sum(), count)


# ----------------------------------------------------------------------------------------------------------------
# Loss maps: where each term's loss comes from, pixel by pixel (notebook 4; docs/method.md §4, §5.3)
# ----------------------------------------------------------------------------------------------------------------

LOSS_TERMS: tuple[str, ...] = ("ce", "kld", "entropy", "consistency")


def _normalised_term_maps(
    logits: torch.Tensor, teacher_probs: torch.Tensor, pseudo_label: torch.Tensor, cst_region: str, normalisation: str
) -> dict[str, torch.Tensor]:
    """Each term's per-pixel value ``[B,H,W]`` divided by that term's normaliser (module docstring), so that a
    map's sum is the scalar term."""
    confident = pseudo_label != IGNORE
    per_class = logits.shape[1] if normalisation == "reference" else 1
    n_conf, n_ign = max(int(confident.sum()), 1), max(int((~confident).sum()), 1)
    ce = F.cross_entropy(logits, pseudo_label, ignore_index=IGNORE, reduction="none")
    kld, entropy = region_regularization_maps(logits, pseudo_label)
    region = region_mask(pseudo_label, cst_region)
    if normalisation == "reference":  # the published count: non-zero entries of the masked [B,C,H,W] product
        cst_count = int(((-teacher_probs * F.log_softmax(logits, 1) != 0) & region[:, None]).sum())
    else:
        cst_count = int(region.sum())
    return {
        "ce": ce / n_conf,
        "kld": kld / (per_class * n_conf),
        "entropy": entropy / (per_class * n_ign),
        "consistency": consistency(logits, teacher_probs, pseudo_label, cst_region, reduction="none")
        / max(cst_count, 1),
    }


@torch.no_grad()
def loss_maps(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    views: augment.Views,
    cst_region: str = "ignored",
    normalisation: str = "reference",
) -> dict:
    """Per-pixel contributions of each self-training loss term on the views of a training step (docs/method.md
    §4, §5.3): the teacher on ``views.weak``, the student on ``views.strong``, the pseudo-label ``views.label``
    (the views of a round come from ``self_train.round_views``, as in training).

    Each map ``[B,h,w]`` is the term's per-pixel value divided by the term's normaliser, so ``map.sum()`` is the
    scalar term of this module (``ce`` and ``kld`` on the confident region, ``entropy`` on the ignored region,
    ``consistency`` on `cst_region`). Returns those four maps (float32 numpy), ``weak`` and ``strong`` (uint8
    ``[B,h,w,3]``), ``label`` (int64 ``[B,h,w]``), ``strong_ops`` (per image, the CCA operations that fired)
    and ``scalars`` (the four terms from `target_cross_entropy`, `region_regularization` and `consistency`).
    """
    student.eval()
    teacher.eval()
    logits = student(augment.normalize(views.strong)).float()
    teacher_probs = teacher(augment.normalize(views.weak)).float().softmax(1)
    label = views.label
    kld, entropy = region_regularization(logits, label, normalisation=normalisation)
    cst = consistency(logits, teacher_probs, label, cst_region, normalisation=normalisation)
    scalars = {"ce": target_cross_entropy(logits, label), "kld": kld, "entropy": entropy, "consistency": cst}
    maps = _normalised_term_maps(logits, teacher_probs, label, cst_region, normalisation)
    return {
        **{term: m.cpu().numpy() for term, m in maps.items()},
        "weak": views.weak.permute(0, 2, 3, 1).cpu().numpy(),
        "strong": views.strong.permute(0, 2, 3, 1).cpu().numpy(),
        "label": label.cpu().numpy(),
        "strong_ops": views.strong_ops,
        "scalars": {term: float(v) for term, v in scalars.items()},
    }


def total_loss_map(maps: dict, weights: dict[str, float]) -> np.ndarray:
    """``sum_t weights[t] * maps[t]`` over the loss terms named in `weights` (``[B,H,W]``); its sum over pixels is
    the weighted total loss (terms left out count 0)."""
    unknown = [k for k in weights if k not in LOSS_TERMS]
    if unknown:
        raise InputError(f"loss weights: unknown term(s) {unknown}; known: {list(LOSS_TERMS)}")
    total = np.zeros_like(maps["ce"])
    for term, w in weights.items():
        total = total + w * maps[term]
    return total
