"""The notebook series in a real browser (issues 4 and 16): JupyterLab + Chromium driven by Playwright.

Starts ``jupyter lab`` on a free local port over a temporary copy of ``notebooks/`` (the committed notebooks
stay stripped; ``runs/demo_quick`` and ``data/toytown`` are linked beside the copy where the notebooks look
for them, and QUICK is injected as papermill would), opens each notebook, runs every cell through the Run menu
and checks that no cell shows an error or a figure's repr. Where a notebook has a widget, one control of it is
moved as a user would (02: the replay's α slider by keyboard; 03: HPLA's "draw again"; 04: a loss-term
checkbox; 05: the confusion picker's stage) and the plot must redraw; the time from the action to the new
image in the page is recorded (``artifacts/browser/latency.json``, printed; recorded, not asserted: this
machine is shared). Every Jupyter, IPython, matplotlib, npm and Chromium state directory points into the
temporary folder, and $HOME is checked unchanged afterwards. The server (and its kernels) and the browser are
stopped in the fixtures' teardown, even on failure, and no process of theirs may survive. A screenshot per
notebook lands in ``artifacts/browser/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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


# What a user writes to by accident: every entry of $HOME down to three levels (a new file changes its folder's
# time) and, whole, the folders Jupyter, IPython, matplotlib, npm and Chromium would write to.
HOME_TOOL_DIRS = (".jupyter", ".local/share/jupyter", ".ipython", ".npm", ".cache/matplotlib", ".config/chromium",
                  ".cache/chromium", ".pki", ".cache/ms-playwright")  # fmt: skip


def _home_state(home: Path) -> dict[str, int]:
    """What the test could write to `home`: the entries of its first three levels (existence only; the repository
    and pytest's temporary folders, which may live there, left out) and every file of the tool folders with its
    modification time."""
    skip = {str(REPO), os.environ.get("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())}
    state = {}
    for top, dirs, files in os.walk(home):
        dirs[:] = [d for d in dirs if os.path.join(top, d) not in skip]
        for name in dirs + files:
            state[os.path.join(top, name)] = 0
        if len(Path(top).relative_to(home).parts) >= 2:
            dirs[:] = []
    for d in HOME_TOOL_DIRS:
        for top, _dirs, files in os.walk(home / d):
            for name in files:
                with contextlib.suppress(OSError):
                    state[os.path.join(top, name)] = os.lstat(os.path.join(top, name)).st_mtime_ns
    return state


NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
LATENCY: dict[str, float] = {}  # notebook → seconds from a control's move to its new image in the page


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:

    home = Path.home()
    before = _home_state(home)
    yield from _lab(tmp_path_factory)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "latency.json").write_text(json.dumps(LATENCY, indent=1))
    after = _home_state(home)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the browser test wrote to $HOME: {changed[:10]}"


def _lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
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

# Mark the control a user would move (by kind and label) for the locators below; false when there is none.
PICK_CONTROL = """([kind, label]) => {
    const re = new RegExp(label || '.', 'i');
    const text = e => e.textContent;  // the description, wherever the widget puts it (checkbox: beside the box)
    const sel = {slider: '.widget-slider', button: 'button.widget-button', checkbox: '.widget-checkbox',
                 dropdown: '.widget-dropdown'}[kind];
    const found = [...document.querySelectorAll('.jp-Notebook ' + sel)].find(e => re.test(text(e)));
    if (found) found.setAttribute('data-test-control', '');
    return !!found;
}"""

# The image sources in the output of the code cell that holds the chosen control.
PLOT_SOURCES = """() => {
    const cell = document.querySelector('[data-test-control]').closest('.jp-CodeCell');
    return [...cell.querySelectorAll('.jp-OutputArea img')].map(i => i.src);
}"""

# Per notebook: the widget control to move (kind, label pattern); None: no widget, rendered only.
CONTROLS: dict[str, tuple[str, str] | None] = {
    "01": None,  # live training output, no control
    "02": ("slider", "α|alpha"),
    "03": ("button", "draw again"),
    "04": ("checkbox", "ce"),  # the CE term: its λ is never 0, so unticking it always changes the total
    "05": ("dropdown", "stage"),
    "06": None,
}


def _move(page: Page, kind: str) -> None:
    """One user action on the marked control."""
    control = page.locator("[data-test-control]")
    if kind == "slider":
        handle = control.locator(".noUi-handle").first
        handle.focus()
        handle.press("ArrowRight")
    elif kind == "button":
        control.click()
    elif kind == "checkbox":
        control.locator("input").click()
    else:
        select = control.locator("select")
        current = select.input_value()
        other = next(o for o in select.locator("option").all_inner_texts() if o != current)
        select.select_option(label=other)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_renders_and_its_widget_redraws(page: Page, lab: LabServer, path: Path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"notebook{path.name[:2]}.png"
    try:
        # A workspace of its own, reset: only this notebook open (the server remembers the tabs of earlier tests).
        page.goto(f"{lab.url}/lab/workspaces/nb{path.name[:2]}/tree/{path.name}?reset&token={lab.token}")
        # ENVIRONMENT.md: the kernel's own state, not its idle icon, says when Run All will be honoured.
        page.wait_for_function(KERNEL_READY, timeout=90_000)

        page.locator(".lm-MenuBar-item", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        page.wait_for_function(ALL_CELLS_RAN, timeout=300_000, polling=500)

        errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]')
        assert errors.count() == 0, f"error outputs in {path.name}:\n" + "\n".join(errors.all_inner_texts())
        figure_reprs = page.locator(".jp-OutputArea-output", has_text=re.compile(r"^<Figure size"))
        assert figure_reprs.count() == 0, f"{path.name}: a figure's repr is shown instead of the image"
        if path.name[:2] != "06":  # 06 shows tables and text (manifests, a checkpoint's keys), no figure
            assert page.locator(".jp-OutputArea img").count() > 0, f"{path.name}: no figure rendered"
        control = CONTROLS.get(path.name[:2])
        if control is None:
            page.screenshot(path=str(shot), full_page=False)
            return
        kind, label = control
        try:  # widgets render after their cell's output arrives: wait for this one, not just any
            page.wait_for_function(PICK_CONTROL, arg=[kind, label], timeout=30_000)
        except Exception as e:
            raise AssertionError(f"{path.name}: no {kind} labelled /{label}/") from e
        marked = page.locator("[data-test-control]")
        marked.scroll_into_view_if_needed()
        page.wait_for_function(f"() => ({PLOT_SOURCES})().length > 0", timeout=30_000)
        page.wait_for_function(KERNEL_READY, timeout=30_000)
        before = page.evaluate(PLOT_SOURCES)

        t0 = time.perf_counter()
        _move(page, kind)
        page.wait_for_function(
            f"before => JSON.stringify(({PLOT_SOURCES})()) !== JSON.stringify(before)", arg=before, timeout=30_000
        )
        LATENCY[path.name] = round(time.perf_counter() - t0, 3)
        print(f"{path.name}: {kind} moved, new image after {1000 * LATENCY[path.name]:.0f} ms")
        after = page.evaluate(PLOT_SOURCES)
        assert after and after != before, "the plot did not redraw"
        page.wait_for_function(KERNEL_READY, timeout=30_000)  # the action has been drawn completely
        page.wait_for_timeout(300)
        marked.evaluate("s => s.scrollIntoView({block: 'start'})")  # the control on top, its plot below
        page.screenshot(path=str(shot))
    except BaseException:
        page.screenshot(path=str(ARTIFACTS / f"{shot.stem}_failure.png"))
        raise
