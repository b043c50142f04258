"""Adversarial warm-up (docs/method.md §1.4): the discriminator's layout, the loss formulas against hand-computed
values, which network each loss reaches, the direction of the adversarial push, and an exactly resumable run."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from hias_nb.errors import InputError
from hias_nb.models import DeepLabV2
from hias_nb.warmup import (
    SOURCE_LABEL,
    TARGET_LABEL,
    FCDiscriminator,
    WarmupConfig,
    adversarial_warmup,
    discriminator_input,
    discriminator_loss,
    mean_entropy,
    warmup_step,
)


def test_discriminator_layout_matches_the_published_keys_and_shapes():
    d = FCDiscriminator(19)
    want = {  # docs/method.md §6.6: D.conv1..conv4, D.classifier, 4x4 kernels
        "conv1.weight": (64, 19, 4, 4),
        "conv2.weight": (128, 64, 4, 4),
        "conv3.weight": (256, 128, 4, 4),
        "conv4.weight": (512, 256, 4, 4),
        "classifier.weight": (1, 512, 4, 4),
    }
    shapes = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    for k, s in want.items():
        assert shapes[k] == s
        assert shapes[k.replace("weight", "bias")] == (s[0],)
    assert len(shapes) == 10
    assert d(torch.rand(2, 19, 64, 128)).shape == (2, 1, 2, 4)  # five stride-2 convolutions
    assert d(torch.rand(1, 19, 33, 70)).shape == (1, 1, 1, 2)  # floor at each stride


def test_discriminator_inputs_and_losses_against_hand_values():
    uniform = torch.zeros(1, 4, 2, 3)
    assert torch.allclose(discriminator_input(uniform, "softmax"), torch.full((1, 4, 2, 3), 0.25))
    # self-information of a uniform 4-class map: each channel 0.25 * log2(4) / log2(4) = 0.25, summing to 1
    info = discriminator_input(uniform, "entropy")
    assert torch.allclose(info, torch.full_like(info, 0.25))
    assert mean_entropy(uniform).item() == pytest.approx(1.0)
    peaked = torch.tensor([[[[20.0]], [[0.0]], [[0.0]], [[0.0]]]])
    assert mean_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)
    z = torch.tensor([[[[math.log(3.0)]], [[0.0]]]])  # p = (0.75, 0.25)
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert mean_entropy(z).item() == pytest.approx(h, rel=1e-5)

    d = torch.tensor([0.5, 1.5, -1.0, 2.0]).view(1, 1, 2, 2)
    assert discriminator_loss(d, 1.0, "mse").item() == pytest.approx((0.25 + 0.25 + 4 + 1) / 4)
    assert discriminator_loss(d, 0.0, "mse").item() == pytest.approx((0.25 + 2.25 + 1 + 4) / 4)
    bce = np.mean([-math.log(1 / (1 + math.exp(-v))) for v in (0.5, 1.5, -1.0, 2.0)])
    assert discriminator_loss(d, 1.0, "bce").item() == pytest.approx(bce, rel=1e-6)
    with pytest.raises(InputError, match="d_loss"):
        discriminator_loss(d, 1.0, "hinge")
    with pytest.raises(InputError, match="d_input"):
        discriminator_input(uniform, "logits")


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    model = DeepLabV2("resnet10t", num_classes=19, aspp_rates=(1, 2))
    disc = FCDiscriminator(19, ndf=8)
    xs, xt = torch.randn(2, 3, 32, 64), torch.randn(2, 3, 32, 64)
    ys = torch.randint(0, 19, (2, 32, 64))
    ys[:, :4] = 255
    return model, disc, xs, ys, xt


def test_each_loss_reaches_only_its_own_network():
    model, disc, xs, ys, xt = _pair()
    model.train()
    cfg = WarmupConfig(ent_weight=0.5)
    g, d, terms = warmup_step(model, disc, xs, ys, xt, cfg, "cpu")
    g.backward()
    assert all(p.grad is None for p in disc.parameters())  # D frozen while the generator loss was built
    assert all(p.grad is not None for p in model.aspp.parameters())
    model.zero_grad(set_to_none=True)
    d.backward()
    assert all(p.grad is None for p in model.parameters())  # D's loss sees detached maps
    assert all(p.grad is not None for p in disc.parameters())
    want = terms["ce"] + cfg.adv_weight * terms["adv"] + 0.5 * terms["entropy"]
    assert terms["loss"] == pytest.approx(want, rel=1e-5)


def test_generator_loss_terms_match_direct_formulas():
    model, disc, xs, ys, xt = _pair(1)
    model.eval()  # BN on running statistics: the joint and the separate forward passes must then agree
    cfg = WarmupConfig(adv_weight=0.3, ent_weight=2.0, d_weight=0.5, amp="off")  # exact fp32 comparison
    g, d, terms = warmup_step(model, disc, xs, ys, xt, cfg, "cpu")
    g2, d2, _ = warmup_step(model, disc, xs, ys, xt, WarmupConfig(**{**cfg.__dict__, "joint_forward": False}), "cpu")
    assert g.item() == pytest.approx(g2.item(), rel=1e-5) and d.item() == pytest.approx(d2.item(), rel=1e-5)
    with torch.no_grad():
        zs, zt = model(xs), model(xt)
        ce = F.cross_entropy(zs, ys, ignore_index=255)
        pt = zt.softmax(1)
        adv = ((disc(pt) - SOURCE_LABEL) ** 2).mean()
        ent = (-(pt * torch.log2(pt)).sum(1)).mean() / math.log2(19)
        dl = 0.5 * (((disc(zs.softmax(1)) - SOURCE_LABEL) ** 2).mean() + ((disc(pt) - TARGET_LABEL) ** 2).mean()) / 2
    assert g.item() == pytest.approx((ce + 0.3 * adv + 2.0 * ent).item(), rel=1e-5)
    assert d.item() == pytest.approx(dl.item(), rel=1e-5)


def test_adversarial_step_moves_target_outputs_towards_source():
    """With only the adversarial term, a small step on the network lowers D's 'target' score of target maps."""
    model, disc, xs, ys, xt = _pair(2)
    model.eval()
    cfg = WarmupConfig(source_weight=0.0, adv_weight=1.0, amp="off")  # a gradient property: fp32
    g, _, terms = warmup_step(model, disc, xs, ys, xt, cfg, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt.zero_grad()
    g.backward()
    opt.step()
    _, _, after = warmup_step(model, disc, xs, ys, xt, cfg, "cpu")
    assert after["adv"] < terms["adv"]


def test_warmup_run_resumes_exactly_and_logs_every_term(tiny_toytown, model_ckpt, tmp_path):
    base = dict(
        init_checkpoint=str(model_ckpt),
        data_root=str(tiny_toytown),
        iterations=4,
        batch_size=2,
        checkpoint_every=2,
        d_ndf=8,
        progress=False,
        device="cpu",
    )
    a = adversarial_warmup(WarmupConfig(out=str(tmp_path / "a"), **base))
    adversarial_warmup(WarmupConfig(out=str(tmp_path / "b"), stop_after=2, **base))
    assert not (tmp_path / "b" / "model_final.pt").exists()
    b = adversarial_warmup(WarmupConfig(out=str(tmp_path / "b"), **base))
    sa = torch.load(a / "model_final.pt", weights_only=True)["state_dict"]
    sb = torch.load(b / "model_final.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    da = torch.load(a / "discriminator_final.pt", weights_only=True)
    db = torch.load(b / "discriminator_final.pt", weights_only=True)
    assert all(torch.equal(da[k], db[k]) for k in da)
    init = torch.load(model_ckpt, weights_only=True)["state_dict"]
    assert not torch.equal(init["aspp.conv2d_list.0.weight"], sa["aspp.conv2d_list.0.weight"])
    log = pd.read_csv(a / "log.csv")
    assert list(log["iteration"]) == [1, 2, 3, 4]
    np.testing.assert_allclose(log["loss"], log["ce"] + 0.05 * log["adv"], rtol=1e-4, atol=1e-6)
    # a finished run is a no-op; another config in the same folder is refused by name
    assert adversarial_warmup(WarmupConfig(out=str(tmp_path / "a"), **base)) == a
    with pytest.raises(InputError, match="adv_weight"):
        adversarial_warmup(WarmupConfig(out=str(tmp_path / "a"), **{**base, "adv_weight": 0.1}))


def test_config_rejects_bad_values():
    from hias_nb.train import TrainConfig

    with pytest.raises(InputError, match="adv_weight"):
        WarmupConfig(adv_weight=-1).validate()
    with pytest.raises(InputError, match="d_lr"):
        WarmupConfig(d_lr=0).validate()
    for cls in (WarmupConfig, TrainConfig):
        for bad in (1.5, -0.1, float("nan")):
            with pytest.raises(InputError, match=r"strong_prob: must be in \[0, 1\]"):
                cls(strong_prob=bad).validate()


def test_the_strong_share_reaches_source_training_and_the_warmup(tiny_toytown, model_ckpt, tmp_path):
    """strong_prob is applied by both supervised stages: the same seed and steps with 0 and 1 give other weights."""
    from hias_nb.train import TrainConfig, train_source

    base = dict(data_root=str(tiny_toytown), iterations=2, batch_size=2, progress=False, device="cpu")
    runs = {}
    for p in (0.0, 1.0):
        src = train_source(TrainConfig(out=str(tmp_path / f"s{p}"), strong_prob=p, warmup=1, **base))
        wu = adversarial_warmup(WarmupConfig(out=str(tmp_path / f"w{p}"), init_checkpoint=str(model_ckpt), d_ndf=8,
                                             strong_prob=p, **base))  # fmt: skip
        runs[p] = [torch.load(f, weights_only=True)["state_dict"] for f in (src, wu / "model_final.pt")]
    for a, b in zip(runs[0.0], runs[1.0], strict=True):
        assert not torch.equal(a["aspp.conv2d_list.0.weight"], b["aspp.conv2d_list.0.weight"])


def test_warmup_across_two_datasets_with_the_papers_crops(tiny_toytown, model_ckpt, tmp_path):
    """A source from another root (GTA5 → Cityscapes style): naming the same root explicitly gives the very same
    run as the single-root default; a source of another image size needs crop_size; crop-height ranges in pixels
    per domain, checked against the files before any step; both datasets are identified in inputs.yaml."""
    from hias_nb.data.toytown import generate_toytown

    base = dict(init_checkpoint=str(model_ckpt), data_root=str(tiny_toytown), iterations=2, batch_size=2,
                checkpoint_every=2, d_ndf=8, progress=False, lr=1e-3, device="cpu")  # fmt: skip
    a = adversarial_warmup(WarmupConfig(out=str(tmp_path / "a"), **base))
    b = adversarial_warmup(WarmupConfig(out=str(tmp_path / "b"), source_root=str(tiny_toytown), **base))
    sa, sb = (torch.load(r / "model_final.pt", weights_only=True)["state_dict"] for r in (a, b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = yaml.safe_load((b / "inputs.yaml").read_text())
    assert ids["source_data_root"] == ids["data_root"] and ids["source_data_sha256"] != ids["data_sha256"]

    big = tmp_path / "big"  # a source at another size: 48×96 images against the target's 32×64
    generate_toytown(big, images=6, seed=1, size=(48, 96), progress=False, workers=1)
    two = dict(base, source_root=str(big))
    with pytest.raises(InputError, match="crop_size: source images are \\(48, 96\\), target images \\(32, 64\\)"):
        adversarial_warmup(WarmupConfig(out=str(tmp_path / "c"), **two))
    with pytest.raises(InputError, match="crop_height_range: crops up to 40×80 px do not fit images resized to 32×64"):
        adversarial_warmup(WarmupConfig(out=str(tmp_path / "c"), crop_size=(32, 64), source_crop_height_range=(20, 40),
                                        target_crop_height_range=(20, 40), **two))  # fmt: skip
    assert not (tmp_path / "c").exists()  # refused before the folder was made
    c = adversarial_warmup(WarmupConfig(out=str(tmp_path / "c"), crop_size=(32, 64), source_crop_height_range=(24, 48),
                                        target_crop_height_range=(16, 32), **two))  # fmt: skip
    ids = yaml.safe_load((c / "inputs.yaml").read_text())
    assert ids["source_data_root"] == str(big.resolve()) and ids["data_root"] == str(tiny_toytown.resolve())
    sc = torch.load(c / "model_final.pt", weights_only=True)["state_dict"]
    assert not torch.equal(sc["aspp.conv2d_list.0.weight"], sa["aspp.conv2d_list.0.weight"])
