"""The set-up descriptions agree with each other: environment.yml lists pyproject's dependencies."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAME = {"torch": "pytorch", "matplotlib": "matplotlib-base"}


def _name(spec: str) -> str:
    return re.split(r"[<>=!~ \[;]", spec, maxsplit=1)[0].strip().lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {_name(d) for d in env["dependencies"] if isinstance(d, str)}
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    wanted = {CONDA_NAME.get(_name(d), _name(d)) for d in project["dependencies"]}
    assert wanted <= conda, f"missing from environment.yml: {sorted(wanted - conda)}"
    assert "python" in conda and "pip" in conda
    assert any(p.startswith("-e .") for p in pip), "the package itself comes from the pip section"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in readme.split("\n## ")[0]
    assert "make demo" in readme.split("\n## ")[0]


def test_console_script_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["hias-nb"] == "hias_nb.cli:main"


def test_shipped_configs_load():
    from hias_nb.config import load_config
    from hias_nb.pseudo_label import PseudoLabelConfig
    from hias_nb.self_train import SelfTrainConfig
    from hias_nb.train import TrainConfig

    kinds = {"source": TrainConfig, "round": SelfTrainConfig, "pseudo": PseudoLabelConfig}
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files
    for f in files:
        cls = next(c for k, c in kinds.items() if k in f.stem)
        load_config(cls, f)  # every key known, every type right
