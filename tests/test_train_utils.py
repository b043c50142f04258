from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from hias_nb.runner import InfiniteSampler, lr_factor
from hias_nb.train import ema_update, recalibrate_bn


def test_ema_update_params_average_buffers_copy():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.train()(torch.randn(2, 3, 5, 5))  # changes the student's running stats
    t_before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t0, t, s in zip(t_before, teacher.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        assert torch.equal(t, s)


def test_infinite_sampler_resume_continues_the_same_stream():
    full = list(itertools.islice(iter(InfiniteSampler(7, seed=3)), 30))
    resumed = list(itertools.islice(iter(InfiniteSampler(7, seed=3, start=12)), 18))
    assert resumed == full[12:]
    assert sorted(full[:7]) == list(range(7))  # each epoch is a permutation
    pairs = list(itertools.islice(iter(InfiniteSampler(7, seed=3, positions=True)), 30))
    assert [p for p, _ in pairs] == list(range(30)) and [i for _, i in pairs] == full


def test_lr_factor_cosine_endpoints_and_warmup():
    assert lr_factor(0, 100, "cosine") == 1.0
    assert abs(lr_factor(100, 100, "cosine") - 1e-3) < 1e-12
    assert abs(lr_factor(50, 100, "cosine") - (1e-3 + (1 - 1e-3) / 2)) < 1e-12
    assert lr_factor(4, 100, "cosine", warmup=10) == 0.5
    assert lr_factor(50, 100, "constant") == 1.0


def test_recalibrate_bn_matches_target_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 1, bias=False), nn.BatchNorm2d(2))
    batches = [torch.randint(0, 256, (4, 3, 6, 6), dtype=torch.uint8) for _ in range(3)]
    recalibrate_bn(model, iter(batches), "cpu", progress=False)
    from hias_nb.augment import normalize

    feats = torch.cat([model[0](normalize(b)) for b in batches])
    torch.testing.assert_close(model[1].running_mean, feats.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    assert not model.training


def test_amp_modes_resolve_per_device_and_parse_from_yaml(monkeypatch, tmp_path):
    from hias_nb import runner
    from hias_nb.config import load_config, parse_overrides
    from hias_nb.errors import InputError
    from hias_nb.train import TrainConfig

    monkeypatch.setattr(runner, "cpu_has_native_bf16", lambda: False)
    assert [runner.resolve_amp("cpu", m) for m in ("bf16", "fp16", "off")] == ["off", "off", "off"]
    monkeypatch.setattr(runner, "cpu_has_native_bf16", lambda: True)
    assert [runner.resolve_amp("cpu", m) for m in ("bf16", "fp16", "off")] == ["bf16", "off", "off"]
    with runner.autocast_context("cpu", "bf16"):
        assert torch.is_autocast_cpu_enabled() and torch.get_autocast_cpu_dtype() == torch.bfloat16
    with runner.autocast_context("cpu", "off"):
        assert not torch.is_autocast_cpu_enabled()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # an older GPU
    assert [runner.resolve_amp("cuda:0", m) for m in ("bf16", "fp16", "off")] == ["fp16", "fp16", "off"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert [runner.resolve_amp("cuda", m) for m in ("bf16", "fp16", "off")] == ["bf16", "fp16", "off"]
    assert runner.make_scaler("cpu", "fp16").is_enabled() is False  # a scaler only where fp16 runs
    # YAML reads a bare `off` as false: the setting takes it back; anything else is refused by name
    (tmp_path / "c.yaml").write_text("amp: off\n")
    assert load_config(TrainConfig, tmp_path / "c.yaml").amp == "off"
    assert load_config(TrainConfig, None, parse_overrides(["--amp", "fp16"])).amp == "fp16"
    for bad in ("true", "fp8"):
        with pytest.raises(InputError, match="amp"):
            load_config(TrainConfig, None, parse_overrides(["--amp", bad]))
