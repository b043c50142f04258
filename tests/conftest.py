from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_toytown(tmp_path_factory):
    """A small toytown (24 target-train images at 32x64) shared by the tests that need real files."""
    from hias_nb.data.toytown import generate_toytown

    root = tmp_path_factory.mktemp("toytown") / "tt"
    generate_toytown(root, images=24, seed=0, size=(32, 64), progress=False)
    return root
