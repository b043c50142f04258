from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import yaml

from hias_nb.config import config_to_dict, load_config, parse_overrides
from hias_nb.errors import InputError


@dataclass
class Cfg:
    lr: float = 1e-3
    iterations: int = 10
    name: str = "x"
    amp: bool = True
    rates: tuple[int, ...] = (1, 2)
    size: tuple[int, int] | None = None
    mode: Literal["a", "b"] = "a"
    path: str | None = None


def test_defaults_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.01\niterations: 5\nrates: [6, 12]\n")
    cfg = load_config(Cfg, f, parse_overrides(["--iterations", "7", "--size", "[64, 128]", "--amp=false"]))
    assert cfg == Cfg(lr=0.01, iterations=7, rates=(6, 12), size=(64, 128), amp=False)
    assert config_to_dict(cfg)["size"] == [64, 128]


def test_int_accepted_for_float_and_scientific_notation():
    assert load_config(Cfg, None, parse_overrides(["--lr", "1"])).lr == 1.0
    assert load_config(Cfg, None, parse_overrides(["--lr", "3e-6"])).lr == 3e-6


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--iteration", "5"], "'iteration'"),  # typo names the key
        (["--iterations", "2.5"], "iterations"),
        (["--iterations", "many"], "iterations"),
        (["--amp", "maybe"], "amp"),
        (["--mode", "c"], "mode"),
        (["--size", "[1, 2, 3]"], "size"),
        (["--lr"], "--lr needs a value"),
        (["lr", "1"], "expected --key value"),
    ],
)
def test_bad_overrides_name_the_field(args, needle):
    with pytest.raises(InputError, match=needle):
        load_config(Cfg, None, parse_overrides(args))


def test_bad_yaml_key_names_file_and_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.1\nbogus: 3\n")
    with pytest.raises(InputError, match=r"c\.yaml: unknown config key 'bogus'"):
        load_config(Cfg, f)
    with pytest.raises(InputError, match="not found"):
        load_config(Cfg, tmp_path / "missing.yaml")
    f.write_text("- a list\n")
    with pytest.raises(InputError, match="mapping"):
        load_config(Cfg, f)


# ---------------------------------------------------------------------------------------------------------------
# The demo's config: its own settings plus one section per stage (hias_nb.demo)

# What each stage of the default demo receives (the values `hias-nb demo` has used since the 2026-12-03 results).
DEMO_STAGES = {
    "source_only": {"iterations": 300, "batch_size": 16, "lr": 2e-3, "head_lr_mult": 1.0, "warmup": 30,
                    "split": "source_train", "init_checkpoint": None, "seed": 0, "strong_prob": 0.5},
    "warmup/train": {"iterations": 300, "batch_size": 16, "lr": 2e-4, "adv_weight": 0.15, "d_ndf": 32,
                     "init_checkpoint": "runs/demo/source_only/model_final.pt", "seed": 0, "strong_prob": 0.5},
    "round_1/pseudo": {"policy": "ias", "alpha": 0.5, "batch_size": 2, "split": "target_train",
                       "checkpoint": "runs/demo/warmup/model_final.pt", "seed": 1},
    "round_1/train": {"iterations": 120, "batch_size": 16, "lr": 2e-4, "head_lr_mult": 1.0, "ema_gamma": 0.99,
                      "hpla": True, "hpla_mode": "reference", "strong": True, "lambda_kld": 0.1, "lambda_ent": 1.0,
                      "lambda_cst": 0.5, "freeze_bn": "affine", "pseudo_dir": "runs/demo/round_1/pseudo",
                      "init_checkpoint": "runs/demo/warmup/model_final.pt", "split": "target_train", "seed": 1},
    "oracle": {"iterations": 300, "batch_size": 16, "lr": 2e-3, "split": "target_train", "seed": 0, "strong_prob": 0.0},
}  # fmt: skip


