"""The one dataset reader, label decoding and the dataset checker (docs/method.md §6.7 and 7.3).

Every dataset (GTA5, SYNTHIA, Cityscapes, Oxford RobotCar, toytown) is read by `SegDataset` from its
manifest (`hias_nb.data.manifests`): raw label values go through a lookup table to train ids, 255 ignored.

Unlike the published loader, which prints a loading error and silently substitutes a neighbouring sample
(docs/method.md §9.4, B20), a missing, corrupt or mismatched file is always an `InputError` that names the file.
`check_dataset` walks a whole tree and returns every problem it finds, for ``hias-nb data check``.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import png
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from hias_nb.classes import Protocol
from hias_nb.data.manifests import LabelSpec, Manifest, Sample, load_manifest
from hias_nb.errors import InputError
from hias_nb.io import read_label, read_rgb

__all__ = [
    "read_raw_label",
    "decode_label",
    "SegDataset",
    "check_dataset",
    "format_problems",
    "resize_image",
    "resize_label",
]


def _read_png16(path: Path, channel: int) -> np.ndarray:
    """Channel `channel` of a PNG of any bit depth as int64 `[H,W]`, with pypng (Pillow truncates 16-bit RGB)."""
    try:
        width, height, rows, info = png.Reader(filename=str(path)).read()
        data = np.array([np.asarray(row) for row in rows], dtype=np.int64)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (png.Error, zlib.error, OSError, ValueError, EOFError) as e:
        raise InputError(f"{path}: unreadable or corrupt PNG ({e})") from None
    planes = info["planes"]
    data = data.reshape(height, width, planes)
    if planes == 1:  # 16-bit grey (or palette indices): the value itself is the class id
        return data[..., 0]
    if channel >= planes:
        raise InputError(f"{path}: label has {planes} channels, channel {channel} requested")
    return data[..., channel]


def read_raw_label(path: str | Path, label: LabelSpec) -> np.ndarray:
    """Read a label file's raw values as int64 `[H,W]`, as its encoding says (before `decode_label`)."""
    path = Path(path)
    if label.encoding == "png16rgb":
        return _read_png16(path, label.channel)
    if label.encoding == "rgba":
        return read_label(path, channel=label.channel)
    return read_label(path)  # png8, png16: single channel (Pillow keeps 16-bit grey values)


def _invalid_values(raw: np.ndarray, label: LabelSpec) -> np.ndarray:
    """The distinct raw values of `raw` that `label.valid_values` does not allow (sorted, int64)."""
    if raw.size == 0:
        return np.zeros(0, dtype=np.int64)
    if raw.min() < 0 or raw.max() >= label.valid_lut.size:
        out_of_range = (raw < 0) | (raw >= label.valid_lut.size)
        inside = raw[~out_of_range]
        return np.union1d(np.unique(raw[out_of_range]), np.unique(inside[~label.valid_lut[inside]]))
    return np.unique(raw[~label.valid_lut[raw]])


def decode_label(raw: np.ndarray, manifest: Manifest, path: str | Path) -> np.ndarray:
    """Raw label values `[H,W]` -> train ids uint8 `[H,W]` (0..C-1, 255 ignored), by table lookup.

    A value outside the manifest's ``valid_values`` is an `InputError` naming `path` and the values.
    """
    bad = _invalid_values(raw, manifest.label)
    if bad.size:
        raise InputError(
            f"{path}: label value(s) {', '.join(map(str, bad[:10].tolist()))} not in the valid values of "
            f"{manifest.name} ({manifest.label.describe_valid()})"
        )
    return manifest.label.lut[raw]


def _resolve(dataset: str | Path | Manifest) -> Manifest:
    return dataset if isinstance(dataset, Manifest) else load_manifest(dataset)


