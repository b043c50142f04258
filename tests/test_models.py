"""Tests of hias_nb.models: DeepLab-v2 shapes, equivalence with the published architecture, checkpoint
layouts and errors, parameter groups and BN freezing (docs/method.md §6.1-6.6, B9, B19)."""

from __future__ import annotations

import copy
import json
import pathlib
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from hias_nb.errors import InputError
from hias_nb.models import (
    DeepLabV2,
    checkpoint_architecture,
    checkpoint_meta,
    describe_init,
    freeze_bn,
    has_skip_branch,
    load_checkpoint,
    param_groups,
    save_checkpoint,
    write_published_layout,
)
from hias_nb.train import build_model, load_model

KEYS_JSON = Path(__file__).parent / "data" / "hiast_deeplabv2_r101_keys.json"
RATES = (6, 12, 18, 24)


def _bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics and affine parameters, so that a wrongly loaded buffer changes the output."""
    with torch.no_grad():
        for bn in _bn_layers(model):
            n = bn.num_features
            bn.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            bn.bias.copy_(0.1 * torch.randn(n, generator=gen))
            bn.num_batches_tracked.fill_(7)


@pytest.fixture
def small() -> DeepLabV2:
    torch.manual_seed(0)
    model = DeepLabV2("resnet10t", num_classes=5)
    _randomise_bn(model, torch.Generator().manual_seed(1))
    return model.eval()


# ------------------------------------------------------------------------------------------------------
# Network
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["resnet10t", "resnet18"])
@pytest.mark.parametrize("num_classes", [19, 9])
def test_output_size_equals_input_size(backbone: str, num_classes: int) -> None:
    model = DeepLabV2(backbone, num_classes=num_classes).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 37, 53))
    assert out.shape == (2, num_classes, 37, 53)
    assert torch.isfinite(out).all()


def test_aspp_structure_and_init() -> None:
    torch.manual_seed(0)
    model = DeepLabV2("resnet18", num_classes=19)
    convs = model.aspp.conv2d_list
    assert len(convs) == 4
    for conv, rate in zip(convs, RATES, strict=True):
        assert conv.kernel_size == (3, 3) and conv.dilation == (rate, rate) and conv.padding == (rate, rate)
        assert conv.in_channels == 512 and conv.out_channels == 19 and conv.bias is not None
    w = torch.cat([c.weight.flatten() for c in convs])  # 4 * 19 * 512 * 9 samples of N(0, 0.01)
    assert abs(w.mean().item()) < 5e-4
    assert w.std().item() == pytest.approx(0.01, rel=0.02)
    # Nothing but the backbone and the summed ASPP: no representation head, no BN/ReLU in the head.
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"backbone", "aspp"}
    assert not any(isinstance(m, nn.BatchNorm2d | nn.ReLU) for m in model.aspp.modules())


def test_custom_rates_and_stride8_logits(small: DeepLabV2) -> None:
    model = DeepLabV2("resnet10t", num_classes=3, aspp_rates=(2, 4)).eval()
    assert [c.dilation for c in model.aspp.conv2d_list] == [(2, 2), (4, 4)]
    # Logits at the feature resolution are H/8 x W/8 (output stride 8) before the upsampling.
    with torch.no_grad():
        feats = model.backbone.forward_features(torch.randn(1, 3, 64, 96))
    assert feats.shape[-2:] == (8, 12)


def test_unknown_backbone_is_input_error() -> None:
    with pytest.raises(InputError, match="backbone"):
        DeepLabV2("no_such_net_xyz", num_classes=3)


# ------------------------------------------------------------------------------------------------------
# The published architecture and layout (docs/method.md §6.1, 6.6)
# ------------------------------------------------------------------------------------------------------


def _reference_deeplabv2(gen: torch.Generator) -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    """The published network, built independently: torchvision ResNet-101 with dilated layer3/4, no fc,
    and four summed 3x3 ASPP convolutions with bias."""
    net = torchvision.models.resnet101(weights=None, replace_stride_with_dilation=[False, True, True])
    del net.fc
    _randomise_bn(net, gen)
    aspp_w = [0.01 * torch.randn(19, 2048, 3, 3, generator=gen) for _ in RATES]
    aspp_b = [0.1 * torch.randn(19, generator=gen) for _ in RATES]
    return net.eval(), aspp_w, aspp_b


def _reference_forward(net: nn.Module, aspp_w: list, aspp_b: list, x: torch.Tensor) -> torch.Tensor:
    f = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    f = net.layer4(net.layer3(net.layer2(net.layer1(f))))
    z = sum(F.conv2d(f, w, b, padding=r, dilation=r) for w, b, r in zip(aspp_w, aspp_b, RATES, strict=True))
    return F.interpolate(z, size=x.shape[-2:], mode="bilinear", align_corners=True)


def test_published_layout_loads_and_reproduces_the_reference(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    net, aspp_w, aspp_b = _reference_deeplabv2(gen)
    published = {f"seg_model.backbone.{k}": v for k, v in net.state_dict().items()}
    for i, (w, b) in enumerate(zip(aspp_w, aspp_b, strict=True)):
        published[f"seg_model.aspp.conv2d_list.{i}.weight"] = w
        published[f"seg_model.aspp.conv2d_list.{i}.bias"] = b
    published["seg_model.representation.0.weight"] = torch.randn(256, 2048, 1, 1, generator=gen)
    published["seg_model.representation.0.bias"] = torch.randn(256, generator=gen)
    d_keys = {
        "D.conv1.weight": torch.randn(64, 19, 4, 4, generator=gen),
        "D.conv1.bias": torch.randn(64, generator=gen),
        "D.classifier.weight": torch.randn(1, 512, 4, 4, generator=gen),
    }
    published.update(d_keys)
    expected_ignored = {"representation.0.weight", "representation.0.bias", *d_keys}

    x = torch.randn(1, 3, 65, 97, generator=gen)
    with torch.no_grad():
        reference = _reference_forward(net, aspp_w, aspp_b, x)
    assert torch.isfinite(reference).all() and reference.abs().max() > 0

    for prefix in ["", "module."]:
        path = tmp_path / f"published_{prefix or 'plain'}.pth"
        torch.save({prefix + k: v for k, v in published.items()}, path)
        torch.manual_seed(123)
        model = DeepLabV2("resnet101", num_classes=19).eval()
        report = load_checkpoint(model, path, strict=True)
        assert report.missing == [] and report.unexpected == []
        assert set(report.ignored) == expected_ignored
        assert len(report.matched) == len(model.state_dict()) == 632
        assert report.source == str(path)
        with torch.no_grad():
            ours = model(x)
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
        del model


def test_published_key_list_maps_exactly() -> None:
    spec = json.loads(KEYS_JSON.read_text())
    entries = spec["keys"]
    assert len(entries) == spec["num_keys"] == 634
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    state = {e["key"]: torch.zeros(e["shape"], dtype=dtypes[e["dtype"]]) for e in entries}
    model = DeepLabV2("resnet101", num_classes=19)
    own = model.state_dict()
    report = load_checkpoint(model, state)  # raises on any shape difference
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.ignored) == ["representation.0.bias", "representation.0.weight"]
    assert len(report.matched) == 632 == len(own)
    for e in entries:
        name = e["key"].removeprefix("seg_model.")
        if name in own:
            assert list(own[name].shape) == e["shape"], name
    # The zeros were really copied in, parameters and buffers alike.
    assert model.backbone.conv1.weight.abs().sum() == 0 and model.aspp.conv2d_list[3].bias.abs().sum() == 0
    assert model.backbone.layer4[2].bn3.running_var.abs().sum() == 0


def test_iast_layout_loads(small: DeepLabV2) -> None:
    iast = {}
    for k, v in small.state_dict().items():
        iast["module." + k.replace("aspp.", "decoder.aspp.")] = v.clone()
    iast["module.backbone.fc.weight"] = torch.randn(1000, 512)
    iast["module.discriminators.Origin-Predictor.conv1.weight"] = torch.randn(64, 5, 3, 3)
    fresh = DeepLabV2("resnet10t", num_classes=5).eval()
    report = load_checkpoint(fresh, iast, strict=True)
    assert report.missing == [] and report.unexpected == []
    assert set(report.ignored) == {"backbone.fc.weight", "discriminators.Origin-Predictor.conv1.weight"}
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), small(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------
# hias_nb's own format
# ------------------------------------------------------------------------------------------------------


def test_own_format_round_trip_and_meta(small: DeepLabV2, tmp_path: Path) -> None:
    path = tmp_path / "ck" / "model_last.pth"
    save_checkpoint(path, small, meta={"round": 2, "note": "x", "lrs": [1e-6, 1e-5]})
    assert [p.name for p in path.parent.iterdir()] == ["model_last.pth"]  # no temporary file left behind
    meta = checkpoint_meta(path)
    assert meta == {
        "round": 2, "note": "x", "lrs": [1e-6, 1e-5], "backbone": "resnet10t", "num_classes": 5,
        "aspp_rates": [6, 12, 18, 24], "skip": False,
    }  # fmt: skip
    raw = torch.load(path, weights_only=True)
    assert raw["hias_nb_format"] == 1 and set(raw) == {"hias_nb_format", "state_dict", "meta"}

    torch.manual_seed(99)
    fresh = DeepLabV2("resnet10t", num_classes=5).eval()
    x = torch.randn(2, 3, 33, 41)
    with torch.no_grad():
        assert not torch.equal(fresh(x), small(x))
        report = load_checkpoint(fresh, path, strict=True)
        assert (report.missing, report.unexpected, report.ignored) == ([], [], [])
        assert torch.equal(fresh(x), small(x))
    for bn_new, bn_old in zip(_bn_layers(fresh), _bn_layers(small), strict=True):  # buffers loaded too
        assert torch.equal(bn_new.running_var, bn_old.running_var)
        assert bn_new.num_batches_tracked.item() == 7

    # A bare hias_nb state dict loads as well.
    again = DeepLabV2("resnet10t", num_classes=5).eval()
    load_checkpoint(again, small.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(again(x), small(x))


def test_checkpoint_meta_of_published_layout_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "published.pth"
    torch.save({"seg_model.aspp.conv2d_list.0.bias": torch.zeros(3)}, path)
    assert checkpoint_meta(path) == {}


def test_save_checkpoint_rejects_non_json_meta(small: DeepLabV2, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="meta"):
        save_checkpoint(tmp_path / "a.pth", small, meta={"path": Path("x")})
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------------
# Load errors and the key report
# ------------------------------------------------------------------------------------------------------


def test_wrong_class_count_names_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "c19.pth"
    save_checkpoint(path, DeepLabV2("resnet10t", num_classes=19))
    model = DeepLabV2("resnet10t", num_classes=9)
    before = model.aspp.conv2d_list[0].bias.clone()
    stem_before = model.backbone.conv1[0].weight.clone()
    with pytest.raises(InputError) as info:
        load_checkpoint(model, path)
    msg = str(info.value)
    assert str(path) in msg and "aspp.conv2d_list.0.weight has 19 classes, the model has 9" in msg
    # Nothing is loaded when a check fails.
    assert torch.equal(model.aspp.conv2d_list[0].bias, before)
    assert torch.equal(model.backbone.conv1[0].weight, stem_before)


def test_other_shape_mismatch_names_key_and_shapes(small: DeepLabV2) -> None:
    state = dict(small.state_dict())
    state["backbone.bn1.weight"] = torch.ones(7)
    with pytest.raises(InputError, match=r"backbone\.bn1\.weight has shape \[7\], the model expects \[64\]"):
        load_checkpoint(small, state)


def test_missing_and_unexpected_keys(small: DeepLabV2) -> None:
    state = dict(small.state_dict())
    del state["aspp.conv2d_list.2.bias"]
    state["backbone.extra.weight"] = torch.zeros(3)
    report = load_checkpoint(DeepLabV2("resnet10t", num_classes=5), state)
    assert report.missing == ["aspp.conv2d_list.2.bias"]
    assert report.unexpected == ["backbone.extra.weight"]
    assert len(report.matched) == len(state) - 1
    text = str(report)
    assert "1 missing (aspp.conv2d_list.2.bias)" in text and "1 unexpected (backbone.extra.weight)" in text

    with pytest.raises(InputError, match="strict"):
        load_checkpoint(DeepLabV2("resnet10t", num_classes=5), state, strict=True)
    only_missing = dict(small.state_dict())
    del only_missing["backbone.bn1.running_mean"]
    with pytest.raises(InputError, match=r"backbone\.bn1\.running_mean"):
        load_checkpoint(DeepLabV2("resnet10t", num_classes=5), only_missing, strict=True)


def test_zero_matched_keys_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3), "seg_model.representation.0.bias": torch.zeros(256)}, path)
    with pytest.raises(InputError, match=re.escape(f"{path}: no key matches")):
        load_checkpoint(DeepLabV2("resnet10t", num_classes=5), path)


class _Payload:
    """Unpickling this object creates a file: proof of code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_custom_class_is_refused_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({"backbone.conv1.weight": torch.zeros(1), "x": _Payload(marker)}, path)
    with pytest.raises(InputError, match=re.escape(f"{path}: not a loadable checkpoint")):
        load_checkpoint(DeepLabV2("resnet10t", num_classes=5), path)
    with pytest.raises(InputError, match=re.escape(str(path))):
        checkpoint_meta(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load would have run it
    assert marker.exists()


def test_non_checkpoint_files_are_input_errors(tmp_path: Path) -> None:
    model = DeepLabV2("resnet10t", num_classes=5)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(InputError, match=re.escape(f"{junk}: not a loadable checkpoint")):
        load_checkpoint(model, junk)
    with pytest.raises(InputError, match="file not found"):
        load_checkpoint(model, tmp_path / "absent.pth")
    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(InputError, match=re.escape(f"{tensor_only}: not a model state dict")):
        load_checkpoint(model, tensor_only)


# ------------------------------------------------------------------------------------------------------
# Pretrained backbone files
# ------------------------------------------------------------------------------------------------------


def test_pretrained_timm_file_with_classifier(tmp_path: Path) -> None:
    torch.manual_seed(5)
    src = timm.create_model("resnet10t", pretrained=False, num_classes=1000)  # carries fc.*
    path = tmp_path / "resnet10t_timm.pth"
    torch.save(src.state_dict(), path)
    model = DeepLabV2("resnet10t", num_classes=3, pretrained=path)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k
    assert set(model.pretrained_report.ignored) == {"fc.weight", "fc.bias"}
    n = sum(1 for k in model.backbone.state_dict() if not k.endswith("num_batches_tracked"))
    assert describe_init(model) == f"backbone resnet10t: loaded {n}/{n} tensors from {path}"
    assert describe_init(DeepLabV2("resnet10t", 3)) == (
        "backbone resnet10t: random initialisation (no pretrained file given)"
    )


def test_pretrained_torchvision_file_without_bn_counters(tmp_path: Path) -> None:
    torch.manual_seed(6)
    src = torchvision.models.resnet18(weights=None)
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet18-tv.pth"
    torch.save(state, path)
    model = DeepLabV2("resnet18", num_classes=3, pretrained=path)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    assert "loaded 100/100 tensors" in describe_init(model)

    with pytest.raises(InputError, match=re.escape(f"{path}: ")):  # resnet18 weights for a resnet10t
        DeepLabV2("resnet10t", num_classes=3, pretrained=path)
    missing = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.")}, missing)
    with pytest.raises(InputError, match=re.escape(f"{missing}: does not fit backbone") + r".*layer4\."):
        DeepLabV2("resnet18", num_classes=3, pretrained=missing)
    with pytest.raises(InputError, match="file not found"):
        DeepLabV2("resnet18", num_classes=3, pretrained=tmp_path / "nope.pth")


# ------------------------------------------------------------------------------------------------------
# Parameter groups and BN freezing (docs/method.md §6.2, 6.3, B9)
# ------------------------------------------------------------------------------------------------------


def test_param_groups(small: DeepLabV2) -> None:
    groups = param_groups(small, lr=2e-6, weight_decay=5e-4)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert groups[0]["lr"] == 2e-6 and groups[1]["lr"] == pytest.approx(2e-5)
    assert all(g["weight_decay"] == 5e-4 for g in groups)
    head_ids = {id(p) for p in small.aspp.parameters()}
    assert {id(p) for p in groups[1]["params"]} == head_ids
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in small.parameters())  # each exactly once

    freeze_bn(small, "affine")
    groups = param_groups(small, lr=1.0, head_lr_mult=3.0)
    assert groups[1]["lr"] == 3.0
    grouped = {id(p) for g in groups for p in g["params"]}
    trainable = {id(p) for p in small.parameters() if p.requires_grad}
    assert grouped == trainable and len(trainable) < len(list(small.parameters()))
    assert not any(id(bn.weight) in grouped for bn in _bn_layers(small))
    torch.optim.Adam(groups)  # the groups are valid optimiser input


