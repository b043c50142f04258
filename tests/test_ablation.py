import pandas as pd
import pytest
import yaml

from hias_nb.ablation import VARIANTS, ablation_table, checkpoints, run_ablation
from hias_nb.model_selection import rank_correlations


def test_table_counts_shared_source_stages_once_and_takes_the_last_round():
    rows = []
    for seed, (src, r1, r2) in {0: (10.0, 12.0, 11.0), 1: (20.0, 24.0, 26.0)}.items():
        for variant in ("full", "no_hpla"):
            rows += [
                {"variant": variant, "seed": seed, "stage": "source_only", "miou": src},
                {"variant": variant, "seed": seed, "stage": "warmup", "miou": src + 2},
                {"variant": variant, "seed": seed, "stage": "round_1", "miou": r1},
                {"variant": variant, "seed": seed, "stage": "round_2", "miou": r2},
            ]
        rows.append({"variant": "control", "seed": seed, "stage": "control", "miou": src + 1})
    t = ablation_table(pd.DataFrame(rows))
    assert t.loc[("reference", "source_only"), "count"] == 2  # not 4: shared by both variants
    assert t.loc[("reference", "source_only"), "mean"] == 15.0
    assert t.loc[("reference", "warmup"), "count"] == 2
    assert t.loc[("reference", "warmup"), "mean"] == 17.0
    assert t.loc[("full", "round_2"), "mean"] == (11.0 + 26.0) / 2  # the final round, per seed
    assert ("full", "round_1") not in t.index
    assert t.loc[("control", "control"), "mean"] == 16.0


def test_checkpoints_count_shared_stages_once_and_leave_out_the_oracle():
    rows = [{"variant": v, "seed": s, "stage": st, "miou": 1.0} for s in (0, 1) for v in ("full", "cbst")
            for st in ("source_only", "source_only_adabn", "warmup", "round_1")]  # fmt: skip
    rows += [{"variant": "full", "seed": s, "stage": "oracle", "miou": 9.0} for s in (0, 1)]
    got = checkpoints(pd.DataFrame(rows))
    assert len(got) == 2 * (3 + 2) and "oracle" not in set(got["stage"])
    assert got.groupby("seed")["stage"].apply(list).tolist() == [
        ["source_only", "source_only_adabn", "warmup", "round_1", "round_1"]] * 2  # fmt: skip


def test_each_variant_changes_exactly_its_setting():
    from hias_nb.config import config_to_dict
    from hias_nb.demo import demo_config, stage_configs

    def flat(overrides):  # every value every stage receives, by (stage, key)
        plan = stage_configs(demo_config(overrides=overrides), "cpu")
        return {(s, k): v for s, cfg in plan.items() for k, v in config_to_dict(cfg).items()}

    full = flat({})
    expected = {
        "full": set(),
        "cbst": {("round_1/pseudo", "policy")},
        "constant": {("round_1/pseudo", "policy")},
        "none": {("round_1/pseudo", "policy")},
        "no_hpla": {("round_1/train", "hpla")},
        "no_rar": {("round_1/train", "lambda_kld"), ("round_1/train", "lambda_ent")},
        "no_consistency": {("round_1/train", "lambda_cst")},
        "no_strong": {("round_1/train", "strong")},
    }
    assert set(VARIANTS) == set(expected) | {"no_warmup"}
    for name, changed in expected.items():
        variant = flat(VARIANTS[name])
        assert {k for k in full if variant[k] != full[k]} == changed, name
    no_warmup = stage_configs(demo_config(overrides=VARIANTS["no_warmup"]))
    assert "warmup/train" not in no_warmup
    assert no_warmup["round_1/pseudo"].checkpoint == "runs/demo/source_only_adabn/model_final.pt"


@pytest.mark.slow
def test_tiny_ablation_shares_the_warmup_and_writes_the_csv(tiny_toytown, tmp_path):
    """Variants reuse the seed's source-only and warm-up stages from another folder (hard links), instead of
    refusing them as a run with another init_checkpoint; the CSV has one row per (variant, seed, stage)."""
    tiny = {"images": 24, "size": (32, 64), "source.iterations": 6, "round.iterations": 4, "warmup.iterations": 3}
    tiny |= {"source.batch_size": 4, "warmup.batch_size": 4, "round.batch_size": 4, "adabn_batch_size": 4}
    tiny |= {"pretrain_root": str(tmp_path / "pretrain"), "pretrain.iterations": 2, "pretrain.images": 4,
             "pretrain.batch_size": 4, "pretrain.num_workers": 1}  # fmt: skip
    csv = tmp_path / "ablation.csv"
    df = run_ablation(
        tmp_path / "abl",
        seeds=(0,),
        variants=("full", "cbst", "no_warmup"),
        csv=csv,
        quick=True,
        device="cpu",
        data_root=str(tiny_toytown),
        **tiny,
    )
    assert csv.exists() and len(pd.read_csv(csv)) == len(df)
    full = df[df["variant"] == "full"].set_index("stage")["miou"]
    for variant in ("cbst", "no_warmup"):
        rows = df[df["variant"] == variant].set_index("stage")["miou"]
        assert rows["source_only"] == full["source_only"]  # shared, not retrained
    assert df[df["variant"] == "cbst"].set_index("stage")["miou"]["warmup"] == full["warmup"]
    assert "warmup" not in set(df[df["variant"] == "no_warmup"]["stage"])
    assert set(df[df["variant"] == "control"]["stage"]) == {"control", "control_adabn"}
    # label-free scores against mIoU over the distinct checkpoints: full's 4 stages, one round each for cbst and
    # no_warmup (their source stages are full's), the control's 2
    ranks = pd.read_csv(tmp_path / "label_free_ranks.csv").set_index("score")
    assert len(checkpoints(df)) == 8 and ranks.loc["entropy", "n"] == 8 and ranks.loc["agreement", "n"] == 3
    # the CSV keeps the scores' precision: their ranking read back from it is the one written beside it
    again = rank_correlations(checkpoints(pd.read_csv(csv))).set_index("score")
    pd.testing.assert_frame_equal(again, ranks, check_exact=False, atol=1e-3)
    warm = tmp_path / "abl" / "seed_0"
    assert (warm / "cbst" / "warmup" / "model_final.pt").stat().st_ino == (
        warm / "full" / "warmup" / "model_final.pt"
    ).stat().st_ino
    # the shared warm-up's recorded config names the variant's own (linked) source model
    warm_cfg = yaml.safe_load((warm / "cbst" / "warmup" / "train" / "config.yaml").read_text())
    assert warm_cfg["init_checkpoint"] == str(warm / "cbst" / "source_only" / "model_final.pt")
