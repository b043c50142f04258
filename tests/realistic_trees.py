"""Tiny datasets in the real on-disk layouts, at the real image sizes: GTA5 (palette PNG labels holding
Cityscapes labelIds), SYNTHIA-RAND-CITYSCAPES (16-bit RGB labels, class id in channel 0), Cityscapes
(``leftImg8bit``/``gtFine`` labelIds) and Oxford RobotCar (RGBA annotations, class id in channel 0). Images are
smooth noise (fast to write and read); labels are blocky maps of valid raw ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import png
from PIL import Image

CITYSCAPES_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33, 0]
SYNTHIA_IDS = [3, 4, 2, 21, 5, 7, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11, 0]
OXFORD_IDS = list(range(1, 18)) + [0]


def _image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    small = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _blocks(rng: np.random.Generator, h: int, w: int, ids: list[int]) -> np.ndarray:
    small = rng.choice(np.asarray(ids), size=(max(2, h // 64), max(2, w // 64)))
    return np.asarray(Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.NEAREST))


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)).save(path, compress_level=1)


def gta5(root: Path, n: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(1, n + 1):
        h, w = (1052, 1914) if i != 2 else (1055, 1914)  # GTA5's sizes vary a little
        _save(root / f"images/{i:05d}.png", _image(rng, h, w))
        lab = Image.fromarray(_blocks(rng, h, w, CITYSCAPES_IDS), mode="P")
        lab.putpalette(list(rng.integers(0, 256, 768, dtype=np.uint8)))
        (root / "labels").mkdir(parents=True, exist_ok=True)
        lab.save(root / "labels" / f"{i:05d}.png")
    return root


def synthia(root: Path, n: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = 760, 1280
        _save(root / f"RGB/{i:07d}.png", _image(rng, h, w))
        lab = np.zeros((h, w, 3), dtype=np.uint16)
        lab[..., 0] = _blocks(rng, h, w, SYNTHIA_IDS)
        lab[..., 1] = 0x1234  # instance ids in the other channels
        path = root / f"GT/LABELS/{i:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            png.Writer(w, h, greyscale=False, bitdepth=16, compression=1).write(f, lab.reshape(h, -1).tolist())
    return root


def cityscapes(root: Path, n_train: int = 4, n_val: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n, city in (("train", n_train, "aachen"), ("val", n_val, "frankfurt")):
        for i in range(n):
            sid = f"{city}_{i:06d}_000019"
            _save(root / f"leftImg8bit/{split}/{city}/{sid}_leftImg8bit.png", _image(rng, 1024, 2048))
            _save(root / f"gtFine/{split}/{city}/{sid}_gtFine_labelIds.png", _blocks(rng, 1024, 2048, CITYSCAPES_IDS))
    return root


def oxford(root: Path, n_train: int = 4, n_val: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        _save(root / f"train/{1418132504537582 + i}.png", _image(rng, 960, 1280))
    for i in range(n_val):
        sid = 1418381798086398 + i
        _save(root / f"val/{sid}.png", _image(rng, 960, 1280))
        ids = _blocks(rng, 960, 1280, OXFORD_IDS)
        rgba = np.stack([ids, np.full_like(ids, 77), ids // 2, np.full_like(ids, 255)], -1)
        _save(root / f"anno/{sid}.png", rgba.astype(np.uint8), mode="RGBA")
    return root
