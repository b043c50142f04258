"""Dataset descriptions: one YAML file per dataset in ``data_manifests/`` (docs/method.md §6.7 and 7.3).

A manifest says where a dataset's images and labels lie relative to its root, how a label file is encoded,
which raw values it may hold and how they map to train ids, and how many files of which size each split has.
The schema is documented in ``data_manifests/README.md``; unknown keys are errors, never ignored.

Templates such as ``"leftImg8bit/train/{city}/{id}_leftImg8bit.png"`` are used both ways: as a glob (each
``{field}`` becomes ``*``) to find the images, as a regex to read the fields back out of a path, and formatted
with those fields to name the label file that belongs to an image.

A dataset root may contain a ``manifest.json`` (written by the toytown generator, or by hand for a subset)
with ``"counts": {split: n}`` and ``"size": [H, W]``; these override the YAML's counts and sizes
(`Manifest.with_overrides`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hias_nb.classes import IGNORE, Protocol, get_protocol
from hias_nb.errors import InputError
from hias_nb.io import read_json

__all__ = [
    "ENCODINGS",
    "LabelSpec",
    "SplitSpec",
    "Sample",
    "Manifest",
    "manifest_dirs",
    "list_manifests",
    "load_manifest",
]

# png8: 8-bit grey or palette; png16: 16-bit (or 8-bit) grey; rgba: one channel of an 8-bit RGB(A) file;
# png16rgb: one channel of a 16-bit RGB(A) file, which Pillow would truncate to 8 bits (read with pypng).
ENCODINGS: tuple[str, ...] = ("png8", "png16", "rgba", "png16rgb")
_MAX_RAW = {"png8": 255, "rgba": 255, "png16": 65535, "png16rgb": 65535}

_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class LabelSpec:
    """How a label file is decoded: raw value -> train id (every valid raw value not in `map` -> 255)."""

    encoding: str
    valid_values: tuple[tuple[int, int], ...]  # inclusive ranges; a single value v is (v, v)
    map: Mapping[int, int]
    channel: int = 0  # the channel holding the class id (rgba, png16rgb)

    @functools.cached_property
    def lut(self) -> np.ndarray:
        """uint8 `[65536]`: train id of each raw value (255 for unmapped or invalid values)."""
        lut = np.full(65536, IGNORE, dtype=np.uint8)
        lut[list(self.map)] = list(self.map.values())
        return lut

    @functools.cached_property
    def valid_lut(self) -> np.ndarray:
        """bool `[65536]`: whether a raw value may occur in a label file."""
        valid = np.zeros(65536, dtype=bool)
        for lo, hi in self.valid_values:
            valid[lo : hi + 1] = True
        return valid

    def describe_valid(self) -> str:
        return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.valid_values)


@dataclass(frozen=True)
class SplitSpec:
    """One split: image and label path templates relative to the dataset root, expected count and size."""

    name: str
    image: str
    label: str | None  # None: the split has no labels (every pixel 255)
    count: int | None  # expected number of samples after `exclude`; None: not checked
    size: tuple[int, int] | None  # (H, W) of every image; None: sizes vary
    exclude: frozenset[str] = frozenset()  # sample ids left out (GTA5's 25 images, docs/method.md §6.7)

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(_FIELD.findall(self.image)))

    def image_folder(self, root: Path) -> Path:
        return root / _static_prefix(self.image)

    def label_folder(self, root: Path) -> Path | None:
        return None if self.label is None else root / _static_prefix(self.label)


@dataclass(frozen=True)
class Sample:
    """One image with its label file (None where the split has no labels) and its id."""

    image: Path
    label: Path | None
    id: str


@dataclass(frozen=True)
class Manifest:
    """A parsed ``data_manifests/<name>.yaml``."""

    name: str
    description: str
    protocol_name: str
    label: LabelSpec
    splits: Mapping[str, SplitSpec]
    path: Path | None = None  # the YAML file it was read from

    @property
    def protocol(self) -> Protocol:
        return get_protocol(self.protocol_name)

    def split(self, name: str) -> SplitSpec:
        """The split called `name`; an unknown name is an `InputError` listing the known ones."""
        try:
            return self.splits[name]
        except KeyError:
            raise InputError(
                f"{self.path or self.name}: dataset {self.name!r} has no split {name!r}; "
                f"known: {', '.join(self.splits)}"
            ) from None

    def with_overrides(self, root: str | Path) -> Manifest:
        """This manifest with counts and size taken from ``root/manifest.json`` where present.

        ``"counts": {split: n}`` overrides the count of each split it names; ``"size": [H, W]`` the size of
        every split. Other keys of ``manifest.json`` (seed, generator version, ...) are not ours to judge.
        """
        path = Path(root) / "manifest.json"
        if not path.is_file():
            return self
        info = read_json(path)
        if not isinstance(info, dict):
            raise InputError(f"{path}: expected a JSON object")
        counts = info.get("counts", {})
        if not isinstance(counts, dict):
            raise InputError(f"{path}: 'counts' must be an object {{split: n}}")
        for split, n in counts.items():
            if split not in self.splits:
                raise InputError(f"{path}: counts: unknown split {split!r}; known: {', '.join(self.splits)}")
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise InputError(f"{path}: counts.{split}: expected a non-negative integer, got {n!r}")
        size = info.get("size", "absent")
        if size != "absent":
            size = _parse_size(size, f"{path}: size")
        splits = {
            name: dataclasses.replace(s, count=counts.get(name, s.count), size=s.size if size == "absent" else size)
            for name, s in self.splits.items()
        }
        return dataclasses.replace(self, splits=splits)

    def pairs(self, root: str | Path, split: str) -> list[Sample]:
        """Every sample of `split` under `root`, sorted by image path (relative, POSIX) for a fixed order.

        Images are found by globbing the image template; the label path is formatted from the image's fields
        (it may not exist: `SegDataset` and `check_dataset` report that). Excluded ids are left out.
        """
        root = Path(root)
        spec = self.split(split)
        samples = []
        for rel, fields in _match(root, spec.image):
            sample_id = fields["id"]
            if sample_id in spec.exclude:
                continue
            label = None if spec.label is None else root / spec.label.format(**fields)
            samples.append((rel, Sample(root / rel, label, sample_id)))
        samples.sort(key=lambda t: t[0])
        return [s for _, s in samples]

    def orphan_labels(self, root: str | Path, split: str) -> list[Path]:
        """Label files of `split` that match the label template but have no image (sorted)."""
        root = Path(root)
        spec = self.split(split)
        if spec.label is None:
            return []
        orphans = []
        for rel, fields in _match(root, spec.label):
            if fields["id"] not in spec.exclude and not (root / spec.image.format(**fields)).is_file():
                orphans.append(rel)
        return [root / rel for rel in sorted(orphans)]


def _static_prefix(template: str) -> str:
    """The folder part of `template` before its first field: ``"a/b/{city}/{id}.png"`` -> ``"a/b"``."""
    head = template.split("{", 1)[0]
    return head.rsplit("/", 1)[0] if "/" in head else ""


def _template_regex(template: str) -> re.Pattern[str]:
    parts, seen, pos = [], set(), 0
    for m in _FIELD.finditer(template):
        parts.append(re.escape(template[pos : m.start()]))
        name = m.group(1)
        parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>[^/]+)")
        seen.add(name)
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts))


def _match(root: Path, template: str) -> list[tuple[str, dict[str, str]]]:
    """(relative POSIX path, fields) of every file under `root` that matches `template`."""
    regex = _template_regex(template)
    found = []
    for p in root.glob(_FIELD.sub("*", template)):
        rel = p.relative_to(root).as_posix()
        m = regex.fullmatch(rel)
        if m is not None and p.is_file():
            found.append((rel, m.groupdict()))
    return found


# ---------------------------------------------------------------------------------------------- loading


def manifest_dirs() -> list[Path]:
    """Where manifests are looked up: inside an installed wheel, then the repository's ``data_manifests/``."""
    here = Path(__file__).resolve()
    return [d for d in (here.parents[1] / "data_manifests", here.parents[2] / "data_manifests") if d.is_dir()]


