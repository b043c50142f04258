"""Notebook 02 in a real browser (issue 4): JupyterLab + Chromium driven by Playwright.

Starts ``jupyter lab`` on a free local port over a temporary copy of ``notebooks/`` (the committed notebooks
stay stripped; ``runs/demo_quick`` and ``data/toytown`` are linked beside the copy where the notebooks look
for them, and QUICK is injected as papermill would), opens notebook 02, runs every cell through the Run menu,
moves a slider of the replay widget with the keyboard and checks that the plot redrew. Every Jupyter, IPython,
matplotlib and Chromium state directory points into the temporary folder. The server (and its kernels) and the
browser are stopped in the fixtures' teardown, even on failure, and no process of theirs may survive.
A screenshot lands in ``artifacts/browser/notebook02.png``.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
ARTIFACTS = REPO / "artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
# ENVIRONMENT.md: the flags that work for Debian's Chromium in a container.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STATE_DIRS = {
    "JUPYTER_CONFIG_DIR": "jupyter_config",
    "JUPYTER_DATA_DIR": "jupyter_data",
    "JUPYTER_RUNTIME_DIR": "jupyter_runtime",
    "IPYTHONDIR": "ipython",
    "MPLCONFIGDIR": "matplotlib",
    "npm_config_cache": "npm_cache",  # jupyter-lsp runs npm to look for language servers: its _logs go here
    "XDG_CONFIG_HOME": "xdg_config",
    "XDG_CACHE_HOME": "xdg_cache",
}

if CHROMIUM is None:
    pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run does it)", allow_module_level=True)
try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:
    pytest.skip("the playwright Python package is missing (it is in the `test` extra)", allow_module_level=True)


@dataclass
class LabServer:
    url: str
    token: str
    root: Path  # the notebook directory the server serves
    tmp: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def _pids_mentioning(marker: str) -> list[int]:
    """Live processes whose command line contains `marker` (a path unique to this test's temporary folder)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmdline = _cmdline(int(d.name))
            state = next(line for line in (d / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if marker in cmdline and "zombie" not in state:
            pids.append(int(d.name))
    return pids


def _stop_server(proc: subprocess.Popen, url: str, token: str, timeout: float = 20.0) -> None:
    """Ask the server to shut down (it stops its kernels), then SIGKILL what is left of its process group."""
    if proc.poll() is None:
        request = urllib.request.Request(
            f"{url}/api/shutdown", method="POST", headers={"Authorization": f"token {token}"}
        )
        try:
            urllib.request.urlopen(request, timeout=5).close()
            proc.wait(timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=timeout)


def _kill_leftovers(marker: str) -> list[str]:
    """SIGKILL the processes that carry our own temporary path (kernels run in their own sessions).

    Returns their command lines."""
    left = _pids_mentioning(marker)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return [_cmdline(pid) for pid in left]


def _prepare_tree(tmp: Path, quick_run: Path) -> Path:
    """A copy of notebooks/ with QUICK injected; the cached run and data linked where `../` points."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    root = tmp / "notebooks"
    shutil.copytree(NOTEBOOK_DIR, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    for path in root.glob("*.ipynb"):
        nb = parameterize_notebook(load_notebook_node(str(path)), {"QUICK": True})
        nbformat.write(nb, path)
    (tmp / "runs").mkdir()
    (tmp / "runs" / quick_run.name).symlink_to(quick_run, target_is_directory=True)
    (tmp / "data").mkdir()
    (tmp / "data" / "toytown").symlink_to(REPO / "data" / "toytown", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def notebook02() -> Path:
    found = sorted(NOTEBOOK_DIR.glob("02_*.ipynb"))
    if not found:
        pytest.skip("notebooks/02_*.ipynb does not exist yet")
    return found[0]


@pytest.fixture(scope="module")
def lab(notebook02: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    from test_notebooks import ensure_quick_run

    tmp = tmp_path_factory.mktemp("lab")
    root = _prepare_tree(tmp, ensure_quick_run())
    env = dict(os.environ)
    for var, name in STATE_DIRS.items():
        (tmp / name).mkdir()
        env[var] = str(tmp / name)
    env.pop("JUPYTER_PATH", None)
    # No "official Jupyter news?" toast (and no fetch of it) over the notebook.
    settings = tmp / "jupyter_config" / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    token, port = secrets.token_hex(16), _free_port()
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        "--no-browser",
        "--allow-root",
        f"--ServerApp.token={token}",
        "--LabApp.expose_app_in_browser=True",
        f"--notebook-dir={root}",
    ]
    log = open(tmp / "jupyter.log", "w")  # noqa: SIM115 (closed in the finally below)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{(tmp / 'jupyter.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not answer in 90 s:\n{(tmp / 'jupyter.log').read_text()}")
            time.sleep(0.3)
        yield LabServer(url=url, token=token, root=root, tmp=tmp)
    finally:
        _stop_server(proc, url, token)
        log.close()
        left = _kill_leftovers(str(tmp))
        assert not left, f"processes of the test's jupyter server survived its shutdown: {left}"


@pytest.fixture
def page(lab: LabServer) -> Iterator[Page]:
    profile = lab.tmp / "chromium_profile"
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000},
            env={**os.environ, "HOME": str(lab.tmp), "XDG_CONFIG_HOME": str(lab.tmp / "xdg_config")},
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()
    left = _kill_leftovers(str(profile))
    assert not left, f"Chromium processes survived: {left}"


KERNEL_READY = """() => {
    const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
    return !!k && k.connectionStatus === 'connected' && k.status === 'idle';
}"""

# Every code cell with source has run: no "[*]" (running/queued) and a number in its prompt.
ALL_CELLS_RAN = """() => {
    const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
    const cells = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')];
    const ran = cells.every(c => /\\[\\d+\\]/.test(c.querySelector('.jp-InputPrompt').textContent)
        || c.querySelector('.jp-InputArea-editor').textContent.trim() === '');
    return k.status === 'idle' && ran;
}"""

# Mark the replay widget's α slider (by its label; else the first slider) for the locators below.
PICK_SLIDER = """() => {
    const sliders = [...document.querySelectorAll('.jp-Notebook .widget-slider')];
    const s = sliders.find(e => /α|alpha/i.test(e.querySelector('.widget-label').textContent)) || sliders[0];
    if (s) s.setAttribute('data-test-slider', '');
    return !!s;
}"""

# The image sources in the output of the code cell that holds the chosen slider.
PLOT_SOURCES = """() => {
    const cell = document.querySelector('[data-test-slider]').closest('.jp-CodeCell');
    return [...cell.querySelectorAll('.jp-OutputArea img')].map(i => i.src);
}"""


def test_notebook02_replay_widget_redraws(page: Page, lab: LabServer, notebook02: Path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        page.goto(f"{lab.url}/lab/tree/{notebook02.name}?token={lab.token}")
        # ENVIRONMENT.md: the kernel's own state, not its idle icon, says when Run All will be honoured.
        page.wait_for_function(KERNEL_READY, timeout=90_000)

        page.locator(".lm-MenuBar-item", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        page.wait_for_function(ALL_CELLS_RAN, timeout=240_000, polling=500)

        errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]')
        assert errors.count() == 0, f"error outputs in {notebook02.name}:\n" + "\n".join(errors.all_inner_texts())
        figure_reprs = page.locator(".jp-OutputArea-output", has_text=re.compile(r"^<Figure size"))
        assert figure_reprs.count() == 0, f"{notebook02.name}: a figure's repr is shown instead of the image"
        page.locator(".jp-Notebook .jupyter-widgets.widget-slider").first.wait_for(state="visible", timeout=30_000)
        assert page.evaluate(PICK_SLIDER)
        slider = page.locator("[data-test-slider]")
        slider.scroll_into_view_if_needed()
        page.wait_for_function(f"() => ({PLOT_SOURCES})().length > 0", timeout=30_000)
        before = page.evaluate(PLOT_SOURCES)
        readout = slider.locator(".widget-readout")
        value_before = readout.inner_text()

        handle = slider.locator(".noUi-handle").first
        handle.focus()
        for _ in range(3):
            handle.press("ArrowRight")
        page.wait_for_function(
            f"before => JSON.stringify(({PLOT_SOURCES})()) !== JSON.stringify(before)",
            arg=before,
            timeout=30_000,
        )
        after = page.evaluate(PLOT_SOURCES)
        assert readout.inner_text() != value_before, "the slider did not move"
        assert after and after != before, "the plot did not redraw"
        page.wait_for_function(KERNEL_READY, timeout=30_000)  # the last key press has been drawn too
        page.wait_for_timeout(300)
        slider.evaluate("s => s.scrollIntoView({block: 'start'})")  # the slider on top, its plot below
        page.screenshot(path=str(ARTIFACTS / "notebook02.png"))
    except BaseException:
        page.screenshot(path=str(ARTIFACTS / "notebook02_failure.png"))
        raise
