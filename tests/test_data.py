"""Tests for hias_nb.data: manifests, label decoding, SegDataset and check_dataset.

Every dataset layout and label encoding is rebuilt as a tiny fake tree in tmp_path (a few 4x6 images); the
YAML counts of the real datasets are overridden with a ``manifest.json`` in the root, as documented.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import png
import pytest
import torch
from PIL import Image

from hias_nb.classes import PROTOCOLS
from hias_nb.data import (
    SegDataset,
    check_dataset,
    decode_label,
    format_problems,
    list_manifests,
    load_manifest,
    read_raw_label,
)
from hias_nb.errors import InputError

H, W = 4, 6
RNG = np.random.default_rng(0)

# Raw label patterns [H,W], hand-chosen to hit mapped, unmapped and boundary values.
CITY_RAW = np.array(
    [[7, 8, 11, 26, 0, 33], [7, 7, 24, 25, 1, 32], [19, 20, 21, 23, 31, 6], [28, 27, 17, 12, 13, 22]],
    dtype=np.uint8,
)
# Expected train ids, written out from the table of docs/method.md §7.3 (not computed from the manifest).
CITY_TRAIN = np.array(
    [[0, 1, 2, 13, 255, 18], [0, 0, 11, 12, 255, 17], [6, 7, 8, 10, 16, 255], [15, 14, 5, 3, 4, 9]],
    dtype=np.int64,
)


def rgb(h: int = H, w: int = W) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def save_palette(path: Path, ids: np.ndarray) -> Path:
    """A palette PNG (GTA5 style): the pixel value is the palette index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(ids.astype(np.uint8), mode="P")
    im.putpalette(list(RNG.integers(0, 256, 768, dtype=np.uint8)))
    im.save(path)
    return path


def save_png16(path: Path, array: np.ndarray) -> Path:
    """A 16-bit PNG written with pypng: `[H,W,3]` RGB or `[H,W]` grey."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = array.shape[:2]
    grey = array.ndim == 2
    writer = png.Writer(w, h, greyscale=grey, bitdepth=16)
    with open(path, "wb") as f:
        writer.write(f, array.reshape(h, -1).astype(np.uint16).tolist())
    return path


def write_overrides(root: Path, counts: dict[str, int], size: list[int] | None = (H, W)) -> None:
    info = {"counts": counts, "size": None if size is None else list(size), "seed": 0}
    (root / "manifest.json").write_text(json.dumps(info))


# ------------------------------------------------------------------------------------------ fake trees


def cityscapes_tree(root: Path) -> Path:
    """train: aachen (2 images), bochum (1); val: frankfurt (1)."""
    for split, city, frame in [
        ("train", "bochum", "000000_000019"),
        ("train", "aachen", "000001_000019"),
        ("train", "aachen", "000000_000019"),
        ("val", "frankfurt", "000000_000294"),
    ]:
        sid = f"{city}_{frame}"
        save(root / f"leftImg8bit/{split}/{city}/{sid}_leftImg8bit.png", rgb())
        save(root / f"gtFine/{split}/{city}/{sid}_gtFine_labelIds.png", CITY_RAW)
    write_overrides(root, {"train": 3, "val": 1})
    return root


def gta5_tree(root: Path) -> Path:
    """00001..00003 plus excluded 02154; 00002's image is wider (sizes vary in GTA5)."""
    for sid, w in [("00001", W), ("00002", W + 2), ("00003", W), ("02154", W)]:
        save(root / f"images/{sid}.png", rgb(H, w))
        save_palette(root / f"labels/{sid}.png", np.resize(CITY_RAW, (H, w)))
    write_overrides(root, {"train": 3}, size=None)
    return root


SYNTHIA_RAW0 = np.array([[8, 3, 4, 2, 21, 5], [7, 15, 9, 6, 16, 1], [10, 17, 8, 18, 19, 20], [12, 11, 0, 13, 14, 22]])
SYNTHIA_TRAIN = np.array(
    [[13, 0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16], [17, 18, 255, 255, 255, 255]]
)


def synthia_label(raw0: np.ndarray = SYNTHIA_RAW0) -> np.ndarray:
    """16-bit RGB label: class id in channel 0, high bytes set in the instance channels 1 and 2."""
    lab = np.zeros((*raw0.shape, 3), dtype=np.uint16)
    lab[..., 0] = raw0
    lab[..., 1] = 0x1234
    lab[..., 2] = 0xFF00 + raw0
    return lab


