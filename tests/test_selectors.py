"""Tests for hias_nb.selectors: the fast IAS against its plain definition ``ias_reference`` (docs/method.md §2.2),
CBST, Constant and NoThreshold against direct computations (§2.3), class values (§2.6), replay from histograms."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from hias_nb.errors import InputError
from hias_nb.selectors import (
    CBST,
    IAS,
    ClassValues,
    ConfidenceHistogram,
    Constant,
    NoThreshold,
    Selector,
    _linear_quantile,
    _SortedSamples,
    cbst_from_histograms,
    confidence_histograms,
    ias_reference,
    replay_correct,
    replay_ias,
)

# ------------------------------------------------------------------------------------------------------------
# Streams


def random_stream(seed, n_images, num_classes, h=6, w=10, absent=(1,)):
    """Confidences mixing uniform values, exact float16 values and values that round to 1.0 in float16."""
    rng = np.random.default_rng(seed)
    shape = (n_images, h, w)
    conf = rng.uniform(1.0 / num_classes, 1.0, shape).astype(np.float32)
    exact = rng.random(shape) < 0.2
    conf[exact] = rng.choice(np.float16([0.5, 0.75, 0.875, 0.9, 0.99]), exact.sum()).astype(np.float32)
    near_one = rng.random(shape) < 0.25
    conf[near_one] = (1.0 - rng.uniform(0, 2.4e-4, near_one.sum())).astype(np.float32)  # fp16 -> 1.0
    present = [c for c in range(num_classes) if c not in absent]
    pred = rng.choice(present, shape).astype(np.int64)
    return conf, pred


# ------------------------------------------------------------------------------------------------------------
# IAS


@pytest.mark.parametrize("instance", ["batch", "image"])
@pytest.mark.parametrize(
    ("seed", "num_classes", "alpha", "beta", "gamma", "init"),
    [
        (0, 3, 0.2, 0.9, 8.0, 0.9),
        (1, 5, 0.5, 0.9, 8.0, 0.9),
        (2, 2, 1.0, 0.5, 3.3, 0.9),
        (3, 4, 0.5, 0.0, 8.0, 0.9),
        (4, 6, 0.3, 0.2, 0.5, 0.9),
        (5, 3, 0.5, 0.9, 8.0, 0.75),  # the old threshold ties with float16 samples of 0.75
    ],
)
def test_ias_matches_reference_bit_for_bit(seed, num_classes, alpha, beta, gamma, init, instance):
    conf, pred = random_stream(seed, 6, num_classes)
    ref_theta, ref_labels = ias_reference(conf, pred, num_classes, alpha, beta, gamma, init, instance, 2)
    ias = IAS(num_classes, alpha=alpha, beta=beta, gamma=gamma, init=init, instance=instance)
    labels = [ias.select(torch.from_numpy(conf[s : s + 2]), torch.from_numpy(pred[s : s + 2])) for s in (0, 2, 4)]
    assert torch.cat(labels).dtype == torch.int64
    np.testing.assert_array_equal(torch.cat(labels).numpy(), ref_labels)
    got = ias.history.pivot(index="instance", columns="class", values="threshold").to_numpy()
    assert np.array_equal(got, ref_theta)  # exact, not approximate
    assert np.array_equal(ias.thresholds.numpy(), ref_theta[-1])
    assert ias.thresholds.dtype == torch.float64


def test_ias_clip_path_near_one():
    """Confidences that round to 1.0 in float16 push theta to >= 1 with beta=0: clipped to 0.999."""
    conf = np.full((2, 4, 4), 0.99995, dtype=np.float32)  # float16(0.99995) == 1.0
    conf[0, 0, 0] = 0.99899  # just below the clipped threshold: ignored
    pred = np.zeros((2, 4, 4), dtype=np.int64)
    ref_theta, ref_labels = ias_reference(conf, pred, 2, 0.2, 0.0, 8.0, 0.9, "batch", 2)
    ias = IAS(2, beta=0.0)
    labels = ias.select(torch.from_numpy(conf), torch.from_numpy(pred))
    assert ias.thresholds[0].item() == 0.999 == ref_theta[-1, 0]
    np.testing.assert_array_equal(labels.numpy(), ref_labels)
    assert labels[0, 0, 0] == 255 and (labels.flatten()[1:] == 0).all()


def test_ias_pixel_exactly_at_threshold_is_kept():
    # beta=0 makes theta = float32(psi) exactly. 100 samples of 0.75 plus the old theta 0.9: the quantile at
    # 1 - 0.2 * 0.9**8 = 0.957 has virtual index 100 * 0.957 = 95.7, between two 0.75s, so psi = 0.75.
    conf = np.full((1, 10, 10), 0.75, dtype=np.float32)
    conf[0, 0, 0] = np.nextafter(np.float32(0.75), np.float32(0))  # same float16 sample, but q < theta
    pred = np.zeros((1, 10, 10), dtype=np.int64)
    ias = IAS(1, alpha=0.2, beta=0.0, gamma=8.0)
    labels = ias.select(torch.from_numpy(conf), torch.from_numpy(pred))
    assert ias.thresholds[0].item() == 0.75
    assert labels[0, 0, 0] == 255
    assert (labels.flatten()[1:] == 0).all()


def test_ias_hand_computed_example():
    """C=3, one image, alpha=0.5, beta=0.5, gamma=1, init=0.9; class 2 never predicted.

    level = 1 - 0.5 * 0.9 = 0.55 for every class.
    class 0: S = {0.9} + {0.5, 0.75, 1.0, 1.0} -> sorted [0.5, 0.75, 0.9, 1.0, 1.0], n=5, h = 4*0.55 = 2.2:
             between 0.9 and 1.0 at t=0.2 -> psi = 0.92; theta = 0.45 + 0.5*float32(0.92) ~ 0.91
             -> keeps the two 1.0 pixels.
    class 1: S = {0.9} + {0.625, 0.9375} -> [0.625, 0.9, 0.9375], n=3, h = 2*0.55 = 1.1:
             between 0.9 and 0.9375 at t=0.1 -> psi = 0.90375; theta ~ 0.901875 -> keeps 0.9375 only.
    class 2: S = {0.9} -> psi = float32(0.9) = 0.89999997615814208984375;
             theta = 0.45 + 0.5*psi = 0.899999988079071044921875 (the float32 drift of an absent class).
    """
    conf = torch.tensor([[[0.5, 0.75, 1.0], [0.625, 0.9375, 1.0]]], dtype=torch.float32)
    pred = torch.tensor([[[0, 0, 0], [1, 1, 0]]])
    ias = IAS(3, alpha=0.5, beta=0.5, gamma=1.0, init=0.9)
    labels = ias.select(conf, pred)
    theta = ias.thresholds.numpy()
    assert theta[0] == pytest.approx(0.45 + 0.5 * 0.92, abs=1e-7)
    assert theta[1] == pytest.approx(0.45 + 0.5 * 0.90375, abs=1e-7)
    assert theta[2] == 0.45 + 0.5 * float(np.float32(0.9)) == 0.899999988079071044921875
    assert labels.tolist() == [[[255, 255, 0], [255, 1, 0]]]
    hist = ias.history
    assert list(hist.columns) == ["instance", "class", "threshold", "selected_pixels", "predicted_pixels"]
    assert hist["instance"].tolist() == [0, 0, 0]
    assert hist["class"].tolist() == [0, 1, 2]
    assert hist["selected_pixels"].tolist() == [2, 1, 0]
    assert hist["predicted_pixels"].tolist() == [4, 2, 0]
    np.testing.assert_array_equal(hist["threshold"].to_numpy(), theta)


def test_ias_history_accumulates_over_calls_and_images():
    conf, pred = random_stream(7, 3, 4)
    ias = IAS(4, instance="image")
    ias.select(torch.from_numpy(conf[:2]), torch.from_numpy(pred[:2]))
    ias.select(torch.from_numpy(conf[2:]), torch.from_numpy(pred[2:]))
    hist = ias.history
    assert len(hist) == 3 * 4
    assert hist["instance"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for i in range(3):
        rows = hist[hist["instance"] == i]
        np.testing.assert_array_equal(rows["predicted_pixels"], np.bincount(pred[i].ravel(), minlength=4))
    assert IAS(3).history.empty


def test_ias_keep_fraction_tracks_alpha_theta_gamma():
    """docs/method.md §2.2: the realised keep fraction is about alpha * theta**gamma (beta=0: theta is the
    candidate)."""
    g = torch.Generator().manual_seed(0)
    conf = 0.5 + 0.5 * torch.rand(1, 256, 256, generator=g)
    pred = torch.zeros(1, 256, 256, dtype=torch.int64)
    for alpha, init in [(0.5, 0.9), (0.2, 0.98), (0.5, 0.84)]:
        ias = IAS(1, alpha=alpha, beta=0.0, gamma=8.0, init=init)
        kept = (ias.select(conf, pred) != 255).float().mean().item()
        assert kept == pytest.approx(alpha * init**8, abs=0.003)


def test_ias_input_validation():
    ias = IAS(3)
    conf = torch.full((1, 2, 2), 0.5)
    pred = torch.zeros(1, 2, 2, dtype=torch.int64)
    with pytest.raises(InputError, match="same shape"):
        ias.select(conf, pred[:, :1])
    with pytest.raises(InputError, match="float32"):
        ias.select(conf.double(), pred)
    with pytest.raises(InputError, match="integer"):
        ias.select(conf, pred.float())
    with pytest.raises(InputError, match="class 3"):
        ias.select(conf, pred + 3)
    with pytest.raises(InputError, match="class 255"):
        ias.select(conf, torch.full((1, 2, 2), 255))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        ias.select(conf * 3, pred)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        ias.select(torch.full((1, 2, 2), float("nan")), pred)
    with pytest.raises(InputError, match="instance"):
        IAS(3, instance="pixel")
    with pytest.raises(InputError, match="alpha"):
        IAS(3, alpha=1.5)
    assert ias.history.empty  # nothing was recorded by failed calls
    labels = ias.select(conf, pred.int())  # other integer dtypes are accepted
    assert labels.dtype == torch.int64


# ------------------------------------------------------------------------------------------------------------
# CBST, Constant, NoThreshold


def test_cbst_matches_quantile_of_all_observed_values():
    rng = np.random.default_rng(3)
    cbst = CBST(4, p=0.2)
    seen = {c: [] for c in range(4)}
    for _ in range(3):
        conf, pred = random_stream(int(rng.integers(1000)), 2, 4, absent=(2,))
        cbst.observe(torch.from_numpy(conf), torch.from_numpy(pred))
        for c in range(4):
            seen[c].append(conf[pred == c].astype(np.float16))
    theta = cbst.thresholds.numpy()
    for c in range(4):
        values = np.concatenate(seen[c]).astype(np.float64)
        expected = np.quantile(values, 1 - 0.2) if len(values) else 1.0
        assert theta[c] == expected
    assert theta[2] == 1.0  # never predicted: 1.0, no crash (docs/method.md B13)
    conf, pred = random_stream(9, 2, 4)
    labels = cbst.select(torch.from_numpy(conf), torch.from_numpy(pred)).numpy()
    np.testing.assert_array_equal(labels, np.where(conf.astype(np.float64) >= theta[pred], pred, 255))


def test_cbst_without_observations_and_after_more_data():
    cbst = CBST(2)
    assert cbst.thresholds.tolist() == [1.0, 1.0]
    cbst.observe(torch.tensor([[[0.5, 0.75]]]), torch.tensor([[[0, 0]]]))
    assert cbst.thresholds[0].item() == 0.5 + 0.8 * 0.25  # linear between the two values
    cbst.observe(torch.tensor([[[1.0]]]), torch.tensor([[[0]]]))
    assert cbst.thresholds[0].item() == np.quantile([0.5, 0.75, 1.0], 0.8)


def test_constant_compares_float32_against_float64_threshold():
    # float32(0.9) = 0.89999998 < 0.9: ignored; the next float32 is >= 0.9: kept; 0.5 exactly at 0.5: kept.
    below = np.float32(0.9)
    above = np.nextafter(below, np.float32(1))
    conf = torch.tensor([[[below, above]]], dtype=torch.float32)
    pred = torch.tensor([[[0, 1]]])
    assert Constant(2).select(conf, pred).tolist() == [[[255, 1]]]
    assert Constant(2, threshold=0.5).select(torch.tensor([[[0.5, 0.4999]]]), pred).tolist() == [[[0, 255]]]
    assert Constant(2).thresholds.tolist() == [0.9, 0.9]


def test_no_threshold_keeps_argmax():
    conf, pred = random_stream(5, 2, 3)
    labels = NoThreshold(3).select(torch.from_numpy(conf), torch.from_numpy(pred))
    np.testing.assert_array_equal(labels.numpy(), pred)
    assert NoThreshold(3).thresholds.tolist() == [0.0, 0.0, 0.0]


def test_cbst_from_histograms_equals_cbst_over_images():
    """Rows of several images repeat (class, code) pairs: their counts add up before the quantile."""
    conf, pred = random_stream(4, 5, 4, absent=(3,))
    cbst = CBST(4, p=0.3)
    for s in range(0, 5, 2):
        cbst.observe(torch.from_numpy(conf[s : s + 2]), torch.from_numpy(pred[s : s + 2]))
    rows = record_stream(conf, pred, batch_size=2)
    assert rows.duplicated(["class", "code"]).any()
    got = cbst_from_histograms(rows, 4, p=0.3)
    assert got.dtype == np.float64 and np.array_equal(got, cbst.thresholds.numpy()) and got[3] == 1.0
    columns = {k: rows[k].to_numpy() for k in ("class", "code", "count")}  # a mapping without images
    assert np.array_equal(cbst_from_histograms(columns, 4, p=0.3), got)
    with pytest.raises(InputError, match="class ids"):
        cbst_from_histograms(rows, 2, p=0.3)
    with pytest.raises(InputError, match="column"):
        cbst_from_histograms({"class": [0]}, 4)


# ------------------------------------------------------------------------------------------------------------
# One interface


def test_every_policy_is_a_selector_with_one_pass_structure():
    """The generator's loop: observe every batch where `two_pass`, then select every batch; the same calls fit
    every selector, and the labels are the pixels at or above the thresholds the selector reports."""
    conf, pred = random_stream(8, 6, 4)
    batches = [(torch.from_numpy(conf[s : s + 2]), torch.from_numpy(pred[s : s + 2])) for s in range(0, 6, 2)]
    policies = [IAS(4, alpha=0.5), CBST(4, p=0.3), Constant(4, 0.8), NoThreshold(4)]
    assert [p.two_pass for p in policies] == [False, True, False, False]
    for policy in policies:
        assert isinstance(policy, Selector)
        if policy.two_pass:
            for c, p in batches:
                policy.observe(c, p)
        for c, p in batches:
            labels = policy.select(c, p)
            theta = policy.thresholds.numpy()  # IAS: after this batch's update
            assert labels.dtype == torch.int64
            expected = np.where(c.numpy().astype(np.float64) >= theta[p.numpy()], p.numpy(), 255)
            np.testing.assert_array_equal(labels.numpy(), expected)
        assert (policy.history is None) == (not isinstance(policy, IAS))
    ref_theta, _ = ias_reference(conf, pred, 4, 0.5, 0.9, 8.0, 0.9, "batch", 2)
    assert np.array_equal(policies[0].thresholds.numpy(), ref_theta[-1])
    for policy in policies:
        with pytest.raises(InputError, match=f"{type(policy).__name__}.select"):
            policy.select(batches[0][0], batches[0][1] + 4)


# ------------------------------------------------------------------------------------------------------------
# Class values


def test_class_values_hand_computed():
    cv = ClassValues(3, gamma=0.5)
    conf = torch.tensor([[[0.5, 0.75, 1.0, 0.25]]])
    cv.update(conf, torch.tensor([[[0, 0, 1, 255]]]))
    assert cv.values.tolist() == [0.625, 1.0, 0.0]  # first time: set; class 2 never selected: 0
    cv.update(torch.tensor([[[0.25, 0.5, 0.9]]]), torch.tensor([[[0, 255, 255]]]))
    assert cv.values.tolist() == [0.5 * 0.625 + 0.5 * 0.25, 1.0, 0.0]  # class 1 absent: skipped
    with pytest.raises(InputError, match="labels"):
        cv.update(conf, torch.tensor([[[0, 0, 7, 255]]]))


# ------------------------------------------------------------------------------------------------------------
# Histograms and replay


def record_stream(conf, pred, batch_size):
    parts = [
        pd.DataFrame(
            confidence_histograms(
                torch.from_numpy(conf[s : s + batch_size]), torch.from_numpy(pred[s : s + batch_size]), first_image=s
            )
        )
        for s in range(0, len(conf), batch_size)
    ]
    return pd.concat(parts, ignore_index=True)


def test_confidence_histograms_rows():
    conf = torch.tensor([[[0.5, 0.5, 1.0]], [[0.75, 0.99995, 0.2]]])
    pred = torch.tensor([[[1, 1, 0]], [[1, 0, 0]]])
    rows = confidence_histograms(conf, pred, first_image=10)
    code = lambda x: int(np.float16(x).view(np.int16))  # noqa: E731
    got = list(zip(*(rows[k].tolist() for k in ("image", "class", "code", "count")), strict=True))
    assert got == [
        (10, 0, code(1.0), 1),
        (10, 1, code(0.5), 2),
        (11, 0, code(0.2), 1),
        (11, 0, code(1.0), 1),
        (11, 1, code(0.75), 1),
    ]


def test_confidence_histograms_count_the_pixels_the_ground_truth_confirms():
    conf = torch.tensor([[[0.5, 0.5, 1.0]], [[0.75, 0.99995, 0.2]]])
    pred = torch.tensor([[[1, 1, 0]], [[1, 0, 0]]])
    gt = torch.tensor([[[1, 0, 0]], [[1, 0, 255]]])  # 255: unlabelled, never correct
    rows = confidence_histograms(conf, pred, first_image=10, gt=gt)
    assert rows["count"].tolist() == [1, 2, 1, 1, 1] and rows["correct"].tolist() == [1, 1, 0, 1, 1]
    assert "correct" not in confidence_histograms(conf, pred)
    with pytest.raises(InputError, match="gt"):
        confidence_histograms(conf, pred, gt=gt[:, :, :2])


@pytest.mark.parametrize("instance", ["batch", "image"])
def test_replay_correct_equals_a_direct_count(instance):
    conf, pred = random_stream(5, 7, 4)
    gt = np.where(np.random.default_rng(6).random(pred.shape) < 0.7, pred, 255 - (pred == 0))  # 70 % right
    gt[:, 0, :] = 255
    parts = [pd.DataFrame(confidence_histograms(torch.from_numpy(conf[s : s + 3]), torch.from_numpy(pred[s : s + 3]),
                                                first_image=s, gt=torch.from_numpy(gt[s : s + 3])))
             for s in range(0, 7, 3)]  # fmt: skip
    rows = pd.concat(parts, ignore_index=True).sample(frac=1.0, random_state=1)  # rows in any order within images
    rows = rows.sort_values("image", kind="stable")
    hist = ConfidenceHistogram(rows, 4)
    thresholds, selected = replay_ias(hist, 4, 0.5, 0.9, 8.0, instance=instance, batch_size=2)
    correct = replay_correct(hist, thresholds, instance=instance, batch_size=2)
    size = 1 if instance == "image" else 2
    for i, s in enumerate(range(0, 7, size)):
        q16 = conf[s : s + size].astype(np.float16).astype(np.float64)
        p, g = pred[s : s + size], gt[s : s + size]
        direct = [int(((p == c) & (q16 >= thresholds[i, c]) & (g == c)).sum()) for c in range(4)]
        assert correct[i].tolist() == direct
    assert (correct <= selected).all() and correct.sum() > 0
    with pytest.raises(InputError, match="correct"):
        replay_correct(ConfidenceHistogram(rows.drop(columns="correct"), 4), thresholds, instance, 2)


@pytest.mark.parametrize("instance", ["batch", "image"])
@pytest.mark.parametrize(
    ("seed", "num_classes", "alpha", "beta", "gamma"), [(0, 4, 0.5, 0.9, 8.0), (1, 3, 0.3, 0.2, 2.0)]
)
def test_replay_equals_ias(seed, num_classes, alpha, beta, gamma, instance):
    conf, pred = random_stream(seed, 7, num_classes)  # 7 images: the last 2-image group has one image
    ias = IAS(num_classes, alpha=alpha, beta=beta, gamma=gamma, instance=instance)
    for s in range(0, 7, 2):
        ias.select(torch.from_numpy(conf[s : s + 2]), torch.from_numpy(pred[s : s + 2]))
    hist = ias.history
    rows = record_stream(conf, pred, batch_size=3)  # recording batches need not match the instance groups
    thresholds, selected = replay_ias(rows, num_classes, alpha, beta, gamma, instance=instance, batch_size=2)
    expected = hist.pivot(index="instance", columns="class", values="threshold").to_numpy()
    assert np.array_equal(thresholds, expected)
    # selected: float16 resolution, counted directly
    size = 1 if instance == "image" else 2
    for i, s in enumerate(range(0, 7, size)):
        q16 = conf[s : s + size].astype(np.float16).astype(np.float64)
        p = pred[s : s + size]
        direct = [int(((p == c) & (q16 >= thresholds[i, c])).sum()) for c in range(num_classes)]
        assert selected[i].tolist() == direct
    fp32_selected = hist.pivot(index="instance", columns="class", values="selected_pixels").to_numpy()
    assert np.abs(selected - fp32_selected).sum() <= 0.05 * fp32_selected.sum() + 2


def test_replay_prepared_histogram_parquet_and_names(tmp_path):
    conf, pred = random_stream(11, 5, 3)
    rows = record_stream(conf, pred, batch_size=2)
    rows["image"] = [f"img_{i:03d}" for i in rows["image"]]  # the generator stores names, in visiting order
    rows = rows.sample(frac=1.0, random_state=0).sort_values("image", kind="stable")  # shuffled within images
    rows.to_parquet(tmp_path / "h.parquet", index=False)
    table = ConfidenceHistogram(pd.read_parquet(tmp_path / "h.parquet"), 3)
    assert table.num_images == 5
    ias = IAS(3, alpha=0.4, instance="batch")
    for s in range(0, 5, 2):
        ias.select(torch.from_numpy(conf[s : s + 2]), torch.from_numpy(pred[s : s + 2]))
    expected = ias.history.pivot(index="instance", columns="class", values="threshold").to_numpy()
    for _ in range(2):  # second call reuses the cached grouping
        thresholds, _ = replay_ias(table, 3, alpha=0.4, beta=0.9, gamma=8.0)
        assert np.array_equal(thresholds, expected)
    # rows of one image need not be contiguous: the first appearance fixes each image's place in the order
    moved = rows[rows["image"] == "img_000"].iloc[:3]
    interleaved = pd.concat([rows.drop(moved.index), moved], ignore_index=True)
    assert np.array_equal(replay_ias(interleaved, 3, alpha=0.4, beta=0.9, gamma=8.0)[0], expected)
    with pytest.raises(InputError, match="num_classes"):
        replay_ias(table, 4, alpha=0.4, beta=0.9, gamma=8.0)
    with pytest.raises(InputError, match="batch_size"):
        replay_ias(table, 3, alpha=0.4, beta=0.9, gamma=8.0, batch_size=0)
    with pytest.raises(InputError, match="column"):
        replay_ias({"image": [0]}, 3, alpha=0.4, beta=0.9, gamma=8.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ias_on_cuda_equals_cpu():
    conf, pred = random_stream(2, 4, 5)
    out = []
    for device in ("cpu", "cuda"):
        ias = IAS(5, alpha=0.5, instance="image")
        labels = ias.select(torch.from_numpy(conf).to(device), torch.from_numpy(pred).to(device))
        assert labels.device.type == device
        out.append((labels.cpu().numpy(), ias.thresholds.numpy()))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    assert np.array_equal(out[0][1], out[1][1])


def test_ias_long_stream_matches_reference():
    """80 images, thresholds evolving over 40 two-image instances; a fresh IAS per mode."""
    conf, pred = random_stream(21, 80, 7, h=4, w=6, absent=(0, 5))
    for instance in ("batch", "image"):
        ref_theta, ref_labels = ias_reference(conf, pred, 7, 0.5, 0.7, 8.0, 0.9, instance, 2)
        ias = IAS(7, alpha=0.5, beta=0.7, instance=instance)
        labels = torch.cat(
            [ias.select(torch.from_numpy(conf[s : s + 2]), torch.from_numpy(pred[s : s + 2])) for s in range(0, 80, 2)]
        )
        np.testing.assert_array_equal(labels.numpy(), ref_labels)
        got = ias.history.pivot(index="instance", columns="class", values="threshold").to_numpy()
        assert np.array_equal(got, ref_theta)
        rows = record_stream(conf, pred, batch_size=4)
        assert np.array_equal(replay_ias(rows, 7, 0.5, 0.7, 8.0, instance=instance)[0], ref_theta)


def test_ias_interpolation_next_to_the_old_threshold():
    """Tiny instances often interpolate between the inserted old threshold and a float16 sample."""
    rng = np.random.default_rng(5)
    conf = rng.uniform(0.8, 1.0, (300, 1, 3)).astype(np.float32)
    pred = rng.integers(0, 2, (300, 1, 3))
    ref_theta, _ = ias_reference(conf, pred, 2, 0.2, 0.5, 8.0, 0.9, "image", 1)
    ias = IAS(2, alpha=0.2, beta=0.5, gamma=8.0, instance="image")
    ias.select(torch.from_numpy(conf), torch.from_numpy(pred))
    got = ias.history.pivot(index="instance", columns="class", values="threshold").to_numpy()
    assert np.array_equal(got, ref_theta)


def test_linear_quantile_helper_is_numpy_arithmetic():
    """The vectorised quantile repeats np.quantile's arithmetic exactly, also where its two-sided lerp
    (``b - (b - a) * (1 - t)`` for ``t >= 0.5``) rounds differently from ``a + (b - a) * t``
    (arbitrary float64 values; in IAS the float32 candidate hides that last-ulp difference)."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        values = [np.sort(rng.uniform(0, 1, rng.integers(1, 6))) for _ in range(8)]
        level = rng.uniform(0, 1, 8)
        n = np.array([len(v) for v in values])
        got = _linear_quantile(level, n, lambda j, vs=values: np.array([v[k] for v, k in zip(vs, j, strict=True)]))
        expected = [np.quantile(v, q) for v, q in zip(values, level, strict=True)]
        assert np.array_equal(got, expected)