def list_manifests() -> list[str]:
    """Names of the known datasets (the YAML files in the first manifest folder that exists), sorted."""
    dirs = manifest_dirs()
    return sorted(p.stem for p in dirs[0].glob("*.yaml")) if dirs else []


def load_manifest(name_or_path: str | Path) -> Manifest:
    """Read a manifest by dataset name (``"cityscapes"``) or from a YAML file path.

    Raises `InputError` for an unknown name (listing the known ones), unknown or missing keys, or values of
    the wrong type, naming the file and the key.
    """
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith((".yaml", ".yml")) or "/" in text:
        path = Path(name_or_path)
        if not path.is_file():
            raise InputError(f"{path}: manifest file not found")
    else:
        dirs = manifest_dirs()
        if not dirs or not (dirs[0] / f"{text}.yaml").is_file():
            raise InputError(f"dataset: unknown dataset {text!r}; known: {', '.join(list_manifests())}")
        path = dirs[0] / f"{text}.yaml"
    try:
        doc = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid YAML ({e})") from None
    return _parse_manifest(doc, path)


_TOP_KEYS = {"name", "description", "protocol", "label", "splits"}
_LABEL_KEYS = {"encoding", "valid_values", "map", "channel"}
_SPLIT_KEYS = {"image", "label", "count", "size", "exclude"}