def synthia_tree(root: Path) -> Path:
    for sid in ["0000000", "0000001"]:
        save(root / f"RGB/{sid}.png", rgb())
        save_png16(root / f"GT/LABELS/{sid}.png", synthia_label())
    write_overrides(root, {"train": 2})
    return root


OXFORD_RAW = np.array([[1, 2, 3, 4, 5, 6], [7, 10, 11, 12, 13, 14], [17, 0, 8, 9, 15, 16], [11, 11, 1, 1, 200, 255]])
OXFORD_TRAIN = np.array([[0, 1, 2, 3, 4, 5], [6, 7, 8, 8, 8, 8], [8, 255, 255, 255, 255, 255], [8, 8, 0, 0, 255, 255]])


def oxford_tree(root: Path) -> Path:
    for sid in ["1418132504537582", "1418132505537582"]:
        save(root / f"train/{sid}.png", rgb())
    rgba = np.stack([OXFORD_RAW, np.full_like(OXFORD_RAW, 77), OXFORD_RAW // 2, np.full_like(OXFORD_RAW, 255)], -1)
    save(root / "val/1418381798086398.png", rgb())
    save(root / "anno/1418381798086398.png", rgba.astype(np.uint8), mode="RGBA")
    write_overrides(root, {"train": 2, "val": 1})
    return root


TOY_LABEL = np.array([[0, 1, 2, 255, 18, 17], [5, 5, 5, 255, 255, 3]] * 2, dtype=np.uint8)
TOY_SPLITS = {"source_train": "source/train", "source_val": "source/val", "target_train": "target/train",
              "target_val": "target/val"}  # fmt: skip


def toytown_tree(root: Path, n: int = 2) -> Path:
    for folder in TOY_SPLITS.values():
        for i in range(n):
            save(root / f"{folder}/images/{i:05d}.png", rgb())
            save(root / f"{folder}/labels/{i:05d}.png", TOY_LABEL)
    write_overrides(root, dict.fromkeys(TOY_SPLITS, n))
    return root


TREES = {
    "cityscapes": cityscapes_tree,
    "gta5": gta5_tree,
    "synthia": synthia_tree,
    "oxford_robotcar": oxford_tree,
    "toytown": toytown_tree,
}


# ------------------------------------------------------------------------------------------ manifests


def test_every_manifest_loads_with_the_documented_facts():
    assert {"cityscapes", "gta5", "synthia", "oxford_robotcar", "toytown"} <= set(list_manifests())
    for name in list_manifests():
        m = load_manifest(name)
        assert m.name == name and m.protocol is PROTOCOLS[m.protocol_name]
    counts = {n: {s: sp.count for s, sp in load_manifest(n).splits.items()} for n in TREES}
    assert counts == {
        "cityscapes": {"train": 2975, "val": 500},
        "gta5": {"train": 24941},
        "synthia": {"train": 9400},
        "oxford_robotcar": {"train": 894, "val": 271},
        "toytown": {"source_train": 1000, "source_val": 200, "target_train": 1000, "target_val": 300},
    }
    gta5 = load_manifest("gta5").split("train")
    expected = [*range(2154, 2159), *range(4634, 4638), *range(7115, 7120), *range(9683, 9689), *range(12050, 12055)]
    assert sorted(gta5.exclude) == [f"{i:05d}" for i in expected] and len(gta5.exclude) == 25
    assert load_manifest("synthia").split("train").size == (760, 1280)
    assert load_manifest("oxford_robotcar").split("train").label is None
    assert load_manifest("cityscapes").protocol.name == "cityscapes19"
    assert load_manifest("synthia").protocol.name == "synthia16"


def test_manifest_by_path_and_unknown_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text((Path(load_manifest("toytown").path)).read_text().replace("name: toytown", "name: mine"))
    assert load_manifest(path).name == "mine"
    with pytest.raises(InputError, match="unknown dataset 'nope'.*cityscapes.*toytown"):
        load_manifest("nope")
    with pytest.raises(InputError, match="has no split 'test'.*train, val"):
        load_manifest("cityscapes").split("test")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("protocol: cityscapes19", "protocol: cityscapes19\ncolour: red"), "unknown key 'colour'"),
        (lambda t: t.replace("    count: 500", "    count: 500\n    flip: true"), "unknown key splits.val.'flip'"),
        (lambda t: t.replace("  encoding: png8", "  encoding: png8\n  palette: x"), "unknown key label.'palette'"),
        (lambda t: t.replace("encoding: png8", "encoding: jpeg"), "label.encoding: 'jpeg'"),
        (lambda t: t.replace("7: 0, 8: 1,", "7: 0, 8: 1, 40: 2,"), "raw id 40 is not in valid_values"),
        (lambda t: t.replace("33: 18}", "33: 19}"), "maps to 19"),
        (lambda t: t.replace("    count: 500", "    count: many"), "splits.val.count"),
        (lambda t: t.replace("size: [1024, 2048]", "size: [1024]", 1), "splits.train.size"),
        (lambda t: t.replace("{id}_gtFine", "{frame}_gtFine", 1), "same {fields}"),
        (lambda t: t.replace("protocol: cityscapes19", "protocol: city"), "unknown protocol 'city'"),
        (lambda t: t.replace("protocol: cityscapes19\n", ""), "missing key protocol"),
    ],
)
def test_bad_manifest_names_file_and_key(tmp_path, edit, message):
    text = Path(load_manifest("cityscapes").path).read_text()
    path = tmp_path / "bad.yaml"
    path.write_text(edit(text))
    with pytest.raises(InputError) as err:
        load_manifest(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_exclude_ids_must_be_quoted(tmp_path):
    text = Path(load_manifest("gta5").path).read_text().replace('"02154"', "02154")
    path = tmp_path / "g.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match="exclude: expected a list of quoted id strings"):
        load_manifest(path)


def test_manifest_json_overrides_counts_and_size(tmp_path):
    write_overrides(tmp_path, {"target_val": 7}, size=[32, 48])
    m = load_manifest("toytown").with_overrides(tmp_path)
    assert m.split("target_val").count == 7 and m.split("source_train").count == 1000
    assert all(s.size == (32, 48) for s in m.splits.values())
    (tmp_path / "manifest.json").write_text(json.dumps({"counts": {"test": 3}}))
    with pytest.raises(InputError, match="manifest.json: counts: unknown split 'test'"):
        load_manifest("toytown").with_overrides(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="manifest.json: not valid JSON"):
        load_manifest("toytown").with_overrides(tmp_path)


# ------------------------------------------------------------------------------------------ decoding


def test_decode_label_cityscapes_by_hand():
    m = load_manifest("cityscapes")
    out = decode_label(CITY_RAW.astype(np.int64), m, "x.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, CITY_TRAIN)
    assert out[0, 0] == 0 and out[0, 3] == 13 and out[0, 4] == 255  # raw 7 -> 0, 26 -> 13, 0 -> 255


def test_decode_label_matches_a_direct_loop():
    m = load_manifest("synthia")
    raw = RNG.integers(0, 23, (7, 9))
    slow = np.array([[m.label.map.get(int(v), 255) for v in row] for row in raw])
    np.testing.assert_array_equal(decode_label(raw, m, "x.png"), slow)


def test_decode_label_rejects_invalid_values_naming_file_and_values():
    m = load_manifest("cityscapes")
    raw = CITY_RAW.astype(np.int64).copy()
    raw[0, 0], raw[1, 1], raw[2, 2] = 34, 200, 34
    with pytest.raises(InputError, match=r"frankfurt\.png: label value\(s\) 34, 200 not in the valid values"):
        decode_label(raw, m, "frankfurt.png")
    with pytest.raises(InputError, match="70000"):
        decode_label(np.array([[70000, -1]]), m, "x.png")
    toy = load_manifest("toytown")
    assert decode_label(np.array([[255, 18, 0]]), toy, "t.png").tolist() == [[255, 18, 0]]
    with pytest.raises(InputError, match="19"):
        decode_label(np.array([[19]]), toy, "t.png")


def test_synthia_16bit_rgb_reads_channel_0_in_full(tmp_path):
    m = load_manifest("synthia")
    path = save_png16(tmp_path / "a.png", synthia_label())
    raw = read_raw_label(path, m.label)
    np.testing.assert_array_equal(raw, SYNTHIA_RAW0)
    np.testing.assert_array_equal(decode_label(raw, m, path), SYNTHIA_TRAIN)  # raw 8 -> 13
    # A 16-bit value in channel 0 is kept whole (Pillow would truncate it to 8 bits) and rejected.
    big = synthia_label()
    big[0, 0, 0] = 0x0108
    raw = read_raw_label(save_png16(tmp_path / "b.png", big), m.label)
    assert raw[0, 0] == 0x0108
    with pytest.raises(InputError, match=r"b\.png: label value\(s\) 264 "):
        decode_label(raw, m, tmp_path / "b.png")
    # 16-bit grey labels are read as they are.
    grey = save_png16(tmp_path / "g.png", SYNTHIA_RAW0 + 0)
    np.testing.assert_array_equal(read_raw_label(grey, m.label), SYNTHIA_RAW0)


def test_corrupt_16bit_label_names_file(tmp_path):
    path = save_png16(tmp_path / "c.png", synthia_label())
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(InputError, match=r"c\.png: unreadable or corrupt"):
        read_raw_label(path, load_manifest("synthia").label)


# ------------------------------------------------------------------------------------------ SegDataset


def test_cityscapes_dataset_items_and_order(tmp_path):
    ds = SegDataset("cityscapes", cityscapes_tree(tmp_path), "train")
    assert len(ds) == 3 and ds.protocol.name == "cityscapes19"
    # Sorted by relative image path: aachen before bochum, frame order inside a city.
    assert [s.id for s in ds.samples] == ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000019"]
    item = ds[2]
    assert item["name"] == "bochum_000000_000019" and item["index"] == 2
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, H, W)
    assert item["label"].dtype == torch.int64
    np.testing.assert_array_equal(item["label"].numpy(), CITY_TRAIN)
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), np.asarray(Image.open(ds.samples[2].image)))