def test_default_demo_gives_each_stage_the_toytown_values():
    from hias_nb.demo import demo_config, stage_configs

    plan = stage_configs(demo_config(), "cpu")
    assert list(plan) == ["pretrain", *DEMO_STAGES]
    # the pretraining run is cached outside the demo folder, named by version, backbone, size and a digest
    pre = plan.pop("pretrain")
    assert pre.out.startswith("data/toytown_pretrain/v2-resnet10t-64x128-") and pre.size == (64, 128)
    assert plan["source_only"].pretrained == plan["oracle"].pretrained == f"{pre.out}/backbone.pt"
    for stage, expected in DEMO_STAGES.items():
        got = config_to_dict(plan[stage])
        assert {k: got[k] for k in expected} == expected, stage
        assert got["out"] == f"runs/demo/{stage}" and got["device"] == "cpu" and got["data_root"] == "data/toytown"


def test_the_pretraining_cache_is_keyed_by_the_generator(monkeypatch):
    # a cached pretraining drawn by another generator (other constants or drawing code) must not be reused
    from hias_nb.data import toytown
    from hias_nb.demo import demo_config, pretrain_config

    before = pretrain_config(demo_config()).out
    assert pretrain_config(demo_config()).out == before  # deterministic
    monkeypatch.setattr(toytown, "DESATURATION", toytown.DESATURATION + 0.1)
    changed = pretrain_config(demo_config()).out
    assert changed != before and changed.startswith("data/toytown_pretrain/v2-resnet10t-64x128-")


def test_stage_defaults_are_the_demos():
    """One place per stage: the demo's sections are the stage configs' own defaults."""
    from hias_nb.demo import DemoConfig
    from hias_nb.pretrain import PretrainConfig
    from hias_nb.pseudo_label import PseudoLabelConfig
    from hias_nb.self_train import SelfTrainConfig
    from hias_nb.train import TrainConfig
    from hias_nb.warmup import WarmupConfig

    cfg = DemoConfig()
    assert (cfg.pretrain, cfg.source, cfg.warmup, cfg.pseudo, cfg.round) == (
        PretrainConfig(), TrainConfig(), WarmupConfig(), PseudoLabelConfig(), SelfTrainConfig()
    )  # fmt: skip


def test_quick_demo_values():
    from hias_nb.demo import demo_config, stage_configs

    cfg = demo_config(quick=True)
    assert (cfg.out, cfg.oracle, cfg.rounds, cfg.adabn_images) == ("runs/demo_quick", False, 1, 256)
    plan = stage_configs(cfg)
    assert list(plan) == ["pretrain", "source_only", "warmup/train", "round_1/pseudo", "round_1/train"]  # no oracle
    its = {k: plan[k].iterations for k in ("source_only", "warmup/train", "round_1/train")}
    assert its == {"source_only": 120, "warmup/train": 80, "round_1/train": 40}
    assert plan["round_1/train"].lr == 2e-4 and plan["round_1/pseudo"].alpha == 0.5  # the rest as in the full demo
    # command-line overrides apply on top of --quick
    assert demo_config(True, overrides={"source.iterations": 7, "oracle": True}).source.iterations == 7


def test_later_rounds_chain_teacher_and_student_and_decay_the_lr():
    from hias_nb.demo import demo_config, stage_configs

    plan = stage_configs(demo_config(overrides={"rounds": 3, "seed": 5, "out": "o"}))
    assert [plan[f"round_{k}/train"].lr for k in (1, 2, 3)] == [2e-4, 2e-4 * 0.67, 2e-4 * 0.67**2]
    assert [plan[f"round_{k}/pseudo"].seed for k in (1, 2, 3)] == [6, 7, 8]
    assert plan["round_3/pseudo"].checkpoint == "o/round_2/train/teacher_final.pt"
    assert plan["round_3/train"].init_checkpoint == "o/round_2/train/student_final.pt"
    assert plan["source_only"].seed == plan["oracle"].seed == 5


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"alhpa": 0.2}, "did you mean alpha"),
        ({"iterations": 5}, "'iterations' is ambiguous: pretrain.iterations, source.iterations, warmup.iterations"),
        ({"round.seed": 1}, "'round.seed' cannot be set"),
        ({"pseudo.checkpoint": "m.pt"}, "'pseudo.checkpoint' cannot be set"),
        ({"round.lrr": 1e-4}, "did you mean round.lr"),
        ({"stage.lr": 1e-4}, "unknown config key 'stage.lr'"),
        ({"round.lr": "fast"}, "round.lr: expected float"),
        ({"rounds": 0}, "rounds"),
        ({"round.ema_gamma": 2.0}, "round.ema_gamma"),
        ({"source.pretrained": "w.pt"}, "'source.pretrained' cannot be set"),  # the demo's pretraining sets it
        ({"pretrain.size": [32, 64]}, "'pretrain.size' cannot be set"),  # toytown's size
        ({"source.backbone": "resnet18"}, "pretrain.backbone: 'resnet10t' differs from source.backbone"),
    ],
)
def test_bad_demo_keys_name_the_key(overrides, needle):
    from hias_nb.demo import demo_config

    with pytest.raises(InputError, match=needle):
        demo_config(overrides=overrides)


