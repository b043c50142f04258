"""Label-free model-selection scores against direct per-pixel loops and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hias_nb.model_selection import COVERAGE_THRESHOLD, LabelFreeScores, agreement, rank_correlations, snd


def _probs(seed: int, shape=(2, 4, 5, 6), sharp: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (sharp * torch.randn(*shape, generator=g)).softmax(1)


def test_entropy_and_coverage_equal_a_pixel_loop():
    batches = [_probs(0), _probs(1)]
    scores = LabelFreeScores()
    for p in batches:
        scores.update(p)
    ent, cov, n = 0.0, 0, 0
    for p in batches:
        for b in range(p.shape[0]):
            for y in range(p.shape[2]):
                for x in range(p.shape[3]):
                    v = [float(p[b, c, y, x]) for c in range(p.shape[1])]
                    ent += -sum(q * math.log(q) for q in v) / math.log(len(v))
                    cov += max(v) >= COVERAGE_THRESHOLD
                    n += 1
    r = scores.result()
    assert r["entropy"] == pytest.approx(ent / n, abs=1e-5)
    assert r[f"coverage@{COVERAGE_THRESHOLD}"] == pytest.approx(cov / n, abs=1e-5)


def test_entropy_bounds_uniform_and_one_hot():
    uniform = torch.full((1, 4, 3, 3), 0.25)
    one_hot = torch.nn.functional.one_hot(torch.zeros(1, 3, 3, dtype=torch.long), 4).permute(0, 3, 1, 2).float()
    for p, ent, cov in ((uniform, 1.0, 0.0), (one_hot, 0.0, 1.0)):
        s = LabelFreeScores()
        s.update(p)
        assert s.result()["entropy"] == pytest.approx(ent, abs=1e-6)
        assert s.result()[f"coverage@{COVERAGE_THRESHOLD}"] == cov


def test_snd_equals_a_direct_formula_on_the_same_pixels():
    p = _probs(3, shape=(1, 3, 4, 4))
    got = snd(p, torch.Generator().manual_seed(5), pixels=6, temperature=0.05)
    idx = torch.randperm(16, generator=torch.Generator().manual_seed(5))[:6]
    f = p[0].reshape(3, 16)[:, idx].T.numpy().astype(np.float64)  # the same 6 pixels
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    total = 0.0
    for i in range(6):
        logits = np.array([f[i] @ f[j] / 0.05 for j in range(6) if j != i])
        q = np.exp(logits - logits.max())
        q /= q.sum()
        total += -(q * np.log(q)).sum()
    assert float(got[0]) == pytest.approx(total / 6, rel=1e-5)


def test_snd_prefers_tight_clusters():
    """Two classes' pixels: tight clusters give denser neighbourhoods (higher SND) than the same clusters
    blurred by noise, where each pixel's softmax concentrates on its few nearest neighbours."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0]]).repeat_interleave(16, 0)  # [32,4] logits
    tight = centres.softmax(1)
    noisy = (centres + 1.5 * torch.randn(32, 4, generator=g)).softmax(1)
    as_map = [t.T.reshape(1, 4, 4, 8) for t in (tight, noisy)]
    dense, sparse = (float(snd(m, torch.Generator().manual_seed(1), pixels=32)[0]) for m in as_map)
    assert dense == pytest.approx(math.log(15), rel=1e-3)  # uniform over the 15 others of its cluster
    assert dense > sparse


def test_agreement():
    a = torch.zeros(1, 3, 2, 2)
    a[:, 0] = 1
    b = a.clone()
    b[0, :, 0, 0] = torch.tensor([0.0, 1.0, 0.0])
    assert agreement(a, b) == 0.75 and agreement(a, a) == 1.0


def test_evaluation_records_the_scores(tiny_toytown):
    from hias_nb.data import SegDataset
    from hias_nb.evaluate import evaluate, stage_entry
    from hias_nb.models import DeepLabV2

    ds = SegDataset("toytown", tiny_toytown, "target_val")
    torch.manual_seed(0)
    model = DeepLabV2("resnet10t", num_classes=19, aspp_rates=(1, 2))
    result = evaluate(model, ds, ds.protocol, "cpu", batch_size=4, progress=False)
    entry = stage_entry("x", result)
    assert set(entry["label_free"]) == {"entropy", f"coverage@{COVERAGE_THRESHOLD}", "snd"}
    assert 0 <= entry["label_free"]["entropy"] <= 1 and entry["label_free"]["snd"] > 0


