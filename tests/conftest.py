from __future__ import annotations

import pytest
import torch

from hias_nb.models import DeepLabV2, save_checkpoint
from hias_nb.pseudo_label import PseudoLabelConfig, generate_pseudo_labels

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_toytown(tmp_path_factory):
    """A small toytown (24 target-train images at 32x64) shared by the tests that need real files."""
    from hias_nb.data.toytown import generate_toytown

    root = tmp_path_factory.mktemp("toytown") / "tt"
    generate_toytown(root, images=24, seed=0, size=(32, 64), progress=False)
    return root


@pytest.fixture(scope="session")
def model_ckpt(tmp_path_factory):
    """A random 19-class resnet10t whose head is scaled up: confident, varied predictions for pseudo-labelling."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "model.pt"
    model = DeepLabV2("resnet10t", num_classes=19, aspp_rates=(1, 2))
    with torch.no_grad():
        for conv in model.aspp.conv2d_list:
            conv.weight.mul_(30)
    save_checkpoint(path, model)
    return path


@pytest.fixture(scope="session")
def pseudo_dir(tiny_toytown, model_ckpt, tmp_path_factory):
    """IAS pseudo-labels (alpha 0.5) of `model_ckpt` over the tiny toytown's target-train split (read-only)."""
    out = tmp_path_factory.mktemp("pl") / "pseudo"
    cfg = PseudoLabelConfig(
        out=str(out), checkpoint=str(model_ckpt), data_root=str(tiny_toytown), alpha=0.5, progress=False, device="cpu"
    )
    return generate_pseudo_labels(cfg)