def test_pretraining_can_be_switched_off_and_follows_the_settings():
    from hias_nb.demo import demo_config, stage_configs

    plan = stage_configs(demo_config(overrides={"pretrain.iterations": 0}))
    assert "pretrain" not in plan and plan["source_only"].pretrained is None and plan["oracle"].pretrained is None
    both = {"source.backbone": "resnet18", "pretrain.backbone": "resnet18"}
    a, b = (stage_configs(demo_config(overrides=o))["pretrain"].out for o in ({}, both))
    assert a != b and "-resnet18-" in b  # another setting, another cache folder
    c = stage_configs(demo_config(overrides={"device": "cpu", "out": "elsewhere", "seed": 3}))["pretrain"].out
    assert c == a  # shared by every demo folder and training seed


def test_demo_keys_bare_dotted_and_from_a_file(tmp_path):
    from hias_nb.demo import demo_config

    cfg = demo_config(overrides={"alpha": 0.2, "ema_gamma": 0.9, "d_ndf": 16, "source.lr": 1e-3, "data-root": "x"})
    assert (cfg.pseudo.alpha, cfg.round.ema_gamma, cfg.warmup.d_ndf, cfg.source.lr) == (0.2, 0.9, 16, 1e-3)
    assert cfg.data_root == "x" and cfg.round.lr == 2e-4 and cfg.warmup.lr == 2e-4  # nothing else moved
    f = tmp_path / "demo.yaml"
    f.write_text("seed: 2\nround:\n  lr: 1.0e-4\n  iterations: 60\nsource.iterations: 50\npolicy: cbst\n")
    cfg = demo_config(False, f, {"round.iterations": 70})
    assert (cfg.seed, cfg.round.lr, cfg.round.iterations, cfg.source.iterations) == (2, 1e-4, 70, 50)
    assert cfg.pseudo.policy == "cbst"
    f.write_text("round:\n  lrr: 1\n")
    with pytest.raises(InputError, match=r"demo\.yaml: unknown config key 'round\.lrr'"):
        demo_config(False, f)


def test_paper_configs_set_the_paper_values():
    """The annotated YAML files hold the paper's settings wherever the toytown defaults differ."""
    from pathlib import Path

    from hias_nb.pseudo_label import PseudoLabelConfig
    from hias_nb.self_train import SelfTrainConfig
    from hias_nb.train import TrainConfig

    configs = Path(__file__).resolve().parents[1] / "configs"
    src = load_config(TrainConfig, configs / "gta5_source.yaml")
    assert (src.iterations, src.lr, src.head_lr_mult, src.backbone) == (24936, 1e-5, 10.0, "resnet101")
    assert (src.photometric, src.strong_prob) == (0.0, 0.0)  # toytown's extra augmentations are not the paper's
    assert src.skip is False  # nor its stride-4 skip branch: DeepLab-v2 as published
    pl = load_config(PseudoLabelConfig, configs / "hiast_gta5_pseudo1.yaml")
    assert (pl.alpha, pl.beta, pl.gamma, pl.policy) == (0.5, 0.9, 8.0, "ias")
    st = load_config(SelfTrainConfig, configs / "hiast_gta5_round1.yaml")
    assert (st.iterations, st.lr, st.head_lr_mult, st.ema_gamma, st.batch_size) == (8000, 3e-6, 10.0, 0.999, 6)