def test_order_does_not_depend_on_creation_order(tmp_path):
    names = ["00010", "00002", "00001", "00100"]
    for root, order in [(tmp_path / "a", names), (tmp_path / "b", names[::-1])]:
        for sid in order:
            save(root / f"images/{sid}.png", rgb())
            save_palette(root / f"labels/{sid}.png", CITY_RAW)
    a = [s.id for s in SegDataset("gta5", tmp_path / "a", "train").samples]
    b = [s.id for s in SegDataset("gta5", tmp_path / "b", "train").samples]
    assert a == b == ["00001", "00002", "00010", "00100"]


def test_gta5_palette_labels_and_exclusion(tmp_path):
    ds = SegDataset("gta5", gta5_tree(tmp_path), "train")
    assert [s.id for s in ds.samples] == ["00001", "00002", "00003"]  # 02154 excluded
    np.testing.assert_array_equal(ds[0]["label"].numpy(), CITY_TRAIN)
    assert ds[1]["image"].shape == (3, H, W + 2)


def test_synthia_dataset(tmp_path):
    ds = SegDataset("synthia", synthia_tree(tmp_path), "train")
    assert ds.protocol.name == "synthia16" and len(ds) == 2
    np.testing.assert_array_equal(ds[0]["label"].numpy(), SYNTHIA_TRAIN)


