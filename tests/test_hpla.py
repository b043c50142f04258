"""Tests for hias_nb.hpla: hard classes, donor lists and the paste procedure (docs/method.md §3, 9.1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hias_nb.classes import SYNTHIA_IGNORED
from hias_nb.errors import InputError
from hias_nb.hpla import HPLA, donor_lists, draw_probabilities, drawable_classes, hard_classes

IGN = 255


# ---------------------------------------------------------------- hard_classes


def test_hard_classes_hand_computed():
    values = [0.9, 0.5, 0.7, 0.5, 0.2]
    hard, probs = hard_classes(values, num_hard=3)
    assert hard.dtype == torch.int64 and probs.dtype == torch.float64
    assert hard.tolist() == [4, 1, 3]  # ascending values; the 0.5 tie keeps class order (1 before 3)
    w = {4: 0.8**2, 1: 0.5**2, 3: 0.5**2}
    total = sum(w.values())
    expected = [0.0, w[1] / total, 0.0, w[3] / total, w[4] / total]
    assert probs.tolist() == pytest.approx(expected, abs=1e-15)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-15)


def test_hard_classes_ties_keep_class_order():
    hard, probs = hard_classes(np.full(6, 0.8), num_hard=4)
    assert hard.tolist() == [0, 1, 2, 3]
    assert probs.tolist() == pytest.approx([0.25] * 4 + [0.0] * 2)


def test_hard_classes_ignored_and_fewer_eligible():
    # Class 0 is the hardest but ignored; only 3 classes are eligible for 5 slots.
    hard, probs = hard_classes(torch.tensor([0.0, 0.6, 0.3, 0.9]), num_hard=5, ignored=(0,))
    assert hard.tolist() == [2, 1, 3]
    assert probs[0].item() == 0.0
    assert probs.sum().item() == pytest.approx(1.0)


def test_hard_classes_synthia_ignored_get_zero_probability():
    # The reference sets v = +inf for SYNTHIA's missing classes, which made the probabilities NaN (B3).
    values = torch.linspace(0.2, 0.95, 19, dtype=torch.float64)
    values[list(SYNTHIA_IGNORED)] = float("inf")
    values[14] = 0.01  # even the smallest value must not make an ignored class hard
    hard, probs = hard_classes(values, num_hard=14, ignored=SYNTHIA_IGNORED)
    assert len(hard) == 14
    assert not set(hard.tolist()) & set(SYNTHIA_IGNORED)
    assert torch.isfinite(probs).all()
    assert probs[list(SYNTHIA_IGNORED)].tolist() == [0.0, 0.0, 0.0]
    assert probs.sum().item() == pytest.approx(1.0)
    # The 14 smallest of the 16 eligible values: classes 0..15 minus 9 and 14 -> 0..8, 10..13, 15.
    assert hard.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15]


def test_hard_classes_all_weights_zero_fall_back_to_uniform():
    hard, probs = hard_classes([1.0, 1.0, 1.0, 0.5], num_hard=2)
    assert hard.tolist() == [3, 0]
    # Weights 0.25 and 0: not all zero, so no fallback.
    assert probs.tolist() == [0.0, 0.0, 0.0, 1.0]
    hard, probs = hard_classes([1.0, 1.0, 1.0], num_hard=2)
    assert probs.tolist() == [0.5, 0.5, 0.0]


def test_hard_classes_numpy_and_torch_agree_and_edge_inputs():
    values = np.array([0.3, 0.1, 0.8, 0.5])
    h_np, p_np = hard_classes(values, 2)
    h_t, p_t = hard_classes(torch.tensor(values, dtype=torch.float32), 2)
    assert h_np.tolist() == h_t.tolist() == [1, 0]
    assert p_np.tolist() == pytest.approx(p_t.tolist())
    hard, probs = hard_classes(values, 0)
    assert hard.tolist() == [] and probs.tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="finite"):
        hard_classes([0.2, float("nan"), 0.5], 2)
    hard, _ = hard_classes([0.2, float("nan"), 0.5], 2, ignored=(1,))  # NaN is fine where ignored
    assert hard.tolist() == [0, 2]
    with pytest.raises(ValueError, match="num_hard"):
        hard_classes(values, -1)


# ---------------------------------------------------------------- donor_lists


@pytest.mark.parametrize("n, dropped", [(1, 0), (5, 0), (6, 1), (15, 2), (25, 2), (35, 4), (100, 10)])
def test_donor_lists_bankers_rounding(n, dropped):
    samples = [(f"img{i}", 1000 - i) for i in range(n)]  # counts descending, so sorting reverses them
    donors = donor_lists({3: samples})
    kept = donors[3]
    assert len(kept) == n - dropped
    expected = [f"img{i}" for i in reversed(range(n))][dropped:]
    assert kept == expected


def test_donor_lists_stable_sort_and_string_keys():
    samples = {"7": [["a", 5], ["b", 1], ["c", 5], ["d", 1], ["e", 3], ["f", 9], ["g", 9], ["h", 2], ["i", 7],
                     ["j", 4], ["k", 1]]}  # fmt: skip
    donors = donor_lists(samples)  # n = 11 -> drop round(1.1) = 1: the first of the count-1 images, "b"
    assert list(donors) == [7]
    assert donors[7] == ["d", "k", "h", "e", "j", "a", "c", "i", "f", "g"]
    assert donor_lists({1: []}) == {1: []}


# ---------------------------------------------------------------- HPLA paste


class Donors:
    """An in-memory donor store that counts loads."""

    def __init__(self, items: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.items = items
        self.loaded: list[str] = []

    def __call__(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        self.loaded.append(name)
        image, label = self.items[name]
        return image.clone(), label.clone()


def _donor(label: list[list[int]], colour: int) -> tuple[torch.Tensor, torch.Tensor]:
    lab = torch.tensor(label, dtype=torch.int64)
    return torch.full((3, *lab.shape), colour, dtype=torch.uint8), lab


def _recipient(h: int = 4, w: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.arange(3 * h * w, dtype=torch.uint8).view(3, h, w)
    label = torch.zeros(h, w, dtype=torch.int64)
    label[0] = IGN
    return image, label


def test_reference_pastes_exactly_one_donor_and_all_its_hard_pixels():
    hard = torch.tensor([2, 3, 4, 5])
    probs = torch.tensor([0.0, 0.0, 0.25, 0.25, 0.25, 0.25])
    items = {
        "d0": _donor([[2, 3, 0, IGN], [4, 1, 5, 5], [0, 0, 2, IGN], [1, 1, 1, 1]], colour=200),
        "d1": _donor([[IGN, IGN, 3, 3], [0, 0, 0, 0], [4, 4, 1, 1], [5, 0, 0, 2]], colour=100),
    }
    donors = {2: ["d0", "d1"], 3: ["d0", "d1"], 4: ["d1"], 5: ["d0"]}
    store = Donors(items)
    hpla = HPLA(hard, probs, donors, store, generator=torch.Generator().manual_seed(0))
    image0, label0 = _recipient()
    for call in range(20):
        image, label, prov = hpla(image0, label0)
        assert len(store.loaded) == call + 1  # one donor load per call (B1)
        assert len(hpla.last_draws) == 1
        draw = hpla.last_draws[0]
        assert draw.donor in donors[draw.cls]
        d_image, d_label = items[draw.donor]
        paste = torch.isin(d_label, hard)  # every hard class of the donor, not only draw.cls (B2)
        assert draw.pasted == tuple(sorted(set(d_label[paste].tolist())))
        assert torch.equal(label[paste], d_label[paste])
        assert torch.equal(label[~paste], label0[~paste])
        assert torch.equal(image[:, paste], d_image[:, paste])
        assert torch.equal(image[:, ~paste], image0[:, ~paste])
        assert torch.equal(prov[paste], label[paste])
        assert (prov[~paste] == IGN).all()
        assert prov.dtype == torch.int64 and prov.shape == label0.shape
    assert torch.equal(image0, _recipient()[0]) and torch.equal(label0, _recipient()[1])  # inputs untouched


def _one_class_donors(classes: list[int]) -> tuple[dict[int, list[str]], Donors]:
    """One donor per class whose only labelled pixels are that class, in its own row block."""
    items, donors = {}, {}
    for k, c in enumerate(classes):
        lab = torch.full((8, 8), IGN, dtype=torch.int64)
        lab[k] = c
        items[f"only{c}"] = (torch.full((3, 8, 8), 10 + k, dtype=torch.uint8), lab)
        donors[c] = [f"only{c}"]
    return donors, Donors(items)


def test_intended_mode_covers_half_the_hard_classes():
    hard = torch.tensor([0, 1, 2, 3])
    probs = torch.tensor([0.25, 0.25, 0.25, 0.25])
    donors, store = _one_class_donors([0, 1, 2, 3])
    hpla = HPLA(hard, probs, donors, store, mode="intended", generator=torch.Generator().manual_seed(1))
    image0, label0 = torch.zeros(3, 8, 8, dtype=torch.uint8), torch.full((8, 8), IGN)
    for _ in range(10):
        _, label, prov = hpla(image0, label0)
        drawn = [d.cls for d in hpla.last_draws]
        assert len(drawn) == 2 and len(set(drawn)) == 2  # a covered class is never drawn again
        assert set(prov.unique().tolist()) == set(drawn) | {IGN}
        assert torch.equal(prov[prov != IGN], label[prov != IGN])


def test_intended_mode_stops_at_max_donors_or_when_nothing_is_left():
    hard = torch.arange(8)
    probs = torch.full((8,), 1 / 8, dtype=torch.float64)
    donors, store = _one_class_donors(list(range(8)))
    hpla = HPLA(hard, probs, donors, store, mode="intended", max_donors=3, generator=torch.Generator())
    image0, label0 = torch.zeros(3, 8, 8, dtype=torch.uint8), torch.full((8, 8), IGN)
    hpla(image0, label0)
    assert len(hpla.last_draws) == 3  # 3 covered < 4 = half of 8, stopped by max_donors
    # Only one class has donors: coverage can never reach half, so it stops after that single class.
    hpla = HPLA(hard, probs, {5: donors[5]}, store, mode="intended", max_donors=3)
    hpla(image0, label0)
    assert [d.cls for d in hpla.last_draws] == [5]


def test_intended_mode_one_rich_donor_is_enough():
    hard = torch.tensor([1, 2, 3, 4])
    probs = torch.tensor([0.0, 0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    items = {"rich": _donor([[1, 2], [3, 0]], colour=9)}
    donors = {c: ["rich"] for c in (1, 2, 3)}
    hpla = HPLA(hard, probs, donors, Donors(items), mode="intended", generator=torch.Generator())
    hpla(torch.zeros(3, 2, 2, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.int64))
    assert len(hpla.last_draws) == 1 and hpla.last_draws[0].pasted == (1, 2, 3)


def test_class_without_donors_is_never_drawn():
    # Class 0 is the hardest and has by far the largest probability but no donors (B4).
    hard = torch.tensor([0, 1, 2])
    probs = torch.tensor([0.98, 0.01, 0.01], dtype=torch.float64)
    donors, store = _one_class_donors([1, 2])
    donors[0] = []
    for mode in ("reference", "intended"):
        hpla = HPLA(hard, probs, donors, store, mode=mode, generator=torch.Generator().manual_seed(2))
        for _ in range(30):
            hpla(torch.zeros(3, 8, 8, dtype=torch.uint8), torch.full((8, 8), IGN))
            assert hpla.last_draws and all(d.cls in (1, 2) for d in hpla.last_draws)


def test_draw_probabilities_are_what_hpla_samples():
    # class 0 (value 0: no pseudo-labelled pixel) has the largest weight but no donor, so it is never drawn
    hard, probs = hard_classes([0.0, 0.4, 0.6, 0.95], num_hard=3)  # weights 1, 0.36, 0.16 over classes 0, 1, 2
    donors, store = _one_class_donors([1, 2, 3])
    assert drawable_classes(hard, probs, donors) == [1, 2]
    used = draw_probabilities(hard, probs, donors)
    assert used.tolist() == pytest.approx([0.0, 0.36 / 0.52, 0.16 / 0.52, 0.0])
    assert draw_probabilities(hard, probs, {}).tolist() == [0.0] * 4  # nothing drawable
    hpla = HPLA(hard, probs, donors, store, generator=torch.Generator().manual_seed(3))
    n, counts = 3000, torch.zeros(4)
    for _ in range(n):
        hpla(torch.zeros(3, 8, 8, dtype=torch.uint8), torch.full((8, 8), IGN))
        counts[hpla.last_draws[0].cls] += 1
    for c in range(4):  # within 4 binomial standard deviations of the used probability
        p = float(used[c])
        assert abs(counts[c] / n - p) <= 4 * (p * (1 - p) / n) ** 0.5 + 1e-12


def test_no_eligible_class_returns_inputs_unchanged():
    hard = torch.tensor([0, 1])
    donors, store = _one_class_donors([0, 1])
    image0, label0 = _recipient(8, 8)
    cases = [
        (torch.tensor([0.5, 0.5]), {}),  # no donors at all
        (torch.tensor([0.0, 0.0, 1.0]), donors),  # donors, but probability 0 (e.g. SYNTHIA-ignored)
    ]
    for probs, donor_map in cases:
        for mode in ("reference", "intended"):
            hpla = HPLA(hard, probs, donor_map, store, mode=mode)
            image, label, prov = hpla(image0, label0)
            assert torch.equal(image, image0) and torch.equal(label, label0)
            assert (prov == IGN).all()
            assert hpla.last_draws == []
    assert store.loaded == []


def test_synthia_ignored_classes_are_never_drawn():
    values = torch.full((19,), 0.5, dtype=torch.float64)
    values[list(SYNTHIA_IGNORED)] = 0.0  # would be the hardest if they were not ignored
    hard, probs = hard_classes(values, num_hard=19, ignored=SYNTHIA_IGNORED)
    donors, store = _one_class_donors(list(range(8)))  # 8x8 donors: one row per class 0..7
    donors.update({c: ["only0"] for c in SYNTHIA_IGNORED})
    hpla = HPLA(hard, probs, donors, store, generator=torch.Generator().manual_seed(3))
    for _ in range(40):
        hpla(torch.zeros(3, 8, 8, dtype=torch.uint8), torch.full((8, 8), IGN))
        assert hpla.last_draws[0].cls not in SYNTHIA_IGNORED


def test_class_draw_frequencies_follow_restricted_probabilities():
    hard = torch.tensor([0, 1, 2])
    probs = torch.tensor([0.5, 0.4, 0.1], dtype=torch.float64)
    donors, store = _one_class_donors([1, 2])  # class 0 skipped: draws follow 0.4 : 0.1 = 0.8 : 0.2
    hpla = HPLA(hard, probs, donors, store, generator=torch.Generator().manual_seed(4))
    image0, label0 = torch.zeros(3, 8, 8, dtype=torch.uint8), torch.full((8, 8), IGN)
    draws = []
    for _ in range(1000):
        hpla(image0, label0)
        draws.append(hpla.last_draws[0].cls)
    assert draws.count(1) / 1000 == pytest.approx(0.8, abs=0.05)


def test_mixed_size_donor_is_resized():
    hard = torch.tensor([1, 2])
    probs = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
    small_label = torch.tensor([[1, 0, IGN], [2, 2, 0]])
    items = {"small": (torch.full((3, 2, 3), 77, dtype=torch.uint8), small_label)}
    hpla = HPLA(hard, probs, {1: ["small"], 2: ["small"]}, Donors(items), generator=torch.Generator())
    image0, label0 = _recipient(4, 6)
    image, label, prov = hpla(image0, label0)
    # Exact factor 2: nearest resize turns each donor pixel into a 2x2 block.
    big = small_label.repeat_interleave(2, dim=0).repeat_interleave(2, dim=1)
    paste = (big == 1) | (big == 2)
    assert torch.equal(prov, torch.where(paste, big, torch.full_like(big, IGN)))
    assert torch.equal(label[paste], big[paste]) and torch.equal(label[~paste], label0[~paste])
    assert (image[:, paste] == 77).all()  # a constant image stays constant under bilinear resize
    assert torch.equal(image[:, ~paste], image0[:, ~paste])


def test_seeded_determinism():
    hard = torch.tensor([0, 1, 2, 3])
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    donors, store = _one_class_donors([0, 1, 2, 3])
    donors = {c: names + [f"only{(c + 1) % 4}"] for c, names in donors.items()}
    image0, label0 = torch.zeros(3, 8, 8, dtype=torch.uint8), torch.full((8, 8), IGN)

    def run(seed: int, mode: str) -> list:
        hpla = HPLA(hard, probs, donors, store, mode=mode, generator=torch.Generator().manual_seed(seed))
        out = []
        for _ in range(15):
            _, label, prov = hpla(image0, label0)
            out.append((hpla.last_draws, label.tolist(), prov.tolist()))
        return out

    for mode in ("reference", "intended"):
        assert run(5, mode) == run(5, mode)
        assert run(5, mode) != run(6, mode)


def test_bad_arguments_and_bad_donor():
    hard, probs = torch.tensor([0]), torch.tensor([1.0])
    with pytest.raises(ValueError, match="'reference', 'intended'"):
        HPLA(hard, probs, {}, Donors({}), mode="twice")
    with pytest.raises(ValueError, match="max_donors"):
        HPLA(hard, probs, {}, Donors({}), max_donors=0)
    bad = Donors({"broken": (torch.zeros(3, 4, 4, dtype=torch.float32), torch.zeros(4, 4, dtype=torch.int64))})
    hpla = HPLA(hard, probs, {0: ["broken"]}, bad)
    with pytest.raises(InputError, match="broken"):
        hpla(torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(4, 4, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_recipient_cpu_donors():
    hard = torch.tensor([0, 1]).cuda()
    probs = torch.tensor([0.5, 0.5], dtype=torch.float64).cuda()
    donors, store = _one_class_donors([0, 1])
    hpla = HPLA(hard, probs, donors, store, generator=torch.Generator().manual_seed(0))
    image, label, prov = hpla(torch.zeros(3, 8, 8, dtype=torch.uint8).cuda(), torch.full((8, 8), IGN).cuda())
    assert image.is_cuda and label.is_cuda and prov.is_cuda
    assert torch.equal(prov[prov != IGN], label[prov != IGN])