def test_claim_config_refuses_another_run_and_allows_free_keys(tmp_path):
    from hias_nb.runs import claim_config

    path = tmp_path / "config.yaml"
    claim_config(path, {"rounds": 1, "round": {"lr": 1e-4, "iterations": 5}}, ("rounds",))
    claim_config(path, {"rounds": 2, "round": {"lr": 1e-4, "iterations": 5}}, ("rounds",))  # a free key
    assert yaml.safe_load(path.read_text())["rounds"] == 2
    before = path.read_text()
    with pytest.raises(InputError, match=r"round\.lr: 0\.0001 there, 0\.001 now"):
        claim_config(path, {"rounds": 2, "round": {"lr": 1e-3, "iterations": 5}}, ("rounds",))
    assert path.read_text() == before  # nothing written


def test_demo_refuses_a_folder_of_another_demo_before_any_work(tmp_path):
    from hias_nb.demo import demo_config, resolved_config, run_demo
    from hias_nb.runs import claim_config

    out = tmp_path / "demo"
    out.mkdir()
    first = demo_config(True, overrides={"out": str(out), "data_root": str(tmp_path / "toytown")})
    claim_config(out / "config.yaml", resolved_config(first))
    before = (out / "config.yaml").read_text()
    with pytest.raises(InputError, match=r"pseudo\.alpha"):
        run_demo(quick=True, out=str(out), data_root=str(tmp_path / "toytown"), alpha=0.3)
    assert (out / "config.yaml").read_text() == before
    assert not (tmp_path / "toytown").exists() and sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_config_files_that_are_not_yaml_mappings_exit_with_the_file_named(tmp_path):
    from hias_nb.train import TrainConfig

    dup = tmp_path / "dup.yaml"
    dup.write_text("lr: 0.1\niterations: 5\nlr: 0.2\n")
    with pytest.raises(InputError, match=r"dup\.yaml: not valid YAML \(key 'lr' given twice.*line 3"):
        load_config(TrainConfig, dup)
    binary = tmp_path / "model.pt"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(InputError, match=r"model\.pt: cannot be read as a YAML text file"):
        load_config(TrainConfig, binary)
    with pytest.raises(InputError, match="cannot be read as a YAML text file"):
        load_config(TrainConfig, tmp_path)  # a folder
    nested = tmp_path / "nested.yaml"
    nested.write_text("round:\n  lr: 1\nround:\n  lr: 2\n")
    with pytest.raises(InputError, match="given twice"):
        load_config(TrainConfig, nested)


def test_shipped_configs_load_and_the_gta5_crops_are_not_clamped():
    """Every file in configs/ loads into its stage config; the GTA5 source crops (341–950 rows) fit the resize, so
    they zoom 512/950 ≈ 0.54× to 512/341 ≈ 1.50× as the reference's; the old 720-row resize is refused by name."""
    from pathlib import Path

    from hias_nb.pseudo_label import PseudoLabelConfig
    from hias_nb.self_train import SelfTrainConfig
    from hias_nb.train import TrainConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    kinds = {"gta5_source.yaml": TrainConfig, "hiast_gta5_pseudo1.yaml": PseudoLabelConfig,
             "hiast_gta5_round1.yaml": SelfTrainConfig}  # fmt: skip
    assert {p.name for p in root.glob("*.yaml")} <= set(kinds)
    for name, cls in kinds.items():
        load_config(cls, root / name).validate()
    src = load_config(TrainConfig, root / "gta5_source.yaml")
    lo, hi = src.crop_height_range
    assert src.crop_size[0] / hi == pytest.approx(0.54, abs=0.01) and src.crop_size[0] / lo == pytest.approx(
        1.50, abs=0.01
    )
    assert hi <= src.resize[0] and hi * src.crop_ratio <= src.resize[1]
    with pytest.raises(InputError, match="crop_height_range: crops up to 950×1900 px do not fit .* 720×1280"):
        load_config(TrainConfig, root / "gta5_source.yaml", {"resize": [720, 1280]}).validate()