def test_dataset_agreement_of_a_model_with_itself_and_with_another(tiny_toytown):
    from hias_nb.data import SegDataset
    from hias_nb.model_selection import dataset_agreement
    from hias_nb.models import DeepLabV2

    ds = SegDataset("toytown", tiny_toytown, "target_val")
    torch.manual_seed(0)
    a = DeepLabV2("resnet10t", num_classes=19, aspp_rates=(1, 2))
    torch.manual_seed(1)
    b = DeepLabV2("resnet10t", num_classes=19, aspp_rates=(1, 2))
    assert dataset_agreement(a, a, ds, "cpu", batch_size=3) == 1.0
    assert dataset_agreement(a, b, ds, "cpu", batch_size=3) < 1.0


def test_label_free_table_ranks_each_score_in_its_better_direction():
    from hias_nb.analysis import label_free_table

    report = {
        "stages": [
            {"name": "a", "miou": 30.0, "label_free": {"entropy": 0.4, "coverage@0.9": 0.5, "snd": 3.0}},
            {"name": "b", "miou": 40.0, "label_free": {"entropy": 0.2, "coverage@0.9": 0.7, "snd": 2.0}},
        ],
        "students": [
            {"name": "b_student", "miou": 35.0, "label_free": {"entropy": 0.3, "coverage@0.9": 0.6, "snd": 4.0}}
        ],  # fmt: skip
    }
    t = label_free_table(report)
    assert list(t.index) == ["a", "b", "b_student"]
    assert t["rank_miou"].tolist() == [3, 1, 2]
    assert t["rank_entropy"].tolist() == [3, 1, 2]  # lower entropy ranks first
    assert t["rank_coverage@0.9"].tolist() == [3, 1, 2] and t["rank_snd"].tolist() == [2, 3, 1]


def _spearman_direct(x: list[float], y: list[float]) -> float:
    """Pearson's r of average ranks, each rank counted by a loop (ties share their mean rank)."""

    def ranks(v: list[float]) -> list[float]:
        return [sum(o < a for o in v) + (sum(o == a for o in v) + 1) / 2 for a in v]

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def test_rank_correlations_against_hand_values():
    import pandas as pd

    nan = float("nan")
    df = pd.DataFrame({
        "seed": [0, 0, 0, 0, 1, 1],
        "miou": [10.0, 20.0, 30.0, 40.0, 15.0, 25.0],
        "label_free_entropy": [0.4, 0.3, 0.1, 0.2, 0.5, 0.35],
        "label_free_snd": [1.0, 2.0, 3.0, 4.0, 2.0, 1.5],  # a tie at 2.0
        "label_free_agreement": [nan, nan, 0.9, 0.8, nan, 0.95],  # rounds only
    })  # fmt: skip
    t = rank_correlations(df).set_index("score")
    # entropy ranks 5 3 1 2 6 4 against mIoU ranks 1 3 5 6 2 4: sum d^2 = 64, rho = 1 - 6*64/(6*35)
    assert t.loc["entropy", "spearman"] == pytest.approx(1 - 6 * 64 / 210)
    assert t.loc["snd", "spearman"] == pytest.approx(
        _spearman_direct(df["label_free_snd"].tolist(), df["miou"].tolist())
    )
    assert t.loc["agreement", "spearman"] == pytest.approx(-1.0) and t.loc["agreement", "n"] == 3
    # regret: entropy picks 30 (best 40) and 25 (best 25); snd 40 and 15 (best 25); agreement 30 (of 30, 40) and 25
    assert t["regret"].to_dict() == pytest.approx({"entropy": 5.0, "snd": 5.0, "agreement": 5.0})
    assert t["seeds"].tolist() == [2, 2, 2] and t.loc["entropy", "n"] == 6