def _train_step(model: DeepLabV2) -> None:
    model.train()
    model.zero_grad()
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()


def test_freeze_bn_affine_keeps_batch_statistics(small: DeepLabV2) -> None:
    freeze_bn(small, "affine")
    bn = small.backbone.bn1
    mean_before = bn.running_mean.clone()
    _train_step(small)
    assert all(b.training for b in _bn_layers(small))
    assert all(b.weight.grad is None and b.bias.grad is None for b in _bn_layers(small))
    assert small.backbone.conv1[0].weight.grad is not None and small.aspp.conv2d_list[0].bias.grad is not None
    assert not torch.equal(bn.running_mean, mean_before)  # statistics still update (reference, B9)


def test_freeze_bn_full_keeps_running_statistics(small: DeepLabV2) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eval_out = small(x)
    freeze_bn(small, "full")
    stats = [(b.running_mean.clone(), b.running_var.clone()) for b in _bn_layers(small)]
    _train_step(small)
    assert small.training and small.aspp.training and not any(b.training for b in _bn_layers(small))
    for b, (m, v) in zip(_bn_layers(small), stats, strict=True):
        assert torch.equal(b.running_mean, m) and torch.equal(b.running_var, v)
        assert b.weight.grad is None
    with torch.no_grad():
        torch.testing.assert_close(small(x), eval_out)  # train mode now normalises like eval mode
    teacher = copy.deepcopy(small).train()  # a copy keeps the mode
    assert not any(b.training for b in _bn_layers(teacher))

    freeze_bn(small, "none")  # undo
    assert all(b.training and b.weight.requires_grad for b in _bn_layers(small))


