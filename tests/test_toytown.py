"""toytown generator: determinism, label values, class presence and rarity, domain differences, the on-disk
layout and manifest, refusal to overwrite and reuse of a matching folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hias_nb.classes import CITYSCAPES_CLASSES, HARD_CANDIDATES
from hias_nb.data.toytown import (
    SEVERITY_SHAPE,
    SPLITS,
    TARGET_SEVERITY,
    THIN_DIVISOR,
    draw_severity,
    ensure_toytown,
    generate_toytown,
    render_scene,
    split_counts,
)
from hias_nb.errors import InputError

SMALL = (32, 64)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def scenes() -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """120 scenes per domain at the default size (about 1.5 s)."""
    return {d: [render_scene(np.random.default_rng(i), d) for i in range(120)] for d in ("source", "target")}


def _fractions(pairs) -> np.ndarray:
    hist = sum(np.bincount(label.ravel(), minlength=256)[:19] for _, label in pairs)
    return hist / hist.sum()


def test_render_shapes_types_and_label_values(scenes):
    for domain, pairs in scenes.items():
        for img, label in pairs[:10]:
            assert img.shape == (64, 128, 3) and img.dtype == np.uint8
            assert label.shape == (64, 128) and label.dtype == np.uint8
        values = np.unique(np.concatenate([label.ravel() for _, label in pairs]))
        assert set(values.tolist()) <= set(range(19)), domain  # train ids only: toytown ignores no pixel


def test_render_is_deterministic_and_size_is_a_parameter():
    a = render_scene(np.random.default_rng(7), "target", size=(48, 96), severity=0.8)
    b = render_scene(np.random.default_rng(7), "target", size=(48, 96), severity=0.8)
    assert a[0].shape == (48, 96, 3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    c = render_scene(np.random.default_rng(8), "target", size=(48, 96), severity=0.8)
    assert not np.array_equal(a[1], c[1])


def test_render_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match="domain"):
        render_scene(rng, "photo")
    with pytest.raises(InputError, match="severity"):
        render_scene(rng, "target", severity=1.5)
    with pytest.raises(InputError, match="severity"):
        render_scene(rng, "source", severity=0.7)


def test_every_class_appears_in_both_domains(scenes):
    for domain, pairs in scenes.items():
        present = np.zeros(19, dtype=bool)
        for _, label in pairs:
            present[np.unique(label)[np.unique(label) < 19]] = True
        missing = [CITYSCAPES_CLASSES[k] for k in range(19) if not present[k]]
        assert not missing, f"{domain}: classes never drawn: {missing}"


def test_hard_classes_are_rare_but_frequent_enough(scenes):
    for domain, pairs in scenes.items():
        frac = _fractions(pairs)
        for k in HARD_CANDIDATES:
            name = CITYSCAPES_CLASSES[k]
            assert 0.001 < frac[k] < 0.05, f"{domain}: {name} covers {frac[k]:.4f} of pixels"
            images_with = sum(bool((label == k).any()) for _, label in pairs)
            assert images_with >= 0.3 * len(pairs), f"{domain}: {name} in only {images_with} images"
        # the large "stuff" classes dominate, as in street data
        assert frac[0] > 0.25 and frac[2] > 0.12


def test_thin_objects_are_at_least_three_pixels_wide(scenes):
    """No 1- or 2-px poles: every horizontal run of pole pixels that is not cut by the image edge is >= 3 px."""
    runs = []
    for _, label in scenes["source"][:40]:
        pole = label == 5
        for row in pole[:, 1:-1]:
            edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(np.int8), [0]])))
            runs.extend((edges[1::2] - edges[0::2]).tolist())
    runs = np.asarray(runs)
    # an occluder in front (a sign's tip, a head) can leave a sliver of pole; the bulk of runs is at least the
    # minimum width, max(3, H // THIN_DIVISOR) = 4 px at 64 rows, and most poles are drawn at exactly it
    min_px = max(3, 64 // THIN_DIVISOR)
    assert len(runs) > 100 and (runs >= min_px).mean() > 0.85 and np.bincount(runs).argmax() == min_px


def test_target_differs_in_appearance_but_shares_the_layout(scenes):
    def colour(pairs, cls):
        return np.concatenate([img[label == cls] for img, label in pairs]).astype(np.float64).mean(0)

    src, tgt = scenes["source"], scenes["target"]
    # paving turns greyer and darker, towards the road (PHOTO_SHIFT, plus haze): the sidewalk/road contrast in
    # mean grey level falls (≈ 54 in the game, by ≈ 20)
    assert abs(colour(src, 1).mean() - colour(src, 0).mean()) - abs(colour(tgt, 1).mean() - colour(tgt, 0).mean()) > 15
    # grass dries: terrain's red-minus-green rises (by 60 grey levels at severity 1, PHOTO_SHIFT, before desaturation;
    # ≈ 11 at the target's mean severity)
    assert (colour(tgt, 9)[0] - colour(tgt, 9)[1]) - (colour(src, 9)[0] - colour(src, 9)[1]) > 6
    # sky: the photo-like sky is paler (less blue than red relative to the game sky)
    assert (colour(src, 10)[2] - colour(src, 10)[0]) - (colour(tgt, 10)[2] - colour(tgt, 10)[0]) > 12
    # target images are blurrier: smaller mean absolute horizontal gradient at the same layout statistics
    grad = {d: np.mean([np.abs(np.diff(img.astype(np.int16), axis=1)).mean() for img, _ in p])
            for d, p in scenes.items()}  # fmt: skip
    assert grad["target"] < grad["source"]
    # layout: the big classes keep similar shares (within 25 % relative) ...
    fs, ft = _fractions(scenes["source"]), _fractions(scenes["target"])
    for k in (0, 1, 2, 10):
        assert abs(fs[k] - ft[k]) < 0.25 * fs[k], CITYSCAPES_CLASSES[k]
    # ... while object statistics differ by design: more pedestrians, fewer trucks in the target
    assert ft[11] > fs[11] and ft[14] < fs[14]


def test_colour_does_not_tell_the_classes_drawn_in_any_hue(scenes):
    # walls, fences, signs and vehicles come in any colour, as on photographs: a nearest-mean colour classifier
    # over the source pixels of these 8 classes recalls ≈ 0.19 of them (chance 1/8); v2's earlier per-class
    # palettes scored 0.38
    classes = (3, 4, 7, 13, 14, 15, 17, 18)
    pixels = {c: np.concatenate([img[label == c] for img, label in scenes["source"]]).astype(np.float64)
              for c in classes}  # fmt: skip
    means = np.stack([pixels[c].mean(0) for c in classes])
    recall = [(((pixels[c][:, None] - means[None]) ** 2).sum(-1).argmin(1) == i).mean() for i, c in enumerate(classes)]
    assert np.mean(recall) < 0.22


def test_the_pretraining_domain_never_takes_the_targets_look(monkeypatch):
    # the pretraining domain draws either domain's layout statistics but never the target's sign faces or
    # surfaces: changing those fields of TARGET_STYLE leaves every pretraining image as it was
    import dataclasses

    from hias_nb.data import toytown

    before = [render_scene(np.random.default_rng(i), "pretrain") for i in range(8)]
    monkeypatch.setattr(toytown, "TARGET_STYLE", dataclasses.replace(toytown.TARGET_STYLE, sign_shapes=(4,)))
    after = [render_scene(np.random.default_rng(i), "pretrain") for i in range(8)]
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(before, after, strict=True))
    # ... while the target does use them (the test can fail)
    t_before = [render_scene(np.random.default_rng(i), "target", severity=0.5)[0] for i in range(8)]
    monkeypatch.setattr(toytown, "TARGET_STYLE", dataclasses.replace(toytown.TARGET_STYLE, sign_shapes=(3,)))
    t_after = [render_scene(np.random.default_rng(i), "target", severity=0.5)[0] for i in range(8)]
    assert not all(np.array_equal(a, b) for a, b in zip(t_before, t_after, strict=True))


def test_severity_is_drawn_per_target_image_and_scales_the_shift():
    base = render_scene(np.random.default_rng(3), "target", severity=0.0)
    strong = render_scene(np.random.default_rng(3), "target", severity=1.0)
    weak = render_scene(np.random.default_rng(3), "target", severity=0.3)
    # same layout for the same rng state, whatever the severity
    assert np.array_equal(base[1], strong[1]) and np.array_equal(base[1], weak[1])
    d_weak = np.abs(weak[0].astype(int) - base[0].astype(int)).mean()
    d_strong = np.abs(strong[0].astype(int) - base[0].astype(int)).mean()
    assert 0 < d_weak < d_strong


def test_severity_has_a_mild_majority_and_a_hard_tail():
    rng = np.random.default_rng(0)
    s = np.array([draw_severity(rng) for _ in range(4000)])
    lo, hi = TARGET_SEVERITY
    assert s.min() >= lo and s.max() <= hi
    mid, top = lo + 0.5 * (hi - lo), lo + 0.75 * (hi - lo)
    assert np.median(s) < mid and (s < mid).mean() > 0.65  # most target images are the milder half ...
    assert 0.02 < (s > top).mean() < 0.15  # ... a minority is in the top quarter (the hard tail)
    # the draw is the documented Beta on [lo, hi]: its mean, lo + (hi - lo) a / (a + b)
    a, b = SEVERITY_SHAPE
    assert abs(s.mean() - (lo + (hi - lo) * a / (a + b))) < 0.01


def test_generate_layout_manifest_and_determinism(tmp_path):
    out = tmp_path / "tt"
    m = generate_toytown(out, images=10, seed=3, size=SMALL, workers=1, progress=False)
    assert m["dataset"] == "toytown" and m["version"] == 2 and m["seed"] == 3 and m["size"] == [32, 64]
    assert m["counts"] == {"source_train": 10, "source_val": 2, "target_train": 10, "target_val": 3}
    assert m["counts"] == split_counts(10)
    assert json.loads((out / "manifest.json").read_text()) == m
    assert set(m["class_pixel_fraction"]) == set(SPLITS)
    for split in SPLITS:
        fr = m["class_pixel_fraction"][split]
        assert list(fr) == list(CITYSCAPES_CLASSES) and abs(sum(fr.values()) - 1) < 1e-4
        domain, part = split.split("_")
        for kind in ("images", "labels"):
            names = sorted(p.name for p in (out / domain / part / kind).iterdir())
            assert names == [f"{i:05d}.png" for i in range(m["counts"][split])]
        label = Image.open(out / domain / part / "labels" / "00000.png")
        image = Image.open(out / domain / part / "images" / "00000.png")
        assert label.mode == "L" and image.mode == "RGB" and image.size == (64, 32)
        assert set(np.unique(np.asarray(label)).tolist()) <= set(range(19))  # no 255 on disk either
    assert m["seconds"] >= 0 and "source_style" in m["generator"]
    assert [p.name for p in tmp_path.iterdir()] == ["tt"]  # no temporary folder left behind

    # same seed, other worker count -> same bytes; another seed -> different images
    again = tmp_path / "again"
    generate_toytown(again, images=10, seed=3, size=SMALL, workers=2, progress=False)
    assert _files(out) == _files(again)
    other = tmp_path / "other"
    generate_toytown(other, images=10, seed=4, size=SMALL, workers=1, progress=False)
    a, b = _files(out), _files(other)
    assert a.keys() == b.keys() and sum(a[k] != b[k] for k in a) == len(a)


def test_generate_reuses_matching_and_refuses_foreign_folders(tmp_path):
    out = tmp_path / "tt"
    m = generate_toytown(out, images=5, seed=1, size=SMALL, workers=1, progress=False)
    stamp = (out / "source/train/images/00000.png").stat().st_mtime_ns
    assert ensure_toytown(out, images=5, seed=1, size=SMALL) == m  # reused, not rewritten
    assert (out / "source/train/images/00000.png").stat().st_mtime_ns == stamp
    with pytest.raises(InputError, match=str(out)):
        generate_toytown(out, images=5, seed=2, size=SMALL, progress=False)  # other seed
    with pytest.raises(InputError, match=str(out)):
        generate_toytown(out, images=6, seed=1, size=SMALL, progress=False)  # other counts
    (out / "source/train/images/00004.png").unlink()  # incomplete: not reused, not overwritten
    with pytest.raises(InputError, match=str(out)):
        generate_toytown(out, images=5, seed=1, size=SMALL, progress=False)

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(InputError, match="mine"):
        generate_toytown(foreign, images=5, size=SMALL, progress=False)
    assert (foreign / "notes.txt").read_text() == "precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    generate_toytown(empty, images=2, size=SMALL, workers=1, progress=False)  # an empty folder is fine
    assert (empty / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine", "tt"]


def test_a_folder_of_another_version_is_refused_by_name(tmp_path):
    out = tmp_path / "tt"
    generate_toytown(out, images=2, seed=1, size=SMALL, workers=1, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    before = _files(out)
    with pytest.raises(InputError, match="version: holds toytown version 1, this hias_nb generates version 2"):
        ensure_toytown(out, images=2, seed=1, size=SMALL)
    assert _files(out) == before  # nothing overwritten


@pytest.mark.parametrize(("key", "value"), [("photo_shift", [[0.0] * 3] * 19), ("code_sha256", "0" * 64)])
def test_a_folder_drawn_by_another_generator_of_the_same_version_is_refused(tmp_path, key, value):
    """Same version, seed, size and count, but other drawing constants or other drawing code: refused by the
    key that differs, never reused as if it were this benchmark; the same generator's folder is reused as is."""
    out = tmp_path / "tt"
    generate_toytown(out, images=2, seed=1, size=SMALL, workers=1, progress=False)
    assert ensure_toytown(out, images=2, seed=1, size=SMALL)["generator"]["code_sha256"]  # reused
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["generator"][key] = value
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = _files(out)
    with pytest.raises(InputError, match=f"generator.{key}: drawn by another toytown 2 generator"):
        ensure_toytown(out, images=2, seed=1, size=SMALL)
    assert _files(out) == before


