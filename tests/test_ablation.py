import pandas as pd

from hias_nb.ablation import VARIANTS, ablation_table


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


def test_variants_change_only_demo_fields():
    from dataclasses import fields

    from hias_nb.demo import DemoConfig

    names = {f.name for f in fields(DemoConfig)}
    assert VARIANTS["full"] == {}
    for overrides in VARIANTS.values():
        assert set(overrides) <= names