def test_freeze_bn_rejects_unknown_mode(small: DeepLabV2) -> None:
    with pytest.raises(ValueError, match="'partial'"):
        freeze_bn(small, "partial")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_and_checkpoint_round_trip(small: DeepLabV2, tmp_path: Path) -> None:
    path = tmp_path / "cpu.pth"
    save_checkpoint(path, small)
    model = DeepLabV2("resnet10t", num_classes=5).cuda().eval()
    load_checkpoint(model, path, strict=True)  # CPU tensors into a CUDA model
    x = torch.randn(1, 3, 37, 53)
    with torch.no_grad():
        out = model(x.cuda())
        assert out.device.type == "cuda" and out.shape == (1, 5, 37, 53)
        torch.testing.assert_close(out.cpu(), small(x), rtol=1e-3, atol=1e-3)
    save_checkpoint(tmp_path / "cuda.pth", model)  # saved tensors are on the CPU
    assert all(v.device.type == "cpu" for v in torch.load(tmp_path / "cuda.pth")["state_dict"].values())


# ------------------------------------------------------------------------------------------------------
# toytown's stride-4 skip branch
# ------------------------------------------------------------------------------------------------------


def _skip_model(seed: int = 0) -> DeepLabV2:
    torch.manual_seed(seed)
    model = DeepLabV2("resnet10t", num_classes=5, aspp_rates=(1, 2), skip=True)
    _randomise_bn(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def test_fresh_skip_model_computes_deeplabv2() -> None:
    """The skip branch's classifier starts at zero: the same backbone and ASPP give DeepLab-v2's stride-8 logits,
    upsampled through stride 4."""
    skip = _skip_model()
    plain = DeepLabV2("resnet10t", num_classes=5, aspp_rates=(1, 2)).eval()
    report = load_checkpoint(plain, skip.state_dict())
    assert report.unexpected and all(k.startswith("skip.") for k in report.unexpected)
    x = torch.randn(2, 3, 40, 72)
    with torch.no_grad():
        coarse = plain.aspp(plain.backbone.forward_features(x))  # [2, 5, 5, 9]
        fine = F.interpolate(coarse, size=(10, 18), mode="bilinear", align_corners=True)
        expected = F.interpolate(fine, size=(40, 72), mode="bilinear", align_corners=True)
        torch.testing.assert_close(skip(x), expected)
        assert (skip(x).argmax(1) == plain(x).argmax(1)).float().mean() > 0.95  # nearly DeepLab-v2's labels


def test_skip_forward_matches_the_direct_formula() -> None:
    """logits = up(up4(ASPP(layer4)) + skip(layer1)), written out with resnet10t's modules (independent of timm's
    forward_intermediates)."""
    model = _skip_model()
    with torch.no_grad():
        for p in model.skip.classifier.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    b, x = model.backbone, torch.randn(2, 3, 40, 72)
    with torch.no_grad():
        low = b.layer1(b.maxpool(b.act1(b.bn1(b.conv1(x)))))
        high = b.layer4(b.layer3(b.layer2(low)))
        assert low.shape[-2:] == (10, 18) and high.shape[-2:] == (5, 9)  # strides 4 and 8
        aspp = sum(conv(high) for conv in model.aspp.conv2d_list)
        fine = F.interpolate(aspp, size=(10, 18), mode="bilinear", align_corners=True)
        fine = fine + model.skip.classifier(F.relu(model.skip.reduce[1](model.skip.reduce[0](low))))
        expected = F.interpolate(fine, size=(40, 72), mode="bilinear", align_corners=True)
        got = model(x)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, DeepLabV2.forward(_plain_view(model), x))