class SegDataset(Dataset):
    """Images and train-id labels of one split of one dataset, in a fixed order (sorted image paths).

    Args:
        dataset: a dataset name (``"cityscapes"``), a manifest YAML path or a `Manifest`.
        root: the dataset's root folder (a ``manifest.json`` there overrides counts and size).
        split: a split of the manifest (``"train"``, ``"target_val"``, ...).
        size: ``(H, W)`` to resize every sample to (image bilinear, label nearest), or None to keep it.

    ``ds[i]`` is ``{"image": uint8 [3,H,W], "label": int64 [H,W], "name": str, "index": int}``; a split
    without labels gives an all-255 label. Construction fails with `InputError` when the root is missing,
    the split is empty or a label file is missing.
    """

    def __init__(
        self,
        dataset: str | Path | Manifest,
        root: str | Path,
        split: str,
        size: tuple[int, int] | None = None,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"{root}: dataset root not found")
        self.manifest = _resolve(dataset).with_overrides(root)
        self.root = root
        self.split = split
        self.size = None if size is None else (int(size[0]), int(size[1]))
        spec = self.manifest.split(split)
        self.samples: list[Sample] = self.manifest.pairs(root, split)
        if not self.samples:
            raise InputError(
                f"{spec.image_folder(root)}: no images of {self.manifest.name}/{split} "
                f"(expected files like {root / spec.image})"
            )
        missing = [s for s in self.samples if s.label is not None and not s.label.is_file()]
        if missing:
            raise InputError(
                f"{missing[0].image}: label file {missing[0].label} not found "
                f"({len(missing)} of {len(self.samples)} images of {self.manifest.name}/{split} lack labels)"
            )

    @property
    def protocol(self) -> Protocol:
        return self.manifest.protocol

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image = read_rgb(sample.image)  # uint8 [H,W,3]
        if sample.label is None:
            label = np.full(image.shape[:2], 255, dtype=np.uint8)
        else:
            if not sample.label.is_file():
                raise InputError(f"{sample.image}: label file {sample.label} not found")
            label = decode_label(read_raw_label(sample.label, self.manifest.label), self.manifest, sample.label)
            if label.shape != image.shape[:2]:
                raise InputError(
                    f"{sample.image}: image size {image.shape[0]}x{image.shape[1]} differs from label "
                    f"{sample.label} size {label.shape[0]}x{label.shape[1]}"
                )
        image_t = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)  # [3,H,W]
        label_t = torch.from_numpy(label.astype(np.int64))  # [H,W]
        if self.size is not None and tuple(label_t.shape) != self.size:
            image_t = resize_image(image_t, self.size)
            label_t = resize_label(label_t, self.size)
        return {"image": image_t.contiguous(), "label": label_t.contiguous(), "name": sample.id, "index": index}


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 `[3,H,W]` -> uint8 `[3,h,w]`, bilinear (half-pixel centres), rounded."""
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return out.round().clamp(0, 255).to(torch.uint8)


def resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """int64 `[H,W]` -> int64 `[h,w]`, nearest with half-pixel centres (never mixes class ids)."""
    return F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(torch.int64)


# ---------------------------------------------------------------------------------------------- checking


def check_dataset(
    name: str | Path | Manifest,
    root: str | Path,
    splits: list[str] | None = None,
    progress: bool = True,
    expect_counts: bool = True,
) -> list[str]:
    """Check a dataset tree against its manifest and return every problem found (empty list: all good).

    Reported, each as one line naming the file (or folder): missing root, missing image or label folder,
    count mismatch (expected vs found; skipped with ``expect_counts=False``, e.g. for a partial copy),
    images without labels, labels without images, unreadable or corrupt images and labels, images of the
    wrong size, label values outside ``valid_values`` (which values, which file) and image/label size
    mismatch. Every image and label is decoded in full. ``root/manifest.json`` overrides counts and sizes.
    Unknown dataset or split names raise `InputError` (they are not problems of the tree).
    """
    root = Path(root)
    manifest = _resolve(name)
    for split in splits or []:
        manifest.split(split)  # unknown split names raise here, before any work
    if not root.is_dir():
        return [f"{root}: dataset root of {manifest.name} not found"]
    problems: list[str] = []
    try:
        manifest = manifest.with_overrides(root)
    except InputError as e:
        problems.append(f"{e} (using the counts and sizes of {manifest.path or manifest.name})")
    for split in splits or list(manifest.splits):
        problems += _check_split(manifest, root, split, progress, expect_counts)
    return problems


def _check_split(manifest: Manifest, root: Path, split: str, progress: bool, expect_counts: bool) -> list[str]:
    spec = manifest.split(split)
    where = f"{manifest.name}/{split}"
    problems: list[str] = []
    image_folder, label_folder = spec.image_folder(root), spec.label_folder(root)
    if not image_folder.is_dir():
        problems.append(f"{image_folder}: image folder of {where} not found")
    if label_folder is not None and not label_folder.is_dir():
        problems.append(f"{label_folder}: label folder of {where} not found")
    samples = manifest.pairs(root, split) if image_folder.is_dir() else []
    if expect_counts and spec.count is not None and len(samples) != spec.count:
        problems.append(f"{image_folder}: {where} has {len(samples)} images, expected {spec.count}")
    if label_folder is not None and label_folder.is_dir():
        for orphan in manifest.orphan_labels(root, split):
            problems.append(f"{orphan}: label without an image in {where}")
    for sample in tqdm(samples, desc=f"check {where}", unit="img", disable=not progress):
        problems += _check_sample(manifest, spec.size, sample)
    return problems


def _check_sample(manifest: Manifest, size: tuple[int, int] | None, sample: Sample) -> list[str]:
    problems = []
    try:
        image_hw = read_rgb(sample.image).shape[:2]
    except InputError as e:
        problems.append(str(e))
        image_hw = None
    if image_hw is not None and size is not None and image_hw != size:
        problems.append(f"{sample.image}: image size {image_hw[0]}x{image_hw[1]}, expected {size[0]}x{size[1]}")
    if sample.label is None:
        return problems
    if not sample.label.is_file():
        return [*problems, f"{sample.image}: label file {sample.label} not found"]
    try:
        raw = read_raw_label(sample.label, manifest.label)
    except InputError as e:
        return [*problems, str(e)]
    bad = _invalid_values(raw, manifest.label)
    if bad.size:
        problems.append(
            f"{sample.label}: label value(s) {', '.join(map(str, bad[:20].tolist()))}"
            f"{' ...' if bad.size > 20 else ''} not in the valid values of {manifest.name} "
            f"({manifest.label.describe_valid()})"
        )
    if image_hw is not None and raw.shape != image_hw:
        problems.append(
            f"{sample.image}: image size {image_hw[0]}x{image_hw[1]} differs from label {sample.label} "
            f"size {raw.shape[0]}x{raw.shape[1]}"
        )
    return problems


def format_problems(problems: list[str], name: str = "dataset", limit: int | None = 50) -> str:
    """A summary for the command line: a count line, then at most `limit` problems, then how many more."""
    if not problems:
        return f"{name}: no problems found"
    shown = problems if limit is None else problems[:limit]
    lines = [f"{name}: {len(problems)} problem{'s' if len(problems) != 1 else ''} found", *shown]
    if len(shown) < len(problems):
        lines.append(f"... and {len(problems) - len(shown)} more")
    return "\n".join(lines)
