"""Class lists, colour palettes and evaluation protocols (docs/method.md §7.2 and 7.3).

A *protocol* says which classes a model predicts and which of them enter the mean IoU:
- ``cityscapes19``: the 19 Cityscapes train ids, all evaluated;
- ``synthia16``: the same 19-way model, mean over 16 classes (terrain, truck, train dropped);
- ``synthia13``: additionally drops wall, fence and pole;
- ``oxford9``: a 9-way model (Cityscapes → Oxford RobotCar), all evaluated.

The SYNTHIA means are computed over the listed classes explicitly, never by rescaling a 19-class mean
(docs/method.md §9.4, B22).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hias_nb.errors import InputError

__all__ = [
    "IGNORE",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_PALETTE",
    "OXFORD_CLASSES",
    "OXFORD_PALETTE",
    "SYNTHIA_IGNORED",
    "HARD_CANDIDATES",
    "Protocol",
    "PROTOCOLS",
    "get_protocol",
    "colorize",
]

IGNORE = 255

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

CITYSCAPES_PALETTE: np.ndarray = np.array(
    [
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
        (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
        (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ],
    dtype=np.uint8,
)  # fmt: skip

# Cityscapes -> Oxford RobotCar 9-class protocol (docs/method.md §7.3), in the published palette order.
OXFORD_CLASSES: tuple[str, ...] = (
    "sky", "person", "two-wheel", "automobile", "sign", "light", "building", "sidewalk", "road",
)  # fmt: skip
OXFORD_PALETTE: np.ndarray = CITYSCAPES_PALETTE[[10, 11, 18, 13, 7, 6, 2, 1, 0]]

# Classes SYNTHIA has no (usable) labels for: never "hard" in HPLA, never in synthia16/13 means.
SYNTHIA_IGNORED: tuple[int, ...] = (9, 14, 16)

# The thin and small classes that toytown makes rare (pole .. bicycle except the large vehicles).
HARD_CANDIDATES: tuple[int, ...] = (5, 6, 7, 11, 12, 17, 18)


@dataclass(frozen=True)
class Protocol:
    """A label protocol: the classes a model predicts and the subset that enters the mean IoU."""

    name: str
    classes: tuple[str, ...]
    evaluated: tuple[int, ...]
    palette: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.classes)


PROTOCOLS: dict[str, Protocol] = {
    "cityscapes19": Protocol("cityscapes19", CITYSCAPES_CLASSES, tuple(range(19)), CITYSCAPES_PALETTE),
    "synthia16": Protocol(
        "synthia16",
        CITYSCAPES_CLASSES,
        tuple(c for c in range(19) if c not in SYNTHIA_IGNORED),
        CITYSCAPES_PALETTE,
    ),
    "synthia13": Protocol(
        "synthia13",
        CITYSCAPES_CLASSES,
        tuple(c for c in range(19) if c not in (*SYNTHIA_IGNORED, 3, 4, 5)),
        CITYSCAPES_PALETTE,
    ),
    "oxford9": Protocol("oxford9", OXFORD_CLASSES, tuple(range(9)), OXFORD_PALETTE),
}


def get_protocol(name: str) -> Protocol:
    """Look a protocol up by name; an unknown name is an `InputError` that lists the known ones."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise InputError(f"protocol: unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}") from None


def colorize(label: np.ndarray, palette: np.ndarray = CITYSCAPES_PALETTE) -> np.ndarray:
    """Map a label map `[H,W]` (class ids, 255 ignored) to an RGB image `[H,W,3]` uint8; ignored is black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = palette
    return lut[np.asarray(label, dtype=np.uint8)]