def test_sorted_samples_rank_and_order_statistics():
    # class 0: [0.5, 0.5, 0.75], class 1: none, class 2: [1.0]
    codes = {x: int(np.float16(x).view(np.int16)) for x in (0.5, 0.75, 1.0)}
    key = np.array([codes[0.5], codes[0.75], 2 * 15361 + codes[1.0]])
    samples = _SortedSamples(key, np.array([2, 1, 1]), 3)
    classes = np.arange(3)
    assert samples.count.tolist() == [3, 0, 1]
    assert samples.rank_below(classes, np.array([0.75, 0.9, 1.0])).tolist() == [2, 0, 0]
    assert samples.rank_below(classes, np.array([0.5, 0.9, 1.5])).tolist() == [0, 0, 1]
    assert samples.kth(np.zeros(3, dtype=np.int64), np.array([0, 1, 2])).tolist() == [0.5, 0.5, 0.75]
    assert samples.kth(np.array([2]), np.array([0])).tolist() == [1.0]


def test_ias_update_is_select():
    """``IAS.update`` (the name user code calls) takes the same stream step as ``select``."""
    conf, pred = random_stream(7, 4, 5)
    a, b = IAS(5, alpha=0.5), IAS(5, alpha=0.5)
    for s in (0, 2):
        la = a.update(torch.from_numpy(conf[s : s + 2]), torch.from_numpy(pred[s : s + 2]))
        lb = b.select(torch.from_numpy(conf[s : s + 2]), torch.from_numpy(pred[s : s + 2]))
        assert torch.equal(la, lb)
    assert torch.equal(a.thresholds, b.thresholds) and len(a.history) == 2 * 5
    assert not torch.equal(a.thresholds, torch.full((5,), 0.9, dtype=torch.float64))  # the stream moved them


def _cbst_stream(seed: int, n: int = 6, h: int = 8, w: int = 10):
    g = torch.Generator().manual_seed(seed)
    conf = 0.3 + 0.7 * torch.rand(n, h, w, generator=g)
    pred = torch.randint(0, 5, (n, h, w), generator=g)
    pred[:, 0, 0] = 4  # class 4 appears; classes 5.. never do
    return conf.float(), pred


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_cbst_from_histograms_equals_cbst(p):
    conf, pred = _cbst_stream(1)
    rows = pd.DataFrame(confidence_histograms(conf, pred))
    cbst = CBST(19, p=p)
    cbst.observe(conf[:3], pred[:3])
    cbst.observe(conf[3:], pred[3:])
    got = cbst_from_histograms(rows, 19, p)
    np.testing.assert_array_equal(got, cbst.thresholds.numpy())
    assert (got[5:] == 1.0).all()  # never predicted
