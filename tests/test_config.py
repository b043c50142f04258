from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

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
