"""File I/O with clear errors and atomic writes.

Readers raise `InputError` naming the file; writers go through a temporary file in the same folder and
`os.replace`, so an interrupted run never leaves a half-written file behind (and never clobbers a good one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from hias_nb.errors import InputError

__all__ = [
    "atomic_path",
    "write_json",
    "write_png",
    "read_json",
    "read_rgb",
    "read_label",
    "image_size",
    "file_sha256",
]


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600: let the umask decide, as for any other file
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 `[H,W]` (grey) or `[H,W,3]` (RGB) array, or a uint16 `[H,W]` array, as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG", optimize=False)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def _open(path: Path) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()
        return im
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{path}: unreadable or corrupt image ({e})") from None


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image as RGB uint8 `[H,W,3]` (grey and RGBA images are converted)."""
    im = _open(Path(path))
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def read_label(path: str | os.PathLike, channel: int | None = None) -> np.ndarray:
    """Read a label image as integer ids `[H,W]` (int64), keeping 16-bit values.

    `channel` picks one channel of a multi-channel label (e.g. 0 for Oxford RobotCar's RGBA or SYNTHIA's
    16-bit RGB labels); `None` requires a single-channel file.
    """
    path = Path(path)
    im = _open(path)
    arr = np.asarray(im)
    if arr.ndim == 3:
        if channel is None:
            raise InputError(f"{path}: label has {arr.shape[2]} channels, expected a single-channel PNG")
        arr = arr[..., channel]
    elif im.mode == "P":
        arr = np.asarray(im)  # palette index = class id
    return arr.astype(np.int64)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of an image file, read from its header only."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{path}: unreadable or corrupt image ({e})") from None
    return h, w


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex): the identity of an input such as a checkpoint."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    return digest.hexdigest()