def _save(path: Path, model: DeepLabV2) -> Path:
    save_checkpoint(path, model)
    return path


def _plain_view(model: DeepLabV2) -> DeepLabV2:
    clone = copy.deepcopy(model)
    clone.skip = None
    return clone


def test_skip_in_head_group_and_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _skip_model()
    with torch.no_grad():
        model.skip.classifier.weight.normal_()
    groups = param_groups(model, lr=1.0, head_lr_mult=10.0)
    head = {id(p) for p in groups[1]["params"]}
    assert {id(p) for p in model.skip.parameters()} <= head
    assert head == {id(p) for p in [*model.aspp.parameters(), *model.skip.parameters()]}
    path = tmp_path / "m.pt"
    save_checkpoint(path, model)
    assert checkpoint_meta(path)["skip"] is True and checkpoint_architecture(path)["skip"] is True
    loaded = load_model(path, "cpu")
    assert loaded.skip is not None
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    published = write_published_layout(path, tmp_path / "pub.pt")  # prefixed like every other key
    assert "seg_model.skip.classifier.weight" in torch.load(published, weights_only=True)
    assert checkpoint_architecture(published)["skip"] is True and has_skip_branch(published)  # read from the keys
    plain_copy = write_published_layout(_save(tmp_path / "plain.pt", DeepLabV2("resnet10t", 5)), tmp_path / "p.pth")
    assert checkpoint_architecture(plain_copy)["skip"] is False and not has_skip_branch(plain_copy)
    again = DeepLabV2("resnet10t", num_classes=5, aspp_rates=(1, 2), skip=True).eval()
    load_checkpoint(again, published, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    with pytest.raises(InputError, match=r"unexpected \(skip\."):  # a published-architecture model has no branch
        load_checkpoint(DeepLabV2("resnet10t", num_classes=5, aspp_rates=(1, 2)), published, strict=True)


def test_checkpoints_without_skip_in_meta_load_as_plain(small: DeepLabV2, tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    save_checkpoint(path, small)
    obj = torch.load(path, weights_only=True)
    del obj["meta"]["skip"]  # a file written before the skip branch existed
    torch.save(obj, path)
    assert checkpoint_architecture(path)["skip"] is False
    assert load_model(path, "cpu").skip is None


def test_init_checkpoint_of_the_other_architecture_is_refused(small: DeepLabV2, tmp_path: Path) -> None:
    """A non-strict load would silently drop the skip branch (or leave it random): refused, naming the field."""
    plain, skipped = tmp_path / "plain.pt", tmp_path / "skip.pt"
    save_checkpoint(plain, small)
    save_checkpoint(skipped, DeepLabV2("resnet10t", num_classes=5, skip=True))
    with pytest.raises(InputError, match=r"skip: .*plain\.pt lacks the skip branch, the run asks for skip: true"):
        build_model("resnet10t", 5, RATES, init_checkpoint=str(plain), skip=True)
    with pytest.raises(InputError, match=r"skip: .*skip\.pt has the skip branch, the run asks for skip: false"):
        build_model("resnet10t", 5, RATES, init_checkpoint=str(skipped), skip=False)
    assert build_model("resnet10t", 5, RATES, init_checkpoint=str(skipped), skip=True).skip is not None
