"""The notebook series (issue 4): committed clean, and every notebook runs headless in QUICK mode.

The fast tests check what is committed: each notebook in ``notebooks/`` has a code cell tagged
``parameters`` holding ``QUICK = False`` and carries no outputs, execution counts or saved widget state. The
slow tests execute each notebook with papermill (``-p QUICK True -p RUN_DIR ...``, working directory
``notebooks/``) against one cached, deliberately tiny demo run, ``runs/tests/demo_quick``: the tests check that
the notebooks run, not the numbers, and a real quick demo costs minutes on a 2-core CPU (the user's own
``runs/demo_quick`` is left alone).
Notebooks 02–05 also run with RUN_DIR set to a `hias-nb run gta5_to_cityscapes --smoke` folder (tiny datasets in
the real layouts, ``runs/tests/smoke_gta5_to_cityscapes``, made once), and the checkpoints they re-evaluate must
score what that run's report says. Executed copies go to a temporary folder; the committed notebooks are never
touched.
"""

from __future__ import annotations

import re
import shutil
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
SMOKE_RUN = REPO / "runs" / "tests" / "smoke_gta5_to_cityscapes"
# The notebooks that open any run folder (a toytown demo or a `hias-nb run` experiment); 01 and 06 are toytown's.
RUN_NOTEBOOKS = [p for p in NOTEBOOKS if p.name[:2] in ("02", "03", "04", "05")]

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


# A measured-looking number in prose: a share, an mIoU, points, a time. Results belong in code output (the run in
# front of the reader fills them in); definitions may state numbers ("each row sums to 100 %").
MEASURED = re.compile(r"\b\d+(?:\.\d+)?\s*(?:%|mIoU|points?\b|pp\b|ms\b|s\b)")
DEFINITIONS = ("sums to 100 %",)


@notebook_params
def test_notebook_prose_types_no_measured_number(path: Path):
    nb = nbformat.read(path, as_version=4)
    typed = [
        (i, m.group(0))
        for i, c in enumerate(nb.cells)
        if c.cell_type == "markdown"
        for m in MEASURED.finditer(c.source)
        if not any(d in c.source[max(0, m.start() - 20) : m.end() + 5] for d in DEFINITIONS)
    ]
    assert not typed, f"{path.name}: numbers typed in markdown cells (cell, text): {typed}"


@pytest.mark.slow
@pytest.mark.notebooks
@notebook_params
def test_notebook_executes_quick(path: Path, quick_run: Path, tmp_path: Path):
    _execute(path, quick_run, tmp_path)


def ensure_smoke_run() -> Path:
    """A `hias-nb run gta5_to_cityscapes --smoke` on tiny GTA5/Cityscapes trees in their real layouts and sizes
    (made once under runs/tests/, then reused): what notebooks 2–5 show for a paper-pipeline run."""
    import realistic_trees as trees

    from hias_nb.cli import main

    layouts = SMOKE_RUN.parent / "smoke_layouts"
    if not (SMOKE_RUN / "report.json").exists() or not layouts.is_dir():  # both made together, or both again
        shutil.rmtree(SMOKE_RUN, ignore_errors=True)
        shutil.rmtree(layouts, ignore_errors=True)
        gta5, cityscapes = trees.gta5(layouts / "GTA5"), trees.cityscapes(layouts / "cityscapes")
        args = ["run", str(REPO / "configs" / "experiments" / "gta5_to_cityscapes.yaml"), "--smoke", "--source_root",
                str(gta5), "--target_root", str(cityscapes), "--out", str(SMOKE_RUN), "--device", "cpu"]  # fmt: skip
        assert main(args) == 0
    return SMOKE_RUN


@pytest.fixture(scope="session")
def smoke_run() -> Path:
    return ensure_smoke_run()


@pytest.mark.slow
@pytest.mark.notebooks
@pytest.mark.parametrize("path", RUN_NOTEBOOKS, ids=_ids(RUN_NOTEBOOKS))
def test_notebook_executes_on_a_paper_pipeline_run(path: Path, smoke_run: Path, tmp_path: Path):
    _execute(path, smoke_run, tmp_path)


@pytest.mark.slow
@pytest.mark.notebooks
def test_a_paper_runs_checkpoints_rescored_as_the_notebooks_do_match_its_report(smoke_run: Path):
    """Notebooks 4 and 5 re-evaluate a run's checkpoints; with the run's own evaluation settings
    (``RunTarget.eval_settings``) they must give the numbers its report.json holds."""
    import json

    from hias_nb import analysis, widgets

    report = json.loads((smoke_run / "report.json").read_text())
    tgt = widgets.run_target(report)
    assert tgt.dataset == "cityscapes" and tgt.eval_size == (64, 128)
    checkpoints = analysis.stage_checkpoints(smoke_run)
    assert len(checkpoints) == 8  # source-only, warm-up, three rounds' teachers and students
    picked = {k: checkpoints[k] for k in ("source_only", "warmup", "round_3_student")}  # each kind once: 2 cores
    again = analysis.checkpoint_report(picked, tgt.val(), "cpu", **tgt.eval_settings)
    ours = {s["name"]: s["miou"] for s in again["stages"]}
    theirs = {s["name"]: s["miou"] for s in report["stages"] if s["name"] in picked}
    assert len(theirs) == 3 and ours == pytest.approx(theirs, abs=1e-6)


def _execute(path: Path, run_dir: Path, tmp_path: Path) -> None:
    import papermill

    committed = path.read_bytes()
    out = tmp_path / path.name
    t0 = time.perf_counter()
    # papermill raises PapermillExecutionError with the failing cell's traceback. The kernel's connection file,
    # IPython's profile and matplotlib's cache go to the test's folder, not the user's home.
    with pytest.MonkeyPatch.context() as env:
        for var in ("JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR"):
            env.setenv(var, str(tmp_path / var.lower()))
        papermill.execute_notebook(
            str(path),
            str(out),
            parameters={"QUICK": True, "RUN_DIR": str(run_dir)},
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