def test_oxford_dataset_rgba_channel_0_and_unlabelled_train(tmp_path):
    root = oxford_tree(tmp_path)
    val = SegDataset("oxford_robotcar", root, "val")
    np.testing.assert_array_equal(val[0]["label"].numpy(), OXFORD_TRAIN)  # raw 11 -> 8, 10 -> 7
    assert val.protocol.num_classes == 9
    train = SegDataset("oxford_robotcar", root, "train")
    assert len(train) == 2 and train.samples[0].label is None
    assert (train[0]["label"] == 255).all() and train[0]["label"].shape == (H, W)


def test_cityscapes_oxford9_maps_labelids_to_9_classes(tmp_path):
    ds = SegDataset("cityscapes_oxford9", cityscapes_tree(tmp_path), "val")
    # Expected: 19-class ids of CITY_TRAIN sent through the 19 -> 9 table of docs/method.md §7.3.
    to9 = {10: 0, 11: 1, 12: 1, 17: 2, 18: 2, 13: 3, 14: 3, 15: 3, 7: 4, 6: 5, 2: 6, 1: 7, 0: 8}
    expected = np.vectorize(lambda c: to9.get(int(c), 255))(CITY_TRAIN)
    np.testing.assert_array_equal(ds[0]["label"].numpy(), expected)