def test_toytown_grid_draws_without_a_display(tmp_path):
    from hias_nb.viz import toytown_grid

    out = tmp_path / "tt"
    generate_toytown(out, images=3, size=SMALL, workers=1, progress=False)
    fig = toytown_grid(out, n=2)
    assert len(fig.axes) == 8 and fig.axes[0].get_title().startswith("source")
    fig.savefig(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 1000
    with pytest.raises(InputError, match="images"):
        toytown_grid(out, n=50)


class _AlwaysRoad(torch.nn.Module):
    """Predicts class 0 everywhere with probability e^6 / (e^6 + 18) ≈ 0.957."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.zeros(x.shape[0], 19, *x.shape[-2:])
        z[:, 0] = 6.0
        return z


def test_evaluate_by_severity_against_a_direct_count():
    from hias_nb.evaluate import evaluate_by_severity

    table = evaluate_by_severity(_AlwaysRoad(), severities=(0.0, 1.0), images=3, size=(32, 64), seed=5, batch_size=2)
    assert list(table["severity"]) == [0.0, 1.0]
    labels = [render_scene(np.random.default_rng(5 + i), "target", (32, 64), severity=0.0)[1] for i in range(3)]
    lab = np.stack(labels)
    valid = lab != 255
    road = ((lab == 0) & valid).sum()
    accuracy = 100.0 * road / valid.sum()
    present = len(np.unique(lab[valid]))  # classes in the ground truth: IoU 0 except road's
    road_iou = 100.0 * road / valid.sum()  # union of road = all pixels (predicted road everywhere)
    for _, row in table.iterrows():  # the same scenes at both severities: the labels, hence the scores, agree
        assert row["pixel_accuracy"] == pytest.approx(accuracy)
        assert row["miou"] == pytest.approx(road_iou / present)
        assert row["confident_fraction"] == pytest.approx(100.0)
        assert row["confident_accuracy"] == pytest.approx(accuracy)
