"""benchmarks/toytown_ceiling.py: the things' growth against a direct per-pixel formula."""

import numpy as np
from _benchmarks import chebyshev_windows, load_benchmark

toytown_ceiling = load_benchmark("toytown_ceiling")


def _grow_direct(label: np.ndarray, k: int) -> np.ndarray:
    """Slow reference: a background pixel takes the first thing class (in THINGS order) within k px."""
    out = label.copy()
    for y, x, win in chebyshev_windows(label, k):
        if label[y, x] in toytown_ceiling.THINGS:
            continue
        for c in toytown_ceiling.THINGS:
            if (win == c).any():
                out[y, x] = c
                break
    return out


def test_grow_things_matches_a_direct_window_check():
    rng = np.random.default_rng(0)
    label = rng.choice([0, 2, 8, 10], size=(15, 21)).astype(np.uint8)
    label[4:7, 5:6] = 5  # a pole, one pixel wide
    label[9:12, 10:16] = 13  # a car
    label[9:11, 16:18] = 11  # a person touching it
    label[2, 18] = 18  # a bicycle pixel near the border
    for k in (1, 2):
        got = toytown_ceiling.grow_things(label, k)
        np.testing.assert_array_equal(got, _grow_direct(label, k))
        things = np.isin(label, toytown_ceiling.THINGS)
        np.testing.assert_array_equal(got[things], label[things])  # things are never overwritten
    assert (toytown_ceiling.grow_things(label, 1)[3:8, 4:7] == 5).all()  # the pole is three pixels wide now
