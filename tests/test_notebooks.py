"""The notebook series (issue 4): committed clean, and every notebook runs headless in QUICK mode.

The fast tests check what is committed: each notebook in ``notebooks/`` has a code cell tagged
``parameters`` holding ``QUICK = False`` and carries no outputs, execution counts or saved widget state. The
slow tests execute each notebook with papermill (``-p QUICK True -p RUN_DIR ...``, working directory
``notebooks/``) against one cached, deliberately tiny demo run, ``runs/tests/demo_quick``: the tests check that
the notebooks run, not the numbers, and a real quick demo costs minutes on a 2-core CPU (the user's own
``runs/demo_quick`` is left alone).
Executed copies go to a temporary folder; the committed notebooks are never touched.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
QUICK_RUN = REPO / "runs" / "tests" / "demo_quick"  # named like the notebooks' QUICK default (test_browser links it)
# The quick demo with every training stage cut to a few iterations (same stages, files and data).
TINY = {"source.iterations": 40, "warmup.iterations": 10, "round.iterations": 20, "pretrain.iterations": 20,
        "pretrain.images": 64}  # fmt: skip
TOYTOWN = REPO / "data" / "toytown"
PRETRAIN = REPO / "runs" / "tests" / "pretrain"  # the tiny pretraining, apart from the demo's cache

# A notebook cell may take a while on 2 shared cores (training a few iterations, building histograms).
CELL_TIMEOUT_S = 300


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


notebook_params = pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))


def ensure_quick_run() -> Path:
    """The one cached tiny demo run all notebooks share (created once, then reused)."""
    from hias_nb.demo import run_demo

    if not (QUICK_RUN / "report.json").exists():
        run_demo(quick=True, out=str(QUICK_RUN), data_root=str(TOYTOWN), pretrain_root=str(PRETRAIN), **TINY)
    return QUICK_RUN


@pytest.fixture(scope="session")
def quick_run() -> Path:
    return ensure_quick_run()


def test_notebooks_exist():
    if not NOTEBOOK_DIR.is_dir():
        pytest.skip("notebooks/ does not exist yet")
    assert NOTEBOOKS, f"{NOTEBOOK_DIR} holds no .ipynb file"
    assert all(re.match(r"\d\d_", p.name) for p in NOTEBOOKS), _ids(NOTEBOOKS)


@notebook_params
def test_notebook_has_parameters_cell(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} code cells tagged 'parameters' (want exactly one)"
    assert re.search(r"^QUICK\s*=\s*False\b", tagged[0].source, re.MULTILINE), (
        f"{path.name}: the parameters cell does not set QUICK = False:\n{tagged[0].source}"
    )


@notebook_params
def test_notebook_committed_without_outputs(path: Path):
    """Cheap guard: outputs, execution counts and saved widget state must be stripped before committing."""
    nb = nbformat.read(path, as_version=4)
    dirty = [
        i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; strip them before committing"
    assert "widgets" not in nb.metadata, f"{path.name}: saved widget state in the notebook metadata"


@pytest.mark.slow
@pytest.mark.notebooks
@notebook_params
def test_notebook_executes_quick(path: Path, quick_run: Path, tmp_path: Path):
    import papermill

    committed = path.read_bytes()
    out = tmp_path / path.name
    t0 = time.perf_counter()
    # papermill raises PapermillExecutionError with the failing cell's traceback.
    papermill.execute_notebook(
        str(path),
        str(out),
        parameters={"QUICK": True, "RUN_DIR": str(quick_run)},
        cwd=str(NOTEBOOK_DIR),
        kernel_name="python3",
        execution_timeout=CELL_TIMEOUT_S,
        progress_bar=False,
    )
    print(f"{path.name}: executed in {time.perf_counter() - t0:.1f} s")
    executed = nbformat.read(out, as_version=4)
    assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code"), f"{path.name}: no output at all"
    unrendered = [
        i
        for i, c in enumerate(executed.cells)
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if str(o.get("data", {}).get("text/plain", "")).startswith("<Figure size") and "image/png" not in o.data
    ]
    assert not unrendered, f"{path.name}: cells {unrendered} show a figure's repr instead of the image"
    assert path.read_bytes() == committed, f"{path.name}: the committed notebook changed"