def test_toytown_dataset_and_resize(tmp_path):
    root = toytown_tree(tmp_path)
    for split in TOY_SPLITS:
        assert len(SegDataset("toytown", root, split)) == 2
    ds = SegDataset(load_manifest("toytown"), root, "target_val", size=(8, 12))
    item = ds[0]
    assert item["image"].shape == (3, 8, 12) and item["image"].dtype == torch.uint8
    assert item["label"].shape == (8, 12) and item["label"].dtype == torch.int64
    # Nearest resize by an exact factor 2 repeats every label pixel 2x2 and never invents a class.
    np.testing.assert_array_equal(item["label"].numpy(), np.kron(TOY_LABEL, np.ones((2, 2), dtype=np.uint8)))
    small = SegDataset("toytown", root, "target_val", size=(2, 3))[0]
    assert set(small["label"].unique().tolist()) <= set(np.unique(TOY_LABEL).tolist())


def test_dataset_construction_errors_name_the_path(tmp_path):
    with pytest.raises(InputError, match=f"{tmp_path / 'absent'}: dataset root not found"):
        SegDataset("toytown", tmp_path / "absent", "source_train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty/source/train/images: no images of toytown/source_train"):
        SegDataset("toytown", tmp_path / "empty", "source_train")
    with pytest.raises(InputError, match="has no split 'train'"):
        SegDataset("toytown", tmp_path / "empty", "train")
    root = toytown_tree(tmp_path / "t")
    (root / "source/train/labels/00001.png").unlink()
    with pytest.raises(InputError, match=r"source/train/images/00001\.png: label file .*00001\.png not found"):
        SegDataset("toytown", root, "source_train")


def test_dataset_item_errors_name_the_file(tmp_path):
    root = toytown_tree(tmp_path)
    (root / "source/val/images/00000.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    ds = SegDataset("toytown", root, "source_val")
    with pytest.raises(InputError, match=r"source/val/images/00000\.png: unreadable or corrupt"):
        ds[0]
    save(root / "source/val/labels/00001.png", np.zeros((H + 1, W), dtype=np.uint8))
    with pytest.raises(InputError, match=r"images/00001\.png: image size 4x6 differs from label .*labels/00001\.png"):
        ds[1]
    lab = TOY_LABEL.copy()
    lab[0, 0] = 40
    save(root / "target/val/labels/00000.png", lab)
    with pytest.raises(InputError, match=r"target/val/labels/00000\.png: label value\(s\) 40 "):
        SegDataset("toytown", root, "target_val")[0]
    (root / "target/train/labels/00001.png").write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"target/train/labels/00001\.png: unreadable or corrupt"):
        SegDataset("toytown", root, "target_train")[1]


# ------------------------------------------------------------------------------------------ check_dataset


@pytest.mark.parametrize("name", list(TREES))
def test_clean_trees_have_no_problems(tmp_path, name):
    root = TREES[name](tmp_path)
    assert check_dataset(name, root, progress=False) == []


