"""Label-free model selection: scores of a model's target predictions that need no target label.

Not part of the paper. UDA results are commonly picked with target labels (the best checkpoint on the
validation set), which a real deployment does not have. These scores rank checkpoints from their predictions on
unlabelled target images alone; `hias-nb demo` and `hias-nb ablation` record them for every evaluated stage
(``report.json``: ``label_free`` of each stage) next to its mIoU, so their rank correlation with mIoU can be
measured.

For softmax maps ``p`` ``[B,C,H,W]`` (C classes):

- ``entropy``: mean per-pixel prediction entropy ``-Σ_c p_c log p_c / log C`` in [0, 1] (lower: more confident);
- ``coverage@0.9``: the fraction of pixels whose top probability is at least 0.9 (a pseudo-label's coverage at
  a fixed threshold);
- ``snd``: soft neighbourhood density (Saito et al., "Tune it the Right Way", ICCV 2021), on pixels: per image,
  `SND_PIXELS` pixels drawn with a fixed generator, their probability vectors L2-normalised, the similarity of
  every pair divided by `SND_TEMPERATURE`, each row's softmax over the other pixels, its entropy averaged
  (higher: denser neighbourhoods, a better-clustered target);
- ``agreement`` (for a self-training round): the fraction of pixels where the student's and the teacher's
  arg-max agree (`agreement`).

Written here because no installed library computes them for segmentation maps; each is a few tensor lines and is
tested against a direct loop. `rank_correlations` measures how well each score ranks checkpoints by mIoU (the
ablation's ``label_free_ranks.csv``).
"""

from __future__ import annotations

import math

import pandas as pd
import torch
from torch import Tensor

__all__ = ["SND_PIXELS", "SND_TEMPERATURE", "COVERAGE_THRESHOLD", "HIGHER_IS_BETTER", "LabelFreeScores", "snd",
           "agreement", "dataset_agreement", "rank_correlations"]  # fmt: skip

SND_PIXELS = 256  # pixels per image whose neighbourhood density is measured
SND_TEMPERATURE = 0.05  # the SND paper's temperature
COVERAGE_THRESHOLD = 0.9
# the way each score points to the better model, for picking a checkpoint by it
HIGHER_IS_BETTER = {"entropy": False, f"coverage@{COVERAGE_THRESHOLD}": True, "snd": True, "agreement": True}


def snd(
    probs: Tensor, generator: torch.Generator, pixels: int = SND_PIXELS, temperature: float = SND_TEMPERATURE
) -> Tensor:
    """Soft neighbourhood density of each image of ``probs`` ``[B,C,H,W]`` → ``[B]`` (see the module docstring)."""
    b, c, h, w = probs.shape
    n = min(pixels, h * w)
    idx = torch.stack([torch.randperm(h * w, generator=generator)[:n] for _ in range(b)]).to(probs.device)  # [B,n]
    feats = probs.flatten(2).gather(2, idx[:, None, :].expand(b, c, n)).transpose(1, 2)  # [B,n,C]
    feats = torch.nn.functional.normalize(feats.float(), dim=2)
    sim = feats @ feats.transpose(1, 2) / temperature  # [B,n,n]
    sim = sim.masked_fill(torch.eye(n, dtype=torch.bool, device=probs.device), float("-inf"))  # not oneself
    p = sim.softmax(dim=2)
    ent = -(p * p.clamp_min(1e-12).log()).sum(dim=2)  # [B,n]
    return ent.mean(dim=1)


def agreement(student_probs: Tensor, teacher_probs: Tensor) -> float:
    """Fraction of pixels where two ``[B,C,H,W]`` maps have the same arg-max."""
    return float((student_probs.argmax(1) == teacher_probs.argmax(1)).float().mean())


class LabelFreeScores:
    """Accumulates the scores over batches of softmax maps (`update`), then `result` → {name: value}."""

    def __init__(self, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.pixels = 0
        self.entropy = 0.0
        self.covered = 0.0
        self.images = 0
        self.snd = 0.0

    def update(self, probs: Tensor) -> None:
        """Add a batch ``[B,C,H,W]`` of softmax maps."""
        c = probs.shape[1]
        p = probs.float()
        ent = -(p * p.clamp_min(1e-12).log()).sum(dim=1) / math.log(c)  # [B,H,W]
        self.entropy += float(ent.sum())
        self.covered += float((p.amax(dim=1) >= COVERAGE_THRESHOLD).sum())
        self.pixels += ent.numel()
        self.snd += float(snd(p, self.gen).sum())
        self.images += p.shape[0]

    def totals(self) -> Tensor:
        """The running sums as one tensor (summed over processes under torchrun, then `from_totals`)."""
        return torch.tensor([self.entropy, self.covered, self.pixels, self.snd, self.images], dtype=torch.float64)

    @staticmethod
    def from_totals(t: Tensor) -> dict[str, float]:
        entropy, covered, pixels, snd_sum, images = (float(v) for v in t)
        if pixels == 0:
            return {}
        return {
            "entropy": round(entropy / pixels, 5),
            f"coverage@{COVERAGE_THRESHOLD}": round(covered / pixels, 5),
            "snd": round(snd_sum / images, 5),
        }

    def result(self) -> dict[str, float]:
        return self.from_totals(self.totals())


@torch.no_grad()
def dataset_agreement(
    student: torch.nn.Module, teacher: torch.nn.Module, dataset, device: str, batch_size: int = 16
) -> float:
    """`agreement` of two models over the images of `dataset` (its labels unused), pixel-weighted."""
    from hias_nb.evaluate import predict_probs  # local: evaluate imports this module

    same = total = 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for m in (student, teacher):
        m.eval()
    for batch in loader:
        images = batch["image"].to(device)
        a, b = predict_probs(student, images).argmax(1), predict_probs(teacher, images).argmax(1)
        same += int((a == b).sum())
        total += a.numel()
    return same / max(total, 1)


def rank_correlations(checkpoints: pd.DataFrame) -> pd.DataFrame:
    """How well each label-free score ranks checkpoints by their mIoU.

    `checkpoints`: one row per evaluated checkpoint, with ``seed``, ``miou`` and ``label_free_<score>`` columns
    (a score missing for a checkpoint is NaN: ``agreement`` exists for rounds only). Returns one row per score:
    ``n`` (checkpoints that have it), ``spearman`` (Spearman's rank correlation of the score with mIoU, all seeds
    pooled, ties at their mean rank; negative is good for entropy, positive for the others, `HIGHER_IS_BETTER`),
    ``regret`` (per seed, the best mIoU among the checkpoints that have the score minus the mIoU of the one the
    score picks, then the mean over seeds: what choosing by the score costs) and ``seeds``.
    """
    rows = []
    for col in [c for c in checkpoints.columns if c.startswith("label_free_")]:
        name = col.removeprefix("label_free_")
        d = checkpoints[["seed", "miou", col]].dropna()
        rho = d[[col, "miou"]].corr(method="spearman").iloc[0, 1] if len(d) > 2 else float("nan")
        higher = HIGHER_IS_BETTER.get(name, True)
        regrets = [
            g["miou"].max() - g.loc[g[col].idxmax() if higher else g[col].idxmin(), "miou"]
            for _, g in d.groupby("seed")
        ]
        regret = sum(regrets) / len(regrets) if regrets else float("nan")
        rows.append({"score": name, "n": len(d), "spearman": rho, "regret": regret, "seeds": len(regrets)})
    return pd.DataFrame(rows, columns=["score", "n", "spearman", "regret", "seeds"])
