"""hias_nb.io: atomic writes leave no temporary file behind and give the file the mode the umask allows."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from hias_nb.io import atomic_path, write_json
from hias_nb.models import DeepLabV2, save_checkpoint


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_are_as_readable_as_the_umask_allows(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        save_checkpoint(tmp_path / "m.pt", DeepLabV2("resnet10t", num_classes=3, aspp_rates=(1,)))
    finally:
        os.umask(old)
    for name in ("a.json", "m.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "m.pt"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"iteration": 1}, path)
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert torch.load(path, weights_only=True) == {"iteration": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
