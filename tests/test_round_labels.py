"""benchmarks/round_labels.py: the pseudo-label edits of the kept-pixel test, against direct formulas."""

import json

import numpy as np
from _benchmarks import chebyshev_windows, load_benchmark
from PIL import Image

from hias_nb.demo import demo_config

round_labels = load_benchmark("round_labels")


def _erode_direct(label: np.ndarray, r: int) -> np.ndarray:
    """Slow reference: a pixel stays only if every pixel within r (Chebyshev, clipped at the border) equals it."""
    out = label.copy()
    for y, x, win in chebyshev_windows(label, r):
        if (win != label[y, x]).any():
            out[y, x] = 255
    return out


def test_erode_matches_a_direct_window_check():
    rng = np.random.default_rng(0)
    label = rng.choice([0, 1, 5, 255], size=(13, 17), p=[0.5, 0.3, 0.1, 0.1]).astype(np.uint8)
    label[3:10, 4:12] = 2  # a block whose interior survives
    for r in (1, 2):
        np.testing.assert_array_equal(round_labels.erode(label, r), _erode_direct(label, r))
    assert (round_labels.erode(label, 1)[5:8, 6:10] == 2).all()


def test_true_kept_replaces_kept_labels_only(tmp_path):
    src, dst = tmp_path / "pseudo", tmp_path / "edited"
    (src / "labels").mkdir(parents=True)
    (src / "summary.json").write_text(json.dumps({"classes": []}))
    pseudo = np.array([[1, 1, 255], [2, 255, 3]], dtype=np.uint8)
    truth = np.array([[1, 4, 4], [2, 0, 0]], dtype=np.uint8)
    Image.fromarray(pseudo).save(src / "labels" / "a.png")
    share = round_labels.edited_labels(src, dst, "true_kept", 2, {"a": truth})
    got = np.array(Image.open(dst / "labels" / "a.png"))
    np.testing.assert_array_equal(got, [[1, 4, 255], [2, 255, 0]])  # kept pixels take the truth; ignore stays
    assert share == 2 / 4  # of 4 kept pixels, (0,1) and (1,2) changed
    assert (dst / "summary.json").exists() and not (tmp_path / "edited.partial").exists()
    (src / "labels" / "a.png").unlink()  # a resumed run reports the recorded share and does not edit again
    assert round_labels.edited_labels(src, dst, "true_kept", 2, {}) == 2 / 4


def test_true_all_labels_every_pixel_and_sets_parse(tmp_path):
    src, dst = tmp_path / "pseudo", tmp_path / "all"
    (src / "labels").mkdir(parents=True)
    pseudo = np.array([[1, 255], [255, 3]], dtype=np.uint8)
    truth = np.array([[1, 4], [2, 0]], dtype=np.uint8)
    Image.fromarray(pseudo).save(src / "labels" / "a.png")
    share = round_labels.edited_labels(src, dst, "true_all", 2, {"a": truth})
    np.testing.assert_array_equal(np.array(Image.open(dst / "labels" / "a.png")), truth)  # no ignore left
    assert share == 1 / 2  # of the 2 kept pixels, (1,1) changed (3 -> 0)
    sets = round_labels.parse_sets(["round.strong=false", "round.iterations=240", "round.lr=1e-4"])
    cfg = demo_config(overrides=sets)  # read as the demo's command line reads them
    assert (cfg.round.strong, cfg.round.iterations, cfg.round.lr) == (False, 240, 1e-4)


def test_rim_and_region_errors_split_the_wrong_kept_pixels(tmp_path):
    truth = np.zeros((7, 9), dtype=np.uint8)
    truth[2:5, 2:4] = 5  # a small thing (class 5) on background 0
    pseudo = np.full((7, 9), 255, dtype=np.uint8)
    pseudo[1:6, 1:5] = 5  # the thing kept dilated by one pixel: its rim is background labelled 5
    pseudo[0, 8] = 7  # a wrong kept pixel far from any true 7: a region error
    pseudo[6, 8] = 0  # a right kept pixel
    rim = round_labels.rim_errors(pseudo, truth, 1)
    expected = (pseudo == 5) & (truth != 5)  # every dilated pixel touches the true thing within 1 px
    np.testing.assert_array_equal(rim, expected)
    assert rim.sum() == 20 - 6 and not rim[0, 8]
    src = tmp_path / "pseudo"
    (src / "labels").mkdir(parents=True)
    Image.fromarray(pseudo).save(src / "labels" / "a.png")
    round_labels.edited_labels(src, tmp_path / "rim", "drop_rim", 1, {"a": truth})
    round_labels.edited_labels(src, tmp_path / "region", "drop_region", 1, {"a": truth})
    no_rim = np.array(Image.open(tmp_path / "rim" / "labels" / "a.png"))
    no_region = np.array(Image.open(tmp_path / "region" / "labels" / "a.png"))
    assert (no_rim[expected] == 255).all() and no_rim[0, 8] == 7 and (no_rim[2:5, 2:4] == 5).all()
    assert no_region[0, 8] == 255 and (no_region[expected] == 5).all() and no_region[6, 8] == 0
    round_labels.edited_labels(src, tmp_path / "wrong", "drop_wrong", 1, {"a": truth})
    no_wrong = np.array(Image.open(tmp_path / "wrong" / "labels" / "a.png"))
    expected_wrong = pseudo.copy()
    expected_wrong[(pseudo != 255) & (pseudo != truth)] = 255  # every wrong kept pixel, rim or region
    np.testing.assert_array_equal(no_wrong, expected_wrong)
    assert (no_wrong[2:5, 2:4] == 5).all() and no_wrong[6, 8] == 0