def _check_keys(obj: Any, allowed: set[str], required: set[str], where: str, path: Path) -> None:
    if not isinstance(obj, dict):
        raise InputError(f"{path}: {where or 'file'}: expected a mapping, got {type(obj).__name__}")
    prefix = f"{where}." if where else ""
    for key in obj:
        if key not in allowed:
            raise InputError(f"{path}: unknown key {prefix}{key!r}; allowed: {', '.join(sorted(allowed))}")
    missing = sorted(required - set(obj))
    if missing:
        raise InputError(f"{path}: missing key {prefix}{missing[0]}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_size(value: Any, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value)):
        raise InputError(f"{where}: expected [H, W] with positive integers or null, got {value!r}")
    return (value[0], value[1])


def _parse_label(doc: Any, path: Path, num_classes: int) -> LabelSpec:
    _check_keys(doc, _LABEL_KEYS, {"encoding", "valid_values", "map"}, "label", path)
    encoding = doc["encoding"]
    if encoding not in ENCODINGS:
        raise InputError(f"{path}: label.encoding: {encoding!r} is not one of {', '.join(ENCODINGS)}")
    channel = doc.get("channel", 0)
    if not (_is_int(channel) and 0 <= channel <= 3):
        raise InputError(f"{path}: label.channel: expected 0..3, got {channel!r}")
    max_raw = _MAX_RAW[encoding]
    ranges = []
    if not isinstance(doc["valid_values"], list) or not doc["valid_values"]:
        raise InputError(f"{path}: label.valid_values: expected a non-empty list of values and [lo, hi] ranges")
    for item in doc["valid_values"]:
        if _is_int(item):
            lo, hi = item, item
        elif isinstance(item, list) and len(item) == 2:
            lo, hi = item
        else:
            lo = hi = None
        if not (_is_int(lo) and _is_int(hi) and 0 <= lo <= hi <= max_raw):
            raise InputError(
                f"{path}: label.valid_values: {item!r} is neither a value nor a range [lo, hi] "
                f"within 0..{max_raw} ({encoding})"
            )
        ranges.append((lo, hi))
    spec_map = doc["map"]
    if not isinstance(spec_map, dict):
        raise InputError(f"{path}: label.map: expected a mapping raw id -> train id")
    spec = LabelSpec(encoding, tuple(ranges), {}, channel)
    for raw, train in spec_map.items():
        if not (_is_int(raw) and 0 <= raw <= max_raw and spec.valid_lut[raw]):
            raise InputError(f"{path}: label.map: raw id {raw!r} is not in valid_values ({spec.describe_valid()})")
        if not (_is_int(train) and (0 <= train < num_classes or train == IGNORE)):
            raise InputError(
                f"{path}: label.map: raw id {raw} maps to {train!r}, not a train id 0..{num_classes - 1} or 255"
            )
    return dataclasses.replace(spec, map=dict(spec_map))


def _parse_split(name: str, doc: Any, path: Path) -> SplitSpec:
    where = f"splits.{name}"
    _check_keys(doc, _SPLIT_KEYS, {"image", "label", "count", "size"}, where, path)
    image, label = doc["image"], doc["label"]
    if not isinstance(image, str) or "id" not in _FIELD.findall(image):
        raise InputError(f"{path}: {where}.image: expected a path template containing {{id}}, got {image!r}")
    if label is not None:
        if not isinstance(label, str):
            raise InputError(f"{path}: {where}.label: expected a path template or null, got {label!r}")
        if set(_FIELD.findall(label)) != set(_FIELD.findall(image)):
            raise InputError(f"{path}: {where}.label: must use the same {{fields}} as the image template")
    count = doc["count"]
    if count is not None and not (_is_int(count) and count >= 0):
        raise InputError(f"{path}: {where}.count: expected a non-negative integer or null, got {count!r}")
    exclude = doc.get("exclude") or []
    # Ids must be quoted strings: YAML would read an unquoted 02154 as a number and lose the zero padding.
    if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
        raise InputError(f"{path}: {where}.exclude: expected a list of quoted id strings")
    size = _parse_size(doc["size"], f"{path}: {where}.size")
    return SplitSpec(name, image, label, count, size, frozenset(exclude))


def _parse_manifest(doc: Any, path: Path) -> Manifest:
    _check_keys(doc, _TOP_KEYS, _TOP_KEYS - {"description"}, "", path)
    name = doc["name"]
    if not isinstance(name, str) or not name:
        raise InputError(f"{path}: name: expected a non-empty string")
    try:
        protocol = get_protocol(doc["protocol"])
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    label = _parse_label(doc["label"], path, protocol.num_classes)
    splits_doc = doc["splits"]
    if not isinstance(splits_doc, dict) or not splits_doc:
        raise InputError(f"{path}: splits: expected a non-empty mapping of split name -> split")
    splits = {str(k): _parse_split(str(k), v, path) for k, v in splits_doc.items()}
    return Manifest(name, str(doc.get("description") or ""), protocol.name, label, splits, path)