def test_check_reports_every_problem_with_file_names(tmp_path):
    root = cityscapes_tree(tmp_path)
    write_overrides(root, {"train": 5, "val": 1})  # 3 train images present: count mismatch
    tr = root / "leftImg8bit/train"
    gt = root / "gtFine/train"
    (gt / "aachen/aachen_000000_000019_gtFine_labelIds.png").unlink()  # image without label
    save(gt / "bochum/bochum_000009_000019_gtFine_labelIds.png", CITY_RAW)  # label without image
    (tr / "aachen/aachen_000001_000019_leftImg8bit.png").write_bytes(b"not a png")  # corrupt image
    save(tr / "bochum/bochum_000000_000019_leftImg8bit.png", rgb(H, W + 1))  # wrong size + mismatch
    bad = CITY_RAW.copy()
    bad[0, 0], bad[1, 1] = 34, 99
    save(gt / "bochum/bochum_000000_000019_gtFine_labelIds.png", bad)  # invalid values
    # val: corrupt label
    (root / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png").write_bytes(b"\x89PNG junk")
    problems = check_dataset("cityscapes", root, progress=False)
    text = "\n".join(problems)
    expected = [
        f"{tr}: cityscapes/train has 3 images, expected 5",
        f"{tr}/aachen/aachen_000000_000019_leftImg8bit.png: label file "
        f"{gt}/aachen/aachen_000000_000019_gtFine_labelIds.png not found",
        f"{gt}/bochum/bochum_000009_000019_gtFine_labelIds.png: label without an image in cityscapes/train",
        f"{tr}/aachen/aachen_000001_000019_leftImg8bit.png: unreadable or corrupt image",
        f"{tr}/bochum/bochum_000000_000019_leftImg8bit.png: image size 4x7, expected 4x6",
        f"{gt}/bochum/bochum_000000_000019_gtFine_labelIds.png: label value(s) 34, 99 not in the valid values",
        f"{tr}/bochum/bochum_000000_000019_leftImg8bit.png: image size 4x7 differs from label "
        f"{gt}/bochum/bochum_000000_000019_gtFine_labelIds.png size 4x6",
        f"{root}/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png: unreadable or corrupt",
    ]
    for line in expected:
        assert line in text, line
    assert len(problems) == len(expected)


def test_check_missing_root_folders_and_splits(tmp_path):
    assert check_dataset("gta5", tmp_path / "nowhere", progress=False) == [
        f"{tmp_path / 'nowhere'}: dataset root of gta5 not found"
    ]
    root = oxford_tree(tmp_path / "ox")
    for p in sorted((root / "anno").iterdir()):
        p.unlink()
    (root / "anno").rmdir()
    for p in sorted((root / "train").iterdir()):
        p.unlink()
    (root / "train").rmdir()
    problems = check_dataset("oxford_robotcar", root, progress=False)
    assert f"{root / 'train'}: image folder of oxford_robotcar/train not found" in problems
    assert f"{root / 'train'}: oxford_robotcar/train has 0 images, expected 2" in problems
    assert f"{root / 'anno'}: label folder of oxford_robotcar/val not found" in problems
    assert any(p.startswith(f"{root}/val/1418381798086398.png: label file") for p in problems)
    assert len(problems) == 4
    # Only the splits asked for are checked; an unknown split is an error, not a problem.
    assert check_dataset("oxford_robotcar", root, splits=["val"], progress=False) == problems[2:]
    with pytest.raises(InputError, match="no split 'test'"):
        check_dataset("oxford_robotcar", root, splits=["test"], progress=False)


def test_check_counts_from_yaml_without_manifest_json(tmp_path):
    root = synthia_tree(tmp_path)
    (root / "manifest.json").unlink()
    problems = check_dataset("synthia", root, progress=False)
    assert f"{root / 'RGB'}: synthia/train has 2 images, expected 9400" in problems
    assert sum("image size 4x6, expected 760x1280" in p for p in problems) == 2
    assert len(problems) == 3
    # expect_counts=False skips only the count check (for a partial copy of a real dataset).
    assert len(check_dataset("synthia", root, progress=False, expect_counts=False)) == 2


def test_check_synthia_16bit_values_and_gta5_excluded_not_orphans(tmp_path):
    root = synthia_tree(tmp_path)
    lab = synthia_label()
    lab[1, 1, 0] = 300
    save_png16(root / "GT/LABELS/0000001.png", lab)
    problems = check_dataset("synthia", root, progress=False)
    assert problems == [f"{root}/GT/LABELS/0000001.png: label value(s) 300 not in the valid values of synthia (0-22)"]
    g = gta5_tree(tmp_path / "g")
    (g / "images/02154.png").unlink()  # an excluded id's lone label is not an orphan
    assert check_dataset("gta5", g, progress=False) == []


def test_format_problems():
    assert format_problems([], "toytown") == "toytown: no problems found"
    text = format_problems([f"f{i}.png: bad" for i in range(5)], "x", limit=2)
    assert text.splitlines() == ["x: 5 problems found", "f0.png: bad", "f1.png: bad", "... and 3 more"]
    assert format_problems(["a: b"], "x").splitlines() == ["x: 1 problem found", "a: b"]
