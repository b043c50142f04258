"""Tests for hias_nb.losses against slow, direct implementations of docs/method.md §4 and §5.3."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hias_nb import augment, losses
from hias_nb.classes import IGNORE
from hias_nb.errors import InputError
from hias_nb.losses import (
    consistency,
    region_regularization,
    region_regularization_maps,
    target_cross_entropy,
)
from hias_nb.models import DeepLabV2

IGN = 255


def _inputs(seed: int = 0, b: int = 2, c: int = 4, h: int = 3, w: int = 5, ignored_fraction: float = 0.4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g, dtype=torch.float64) * 2
    label = torch.randint(0, c, (b, h, w), generator=g)
    label[torch.rand(b, h, w, generator=g) < ignored_fraction] = IGN
    teacher = torch.softmax(torch.randn(b, c, h, w, generator=g, dtype=torch.float64) * 3, dim=1)
    return logits, label, teacher


def _probs(logits: torch.Tensor, b: int, i: int, j: int) -> list[float]:
    """Softmax of one pixel, written out with math.exp."""
    z = [float(v) for v in logits[b, :, i, j]]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def _slow_losses(logits, label, teacher, region="ignored"):
    """Loop over pixels and classes; returns a dict of the reference and pixel-normalised terms."""
    b_n, c_n, h_n, w_n = logits.shape
    ce = kld = ent = cst = 0.0
    n_conf = n_ign = n_region = nonzero = 0
    for b in range(b_n):
        for i in range(h_n):
            for j in range(w_n):
                p = _probs(logits, b, i, j)
                y = int(label[b, i, j])
                if y != IGN:
                    n_conf += 1
                    ce += -math.log(p[y])
                    kld += sum(-(1.0 / c_n) * math.log(pc) for pc in p)
                else:
                    n_ign += 1
                    ent += sum(-pc * math.log(pc) for pc in p)
                inside = {"ignored": y == IGN, "confident": y != IGN, "all": True}[region]
                if inside:
                    n_region += 1
                    for c in range(c_n):
                        e = -float(teacher[b, c, i, j]) * math.log(p[c])
                        cst += e
                        nonzero += e != 0.0
    return {
        "ce": ce / n_conf if n_conf else 0.0,
        "kld_ref": kld / (c_n * n_conf) if n_conf else 0.0,
        "ent_ref": ent / (c_n * n_ign) if n_ign else 0.0,
        "kld_pix": kld / n_conf if n_conf else 0.0,
        "ent_pix": ent / n_ign if n_ign else 0.0,
        "cst_ref": cst / nonzero if nonzero else 0.0,
        "cst_pix": cst / n_region if n_region else 0.0,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_target_ce_and_region_regularization_match_loops(seed):
    logits, label, teacher = _inputs(seed)
    slow = _slow_losses(logits, label, teacher)
    assert target_cross_entropy(logits, label).item() == pytest.approx(slow["ce"], rel=1e-9)
    kld, ent = region_regularization(logits, label)
    assert kld.item() == pytest.approx(slow["kld_ref"], rel=1e-9)
    assert ent.item() == pytest.approx(slow["ent_ref"], rel=1e-9)
    kld_p, ent_p = region_regularization(logits, label, normalisation="pixel")
    assert kld_p.item() == pytest.approx(slow["kld_pix"], rel=1e-9)
    assert ent_p.item() == pytest.approx(slow["ent_pix"], rel=1e-9)
    # The reference carries exactly one extra 1/C over the per-pixel mean.
    assert kld.item() == pytest.approx(kld_p.item() / logits.shape[1], rel=1e-6)


@pytest.mark.parametrize("region", ["ignored", "confident", "all"])
@pytest.mark.parametrize("seed", [0, 3])
def test_consistency_matches_loops(seed, region):
    logits, label, teacher = _inputs(seed)
    slow = _slow_losses(logits, label, teacher, region=region)
    ref = consistency(logits, teacher, label, region=region)
    pix = consistency(logits, teacher, label, region=region, normalisation="pixel")
    assert ref.item() == pytest.approx(slow["cst_ref"], rel=1e-9)
    assert pix.item() == pytest.approx(slow["cst_pix"], rel=1e-9)


def test_uniform_prediction_closed_form():
    c = 4
    logits = torch.zeros(1, c, 2, 2)
    label = torch.tensor([[[0, IGN], [1, IGN]]])
    kld, ent = region_regularization(logits, label)
    # Per confident pixel Σ_c −(1/C) log(1/C) = log C, then / C; per ignored pixel entropy log C, then / C.
    assert kld.item() == pytest.approx(math.log(c) / c)
    assert ent.item() == pytest.approx(math.log(c) / c)
    assert target_cross_entropy(logits, label).item() == pytest.approx(math.log(c))


def test_consistency_nonzero_count_hand_computed():
    # C = 3, one row of 2 ignored pixels and 1 confident pixel; uniform student so log p = −log 3 everywhere.
    logits = torch.zeros(1, 3, 1, 3)
    label = torch.tensor([[[IGN, IGN, 0]]])
    teacher = torch.zeros(1, 3, 1, 3)
    teacher[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # one non-zero term: log 3
    teacher[0, :, 0, 1] = torch.tensor([0.5, 0.5, 0.0])  # two non-zero terms: 0.5 log 3 each
    teacher[0, :, 0, 2] = torch.tensor([0.2, 0.3, 0.5])  # confident: outside the default region
    log3 = math.log(3)
    # Sum = 2 log 3 over 3 non-zero terms (not C·N_ig = 6).
    assert consistency(logits, teacher, label).item() == pytest.approx(2 * log3 / 3)
    assert consistency(logits, teacher, label, normalisation="pixel").item() == pytest.approx(log3)
    # region="all": sum 3 log 3 over 3 + 3 non-zero terms; pixel: over 3 pixels.
    assert consistency(logits, teacher, label, region="all").item() == pytest.approx(3 * log3 / 6)
    assert consistency(logits, teacher, label, region="all", normalisation="pixel").item() == pytest.approx(log3)
    assert consistency(logits, teacher, label, region="confident").item() == pytest.approx(log3 / 3)


def test_consistency_zero_terms_from_certain_student():
    # Student certain in fp32 (log p == 0 exactly for the argmax) also removes a term from the count.
    logits = torch.tensor([200.0, 0.0]).view(1, 2, 1, 1)
    label = torch.full((1, 1, 1), IGN)
    teacher = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)
    out = consistency(logits, teacher, label)
    assert out.item() == pytest.approx(0.5 * 200.0)  # one non-zero term: −0.5 · (−200)


def test_empty_regions_are_exactly_zero_with_finite_gradients():
    logits, _, teacher = _inputs(4)
    logits = logits.float().requires_grad_(True)
    all_ignored = torch.full(logits.shape[:1] + logits.shape[2:], IGN)
    all_confident = torch.zeros_like(all_ignored)

    ce = target_cross_entropy(logits, all_ignored)
    kld, _ = region_regularization(logits, all_ignored)
    _, ent = region_regularization(logits, all_confident)
    cst = consistency(logits, teacher, all_confident)
    cst_pix = consistency(logits, teacher, all_confident, normalisation="pixel")
    for term in (ce, kld, ent, cst, cst_pix):
        assert term.item() == 0.0
        assert term.requires_grad
    (ce + kld + ent + cst + cst_pix).backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad == 0).all()


def test_all_zero_teacher_gives_zero_not_nan():
    logits, label, _ = _inputs(5)
    out = consistency(logits, torch.zeros_like(logits), label)
    assert out.item() == 0.0


def test_gradients_flow_to_logits_not_teacher():
    logits, label, teacher = _inputs(6)
    logits = logits.float().requires_grad_(True)
    teacher = teacher.float().requires_grad_(True)
    kld, ent = region_regularization(logits, label)
    loss = target_cross_entropy(logits, label) + kld + ent + consistency(logits, teacher, label)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert torch.isfinite(logits.grad).all()
    assert teacher.grad is None
    # Pixels outside every region of a term get no gradient from it.
    logits.grad = None
    consistency(logits, teacher, label).backward()
    confident = (label != IGN).unsqueeze(1).expand_as(logits)
    assert (logits.grad[confident] == 0).all()
    assert logits.grad[~confident].abs().sum() > 0


def test_maps_sum_to_losses():
    logits, label, teacher = _inputs(7)
    c = logits.shape[1]
    kld_map, ent_map = region_regularization_maps(logits, label)
    confident = label != IGN
    assert kld_map.shape == ent_map.shape == label.shape
    assert (kld_map[~confident] == 0).all() and (ent_map[confident] == 0).all()
    assert (kld_map[confident] > 0).all() and (ent_map[~confident] > 0).all()
    kld, ent = region_regularization(logits, label)
    assert kld.item() == pytest.approx(kld_map.sum().item() / (c * confident.sum().item()), rel=1e-6)
    assert ent.item() == pytest.approx(ent_map.sum().item() / (c * (~confident).sum().item()), rel=1e-6)
    kld_p, ent_p = region_regularization(logits, label, normalisation="pixel")
    assert kld_p.item() == pytest.approx(kld_map.sum().item() / confident.sum().item(), rel=1e-6)
    assert ent_p.item() == pytest.approx(ent_map.sum().item() / (~confident).sum().item(), rel=1e-6)

    for region, mask in (
        ("ignored", ~confident),
        ("confident", confident),
        ("all", torch.ones_like(confident)),
    ):
        cmap = consistency(logits, teacher, label, region=region, reduction="none")
        assert cmap.shape == label.shape
        assert (cmap[~mask] == 0).all()
        pix = consistency(logits, teacher, label, region=region, normalisation="pixel")
        assert pix.item() == pytest.approx(cmap.sum().item() / mask.sum().item(), rel=1e-6)
        # Random teacher: no exact zeros, so the reference count is C·N.
        ref = consistency(logits, teacher, label, region=region)
        assert ref.item() == pytest.approx(cmap.sum().item() / (c * mask.sum().item()), rel=1e-6)


def test_fp16_logits_computed_in_fp32():
    # An fp16 softmax/entropy is off by ~1e-4 relative here; the fp32 computation agrees with float64.
    g = torch.Generator().manual_seed(9)
    logits = (torch.randn(1, 19, 4, 4, generator=g) * 4).half()
    label = torch.zeros(1, 4, 4, dtype=torch.long)
    label[0, :2] = IGN
    kld, ent = region_regularization(logits, label)
    kld64, ent64 = region_regularization(logits.double(), label)
    assert kld.dtype == ent.dtype == torch.float32
    assert kld.item() == pytest.approx(kld64.item(), rel=1e-6)
    assert ent.item() == pytest.approx(ent64.item(), rel=1e-6)
    teacher = torch.softmax(logits.double().flip(1), dim=1).half()
    assert consistency(logits, teacher, label).item() == pytest.approx(
        consistency(logits.double(), teacher.double(), label).item(), rel=1e-6
    )


def test_bad_option_strings_name_the_allowed_values():
    logits, label, teacher = _inputs(8)
    with pytest.raises(ValueError, match="'ignored', 'confident', 'all'"):
        consistency(logits, teacher, label, region="everywhere")
    with pytest.raises(ValueError, match="'reference', 'pixel'"):
        consistency(logits, teacher, label, normalisation="mean")
    with pytest.raises(ValueError, match="'reference', 'pixel'"):
        region_regularization(logits, label, normalisation="paper")
    with pytest.raises(ValueError, match="pseudo_label"):
        target_cross_entropy(logits, label[:, :2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_matches_cpu():
    logits, label, teacher = _inputs(10)
    logits, teacher = logits.float(), teacher.float()
    cpu = [*region_regularization(logits, label), consistency(logits, teacher, label)]
    with torch.autocast("cuda", dtype=torch.float16):
        z = logits.cuda().half()
        gpu = [*region_regularization(z, label.cuda()), consistency(z, teacher.cuda().half(), label.cuda())]
    for a, b in zip(cpu, gpu, strict=True):
        assert b.dtype == torch.float32 and b.device.type == "cuda"
        assert b.item() == pytest.approx(a.item(), rel=1e-2)


# ----------------------------------------------------------------------------------------------------------------
# Loss maps (notebook 4): each term's per-pixel contribution on the views of a training step


def _student_teacher(num_classes: int = 5) -> tuple[DeepLabV2, DeepLabV2]:
    torch.manual_seed(0)
    return (DeepLabV2("resnet10t", num_classes=num_classes, aspp_rates=(1, 2)),
            DeepLabV2("resnet10t", num_classes=num_classes, aspp_rates=(1, 2)))  # fmt: skip


def _batch(n: int, h: int, w: int, num_classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (n, h, w), generator=g)
    labels[torch.rand(n, h, w, generator=g) < 0.4] = IGNORE
    return images, labels


@pytest.mark.parametrize("normalisation", ["reference", "pixel"])
def test_loss_maps_sum_to_the_loss_terms_on_the_training_views(normalisation):
    student, teacher = _student_teacher()
    images, labels = _batch(2, 24, 32)
    views = augment.make_views(images, labels, generator=torch.Generator().manual_seed(5), crop_scale=(0.6, 1.0),
                               crop_ratio=2.0)  # fmt: skip
    maps = losses.loss_maps(student, teacher, views, normalisation=normalisation)
    np.testing.assert_array_equal(maps["weak"], views.weak.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(maps["strong"], views.strong.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(maps["label"], views.label.numpy())
    assert maps["strong_ops"] == views.strong_ops
    # hand-check: the scalar terms of hias_nb.losses, the teacher on the weak view and the student on the strong
    with torch.no_grad():
        logits = student.eval()(augment.normalize(views.strong)).float()
        q = teacher.eval()(augment.normalize(views.weak)).float().softmax(1)
    kld, ent = losses.region_regularization(logits, views.label, normalisation=normalisation)
    expected = {"ce": losses.target_cross_entropy(logits, views.label), "kld": kld, "entropy": ent,
                "consistency": losses.consistency(logits, q, views.label, normalisation=normalisation)}  # fmt: skip
    for term in losses.LOSS_TERMS:
        assert maps[term].shape == (2, 24, 32)
        assert maps[term].sum() == pytest.approx(float(expected[term]), rel=1e-4), term
        assert maps["scalars"][term] == pytest.approx(float(expected[term]), rel=1e-6), term
    confident = views.label.numpy() != IGNORE
    assert (maps["kld"][~confident] == 0).all() and (maps["entropy"][confident] == 0).all()
    assert (maps["ce"][~confident] == 0).all() and (maps["consistency"][confident] == 0).all()
    # one pixel by the formula: CE = -log p[label] / N_c
    b, i, j = map(int, np.argwhere(confident)[0])
    log_p = torch.log_softmax(logits[b, :, i, j].double(), 0)[int(views.label[b, i, j])]
    assert maps["ce"][b, i, j] == pytest.approx(-float(log_p) / confident.sum(), rel=1e-4)
    # the consistency region follows `cst_region`
    everywhere = losses.loss_maps(student, teacher, views, cst_region="all", normalisation=normalisation)
    assert (everywhere["consistency"][confident] > 0).all()


def test_total_loss_map_weights_the_terms():
    rng = np.random.default_rng(0)
    maps = {t: rng.random((2, 3, 4)) for t in losses.LOSS_TERMS}
    weights = {"ce": 1.0, "kld": 0.1, "entropy": 1.0, "consistency": 0.5}
    total = losses.total_loss_map(maps, weights)
    np.testing.assert_allclose(total, maps["ce"] + 0.1 * maps["kld"] + maps["entropy"] + 0.5 * maps["consistency"])
    np.testing.assert_allclose(losses.total_loss_map(maps, {"kld": 2.0}), 2.0 * maps["kld"])  # others count 0
    with pytest.raises(InputError, match="bogus"):
        losses.total_loss_map(maps, {"bogus": 1.0})
