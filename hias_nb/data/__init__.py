"""Datasets: manifests describing each dataset on disk, the one reader `SegDataset`, and `check_dataset`."""

from hias_nb.data.datasets import (
    SegDataset,
    check_dataset,
    decode_label,
    format_problems,
    read_raw_label,
    resize_image,
    resize_label,
)
from hias_nb.data.manifests import (
    LabelSpec,
    Manifest,
    Sample,
    SplitSpec,
    list_manifests,
    load_manifest,
)

__all__ = [
    "LabelSpec",
    "Manifest",
    "Sample",
    "SplitSpec",
    "SegDataset",
    "check_dataset",
    "decode_label",
    "format_problems",
    "list_manifests",
    "load_manifest",
    "read_raw_label",
    "resize_image",
    "resize_label",
]
