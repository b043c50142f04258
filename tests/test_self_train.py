"""The HIAST iteration (`self_train.hiast_step`) on a hand-made batch: each term against its formula, gradients
that reach the student only, the optimiser step, and the EMA teacher."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from hias_nb import augment
from hias_nb.errors import InputError
from hias_nb.losses import consistency, region_regularization, target_cross_entropy
from hias_nb.self_train import SelfTrainConfig, hiast_step, round_views

C = 4


def _nets(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, C, 1))
    teacher = copy.deepcopy(student)
    with torch.no_grad():  # a teacher that differs from the student, so q is not the student's own prediction
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student.train(), teacher.eval()


def _batch(ignored_fraction: float, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (2, 3, 8, 16), dtype=torch.uint8, generator=g)
    label = torch.randint(0, C, (2, 8, 16), generator=g)
    label[torch.rand(2, 8, 16, generator=g) < ignored_fraction] = 255
    provenance = torch.where(label == 1, label, torch.full_like(label, 255))
    return {"image": image, "label": label, "provenance": provenance}


def _slow_ce(logits: torch.Tensor, label: torch.Tensor) -> float:
    """(1/N_c) Σ_{i∈Ωc} −log softmax(z_i)[ŷ_i], one pixel at a time with math.exp."""
    total, n = 0.0, 0
    for b, i, j in zip(*torch.nonzero(label != 255, as_tuple=True), strict=True):
        z = [float(v) for v in logits[b, :, i, j]]
        m = max(z)
        log_norm = m + math.log(sum(math.exp(v - m) for v in z))
        total += log_norm - z[int(label[b, i, j])]
        n += 1
    return total / n if n else 0.0


@pytest.mark.parametrize("region", ["ignored", "all"])
@pytest.mark.parametrize("normalisation", ["reference", "pixel"])
@pytest.mark.parametrize("ignored_fraction", [0.0, 0.4, 1.0])  # 0 and 1: an empty region
def test_hiast_step_terms_gradients_step_and_ema(ignored_fraction, normalisation, region):
    student, teacher = _nets()
    cfg = SelfTrainConfig(
        amp="off", ema_gamma=0.9, normalisation=normalisation, cst_region=region, crop_scale=(0.5, 1.0)
    )
    batch = _batch(ignored_fraction)
    # The expected values, computed independently from a copy of the student before the step.
    ref_student, t0 = copy.deepcopy(student), [p.clone() for p in teacher.parameters()]
    views_gen = torch.Generator().manual_seed(5)
    v = augment.make_views(
        batch["image"], batch["label"], batch["provenance"], generator=views_gen, crop_scale=(0.5, 1.0), crop_ratio=2.0
    )

    logits = ref_student(augment.normalize(v.strong))
    with torch.no_grad():
        q = teacher(augment.normalize(v.weak)).softmax(1)
    ce = target_cross_entropy(logits, v.label)
    kld, ent = region_regularization(logits, v.label, normalisation=normalisation)
    cst = consistency(logits, q, v.label, region, normalisation=normalisation)
    (cfg.lambda_ce * ce + cfg.lambda_kld * kld + cfg.lambda_ent * ent + cfg.lambda_cst * cst).backward()

    lr = 0.05
    opt = torch.optim.SGD(student.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    before = [p.detach().clone() for p in student.parameters()]
    terms = hiast_step(student, teacher, opt, scaler, batch, cfg, torch.Generator().manual_seed(5), "cpu")

    assert terms["ce"] == pytest.approx(_slow_ce(logits.detach(), v.label), rel=1e-5, abs=1e-7)
    for key, want in (("ce", ce), ("kld", kld), ("entropy", ent), ("consistency", cst)):
        assert terms[key] == pytest.approx(want.item(), rel=1e-5, abs=1e-7), key
    assert terms["confident_fraction"] == pytest.approx(float((v.label != 255).float().mean()))
    assert terms["pasted_fraction"] == pytest.approx(float((v.provenance != 255).float().mean()))
    # Gradients reach the student only; the SGD step moved it by −lr·∇ of the written-out loss.
    for p0, p, ref in zip(before, student.parameters(), ref_student.parameters(), strict=True):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p.detach(), p0 - lr * ref.grad, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in teacher.parameters())
    # The teacher changed only by the EMA: t = γ·t0 + (1−γ)·s_new; its buffers are the student's.
    for t_old, t, s in zip(t0, teacher.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * t_old + 0.1 * s.detach())
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        assert torch.equal(t, s)


def test_hiast_step_weights_and_views():
    """λ = 0 removes a term from the total; strong=False gives the student the teacher's view."""
    student, teacher = _nets(2)
    batch = _batch(0.4, seed=3)
    only_ce = SelfTrainConfig(amp="off", lambda_kld=0.0, lambda_ent=0.0, lambda_cst=0.0, strong=False)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    terms = hiast_step(student, teacher, opt, scaler, batch, only_ce, torch.Generator().manual_seed(0), "cpu")
    assert terms["loss"] == pytest.approx(terms["ce"], rel=1e-6)
    # With the student a copy of the teacher, both in eval mode, and no strong view, consistency is the
    # teacher's own entropy on the ignored pixels: the soft CE of q against itself.
    twin = copy.deepcopy(teacher).eval()
    for p in twin.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(twin.parameters(), lr=0.0)
    cfg = SelfTrainConfig(amp="off", strong=False, normalisation="pixel", ema_gamma=1.0)
    terms = hiast_step(twin, teacher, opt, scaler, batch, cfg, torch.Generator().manual_seed(0), "cpu")
    assert terms["consistency"] == pytest.approx(terms["entropy"], rel=1e-5)


