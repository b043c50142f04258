"""`evaluate_stage`'s cache: reused for the same checkpoint and data, never for others."""

from __future__ import annotations

import json
import shutil

import torch

from hias_nb.data import SegDataset
from hias_nb.evaluate import evaluate_stage
from hias_nb.models import DeepLabV2, save_checkpoint


def _other_model(path) -> None:
    torch.manual_seed(1)
    model = DeepLabV2("resnet10t", num_classes=19, aspp_rates=(1, 2))
    with torch.no_grad():
        for conv in model.aspp.conv2d_list:
            conv.weight.mul_(30)
    save_checkpoint(path, model)


def test_cached_evaluation_is_reused_only_for_the_same_checkpoint(tiny_toytown, model_ckpt, tmp_path):
    ds = SegDataset("toytown", tiny_toytown, "target_val")
    ckpt, other = tmp_path / "model.pt", tmp_path / "other.pt"
    shutil.copy(model_ckpt, ckpt)
    _other_model(other)
    cache = tmp_path / "eval.json"
    first = evaluate_stage(cache, "stage", ckpt, ds, "cpu", batch_size=4)
    fresh_other = evaluate_stage(tmp_path / "other.json", "stage", other, ds, "cpu", batch_size=4)
    assert "cache_key" not in first and first["miou"] != fresh_other["miou"]

    # the same checkpoint and data: the cached entry is what comes back (a marked value proves it was not recomputed)
    marked = {**json.loads(cache.read_text()), "miou": -1.0}
    cache.write_text(json.dumps(marked))
    assert evaluate_stage(cache, "stage", ckpt, ds, "cpu", batch_size=4)["miou"] == -1.0

    # the checkpoint replaced under the same path: evaluated again, the old number never reported
    shutil.copy(other, ckpt)
    again = evaluate_stage(cache, "stage", ckpt, ds, "cpu", batch_size=4)
    assert again["miou"] == fresh_other["miou"]
    assert json.loads(cache.read_text())["miou"] == fresh_other["miou"]

    # other evaluation settings, or a cache written before keys were recorded: evaluated again too
    cache.write_text(json.dumps({**json.loads(cache.read_text()), "miou": -1.0}))
    assert evaluate_stage(cache, "stage", ckpt, ds, "cpu", batch_size=2)["miou"] == fresh_other["miou"]
    legacy = {k: v for k, v in json.loads(cache.read_text()).items() if k != "cache_key"}
    cache.write_text(json.dumps({**legacy, "miou": -1.0}))
    assert evaluate_stage(cache, "stage", ckpt, ds, "cpu", batch_size=2)["miou"] == fresh_other["miou"]