def test_round_views_use_the_rounds_settings_and_the_scaled_blur():
    """The views of a round (hiast_step, HPLA preview, loss maps) come from its config: crop settings and a
    strong view whose blur kernels are scaled to the crop (3 or 5 px at 64×128, not the paper's 3..41)."""
    images = torch.randint(0, 256, (12, 3, 64, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pseudo = torch.zeros(12, 64, 128, dtype=torch.int64)
    cfg = SelfTrainConfig(crop_scale=(0.5, 0.5), crop_size=(32, 64))
    v = round_views(cfg, images, pseudo, None, torch.Generator().manual_seed(1))
    ksizes = [p["ksize"] for ops in v.strong_ops for name, p in ops if name == "gaussian_blur"]
    assert ksizes and all(k == 3 for k in ksizes)  # scaled to the 32-row crop: (3, 3)
    assert v.weak.shape == (12, 3, 32, 64) and (v.provenance == 255).all()
    full = round_views(SelfTrainConfig(), images, pseudo, None, torch.Generator().manual_seed(1))
    ksizes = [p["ksize"] for ops in full.strong_ops for name, p in ops if name == "gaussian_blur"]
    assert ksizes and set(ksizes) <= {3, 5}
    # the paper configurations fix the range: (3, 41) px kernels whatever the crop (not scaled to 64 rows)
    paper = round_views(SelfTrainConfig(blur_limit=(3, 41)), images, pseudo, None, torch.Generator().manual_seed(1))
    ksizes = [p["ksize"] for ops in paper.strong_ops for name, p in ops if name == "gaussian_blur"]
    assert ksizes and all(k % 2 == 1 and 3 <= k <= 41 for k in ksizes) and max(ksizes) > 5
    for bad in ((4, 41), (41, 3), (0, 3)):
        with pytest.raises(InputError, match="blur_limit"):
            SelfTrainConfig(blur_limit=bad).validate()
    plain = round_views(SelfTrainConfig(strong=False), images, pseudo, None, torch.Generator().manual_seed(1))
    assert plain.strong is plain.weak and torch.equal(plain.weak, full.weak)  # the same weak draws
