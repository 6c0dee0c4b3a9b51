"""A researcher's session, in a real browser: JupyterLab, Run All, move a slider, press Run.

For each study notebook this test starts JupyterLab from the project's environment (loopback
only, random port and token, throw-away Jupyter dirs, quick profile, an empty result cache,
a copy of ``notebooks/`` as its root so no checkpoints land in the repository), drives Debian's
Chromium headless with Playwright, runs every cell from the Run menu and then uses the
notebook's :class:`fa_study.widgets.ControlPanel` the way a reader would:

1. the panel rendered as widgets (Run button and sliders visible, no "Error displaying widget");
2. Run with the defaults: a figure (``<img>``) and the results table appear in the panel;
3. the ``epochs`` slider is changed through its editable readout, Run is pressed again:
   a new figure replaces the old one and the table's numbers change.

A screenshot of the panel goes to ``test-artifacts/`` (git-ignored). Chromium comes from
Debian (``tools/install_chromium.sh``); Playwright never downloads a browser. Without
``/usr/bin/chromium`` the tests skip, except in CI (``CI=true``), where that is a failure.

The server and the browser are shut down by fixture finalizers, also when a test fails.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path(os.environ.get("FA_STUDY_CHROMIUM", "/usr/bin/chromium"))
# Without the background-networking flags Chromium keeps dialling Google's hosts, which this
# closed network refuses; a fresh user-data-dir keeps every run independent of the last.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TEST_BUDGET_S = 170.0  # each test must finish in under 3 minutes, setup included
SERVER_START_S = 60.0
SLIDER = "epochs"  # every study exposes it, and fewer epochs make the rerun cheap

NOTEBOOKS = [
    pytest.param(name, id=name.split("_")[0], marks=pytest.mark.skipif(
        not (NOTEBOOK_DIR / name).exists(),
        reason=f"notebooks/{name} does not exist yet; the test covers it once it is committed"))
    for name in ("01_reciprocal_alignment_mnist.ipynb", "02_fa_dfa_audit_cifar.ipynb")
]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _missing(what: str) -> None:
    """Skip on a researcher's machine; fail in CI, where the browser tests must run."""
    if _in_ci():
        pytest.fail(f"{what} (CI=true: the browser tests must run; see tools/install_chromium.sh)",
                    pytrace=False)
    pytest.skip(what)


# --------------------------------------------------------------------------- JupyterLab server
@dataclass
class LabServer:
    url: str  # http://127.0.0.1:<port>
    token: str
    root: Path  # the server's root directory (a copy of notebooks/)
    log: Path
    proc: subprocess.Popen = field(repr=False)

    def api(self, method: str, path: str, timeout: float = 10.0):
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no server log)"

    def shutdown_kernels_of(self, path: str) -> None:
        """Shut down the kernel sessions of notebook ``path`` (frees the CPU for the next test)."""
        try:
            for s in self.api("GET", "/api/sessions"):
                if s.get("path") == path:
                    self.api("DELETE", f"/api/sessions/{s['id']}")
        except (OSError, urllib.error.URLError, ValueError):
            pass  # the server is going away anyway; its finalizer kills what is left


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lab_env(base: Path) -> dict[str, str]:
    """The server's (and so the kernel's) environment: the project's venv first on PATH, every
    Jupyter/IPython directory inside ``base``, the quick profile and an empty result cache."""
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)  # tests/conftest.py sets Agg; a kernel in Lab draws inline
    for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR",
                "JUPYTERLAB_SETTINGS_DIR", "JUPYTERLAB_WORKSPACES_DIR", "IPYTHONDIR"):
        env[var] = str(base / var.lower())
    env.pop("JUPYTER_PATH", None)
    env.pop("JUPYTER_CONFIG_PATH", None)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FA_STUDY_PROFILE"] = "quick"
    env["FA_STUDY_CACHE"] = str(base / "fa_study_cache")
    # The kernel runs in the copied folder, so a relative data dir would be empty there.
    env["FA_STUDY_DATA"] = str(Path(os.environ.get("FA_STUDY_DATA") or ROOT / "data").resolve())
    env.setdefault("FA_STUDY_OFFLINE", "1")  # no download attempts from inside a UI test
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _write_lab_settings(settings_dir: Path) -> None:
    """No news or update checks (they would reach for the network and pop notifications over
    the notebook)."""
    target = settings_dir / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))


def _stop(proc: subprocess.Popen, server: LabServer | None) -> None:
    """Ask the server to shut down (it stops its kernels), then end its process group."""
    if proc.poll() is None and server is not None:
        try:
            server.api("POST", "/api/shutdown", timeout=5)
            proc.wait(timeout=15)
        except (OSError, urllib.error.URLError, subprocess.TimeoutExpired, ValueError):
            pass
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            # The server's own group. Its kernels run in sessions of their own; the server
            # stops them on /api/shutdown or SIGTERM, and an orphaned ipykernel exits by itself.
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=5)


@pytest.fixture(scope="session")
def lab_server(tmp_path_factory) -> LabServer:
    """JupyterLab on 127.0.0.1:<free port> with a random token, serving a copy of notebooks/."""
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        _missing("jupyterlab is not installed in this environment (pip install -e '.[notebooks]')")
    base = tmp_path_factory.mktemp("lab")
    root = base / "notebooks"
    shutil.copytree(NOTEBOOK_DIR, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    env = _lab_env(base)
    _write_lab_settings(Path(env["JUPYTERLAB_SETTINGS_DIR"]))
    token = uuid.uuid4().hex
    last_error = ""
    for attempt in range(3):  # a free port can be taken between _free_port() and the bind
        port = _free_port()
        log = base / f"jupyterlab-{attempt}.log"
        cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
               "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={root}", "--ServerApp.terminals_enabled=False",
               "--LabApp.news_url=None",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--LabApp.extension_manager=readonly",
               # window.jupyterapp: the test reads kernel and cell state from JupyterLab's model
               "--LabApp.expose_app_in_browser=True"]
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(cmd, cwd=base, env=env, stdin=subprocess.DEVNULL,
                                    stdout=log_file, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        server = LabServer(f"http://127.0.0.1:{port}", token, root, log, proc)
        deadline = time.monotonic() + SERVER_START_S
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    server.api("GET", "/api/status", timeout=2)
                    break
                except (OSError, urllib.error.URLError, ValueError):
                    time.sleep(0.5)
            else:
                last_error = (f"JupyterLab did not answer on {server.url} within "
                              f"{SERVER_START_S:.0f} s (exit code {proc.poll()}):\n"
                              f"{server.log_tail()}")
                _stop(proc, None)
                continue
        except BaseException:
            _stop(proc, None)
            raise
        try:
            yield server
        finally:
            _stop(proc, server)
        return
    pytest.fail(last_error, pytrace=False)


# --------------------------------------------------------------------------- Chromium
@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium and the playwright package, or a skip (a failure in CI). Requested
    first by the test, so that a missing browser skips before a server is started."""
    if not CHROMIUM.exists():
        _missing(f"{CHROMIUM} is missing: run tools/install_chromium.sh "
                 "(Debian's chromium; Playwright's own browser download is not used)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("the Python package playwright is not installed in this environment "
                 "(pip install -e '.[browser]')")
    return CHROMIUM


@pytest.fixture(scope="session")
def browser_context(chromium, tmp_path_factory):
    """Debian's headless Chromium driven by Playwright, with a fresh profile."""
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    pw = sync_playwright().start()
    try:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000}, timeout=60_000)
        try:
            yield context
        finally:
            context.close()
    finally:
        pw.stop()


@dataclass
class Console:
    messages: list[str] = field(default_factory=list)

    def errors(self) -> list[str]:
        return [m for m in self.messages if m.startswith(("error", "pageerror"))]

    def __str__(self) -> str:
        tail = self.messages[-30:]
        return "browser console (last 30):\n  " + "\n  ".join(tail) if tail else "browser console: empty"


@pytest.fixture
def page(browser_context):
    pg = browser_context.new_page()
    pg.set_default_timeout(30_000)
    console = Console()
    pg.on("console", lambda m: console.messages.append(f"{m.type}: {m.text[:500]}"))
    pg.on("pageerror", lambda e: console.messages.append(f"pageerror: {str(e)[:500]}"))
    pg.console_log = console
    try:
        yield pg
    finally:
        pg.close()


# --------------------------------------------------------------------------- JupyterLab model
# The notebook's state is read from JupyterLab's own model (window.jupyterapp, exposed by
# --LabApp.expose_app_in_browser, as JupyterLab's Galata test tool does), not from the DOM,
# because JupyterLab skips rendering off-screen cells.
_NOTEBOOK_STATE = """(path) => {
  const app = window.jupyterapp;
  if (!app) return {ready: false, why: 'window.jupyterapp missing'};
  let panel = null;
  for (const w of app.shell.widgets('main')) {
    if (w.context && w.context.path === path && w.content && w.content.widgets) panel = w;
  }
  if (!panel) return {ready: false, why: 'notebook not open'};
  const session = panel.sessionContext && panel.sessionContext.session;
  const kernel = session && session.kernel;
  const cells = [];
  for (const cell of panel.content.widgets) {
    if (cell.model.type !== 'code') continue;
    const outputs = cell.model.outputs.toJSON();
    cells.push({
      count: cell.model.executionCount,
      errors: outputs.filter(o => o.output_type === 'error')
                     .map(o => o.ename + ': ' + o.evalue),
    });
  }
  return {ready: true, kernel: kernel ? kernel.status : 'none',
          connection: kernel ? kernel.connectionStatus : 'none', cells};
}"""


class Deadline:
    """The test's time budget: every wait gets what is left of it."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def ms(self, cap_s: float) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("the test ran out of its time budget")
        return 1000 * min(cap_s, left)


def _poll(fn, timeout_ms: float, what: str, interval: float = 0.5):
    """Call ``fn`` until it returns something truthy; fail naming ``what`` after the timeout."""
    end = time.monotonic() + timeout_ms / 1000
    while True:
        result = fn()
        if result:
            return result
        if time.monotonic() > end:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def _state(page, path: str) -> dict:
    return page.evaluate(_NOTEBOOK_STATE, path)


def _wait_kernel_idle(page, path: str, timeout_ms: float) -> None:
    def ok():
        s = _state(page, path)
        return s.get("ready") and s["kernel"] == "idle" and s["connection"] == "connected"
    try:
        _poll(ok, timeout_ms, "the kernel to start and go idle")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; last state: {_state(page, path)}") from None


def _wait_all_cells_ran(page, path: str, timeout_ms: float) -> dict:
    """Wait until every code cell has an execution count and the kernel is idle; fail at once,
    with the exception, when a cell raised (Run All stops there)."""
    end = time.monotonic() + timeout_ms / 1000
    while True:
        s = _state(page, path)
        errors = [e for c in s.get("cells", []) for e in c["errors"]]
        if errors:
            raise AssertionError(f"a cell of {path} raised: {errors}")
        if (s.get("ready") and s["kernel"] == "idle" and s["cells"]
                and all(c["count"] is not None for c in s["cells"])):
            return s
        if time.monotonic() > end:
            raise AssertionError(f"Run All did not finish within {timeout_ms / 1000:.0f} s: {s}")
        time.sleep(1.0)


# --------------------------------------------------------------------------- the panel
_RUN_BUTTON = "button.jupyter-button:text-is('Run')"  # exact text, whitespace trimmed
@dataclass
class PanelView:
    """Locators for one ControlPanel rendered in the page."""
    root: object  # the cell output holding the panel

    @property
    def run_button(self):
        return self.root.locator(_RUN_BUTTON)

    @property
    def status(self):
        # the HTML widget beside the Run button
        return self.root.locator(".widget-hbox").filter(
            has=self.root.page.locator(_RUN_BUTTON)).locator(".widget-html-content")

    @property
    def output(self):
        return self.root.locator(".widget-output").first  # the panel's Output (outermost one)

    def slider(self, label: str):
        name = re.compile(rf"^\s*{re.escape(label)}\s*$")
        return self.root.locator(".widget-slider").filter(
            has=self.root.page.locator("label.widget-label", has_text=name))

    def figures(self) -> list[str]:
        return self.output.locator("img").evaluate_all("els => els.map(e => e.src)")

    def table_text(self) -> str:
        tables = self.output.locator("table")
        return tables.last.text_content() if tables.count() else ""

    def status_text(self) -> str:
        return (self.status.text_content() or "").strip()


def _find_panel(page, slider: str, timeout_ms: float) -> PanelView:
    """The first cell output holding a panel (a Run button) with a ``slider`` slider."""
    label = page.locator(".widget-slider label.widget-label",
                         has_text=re.compile(rf"^\s*{re.escape(slider)}\s*$"))
    outputs = (page.locator(".jp-OutputArea-output")
               .filter(has=page.locator(_RUN_BUTTON)).filter(has=label))
    outputs.first.wait_for(state="attached", timeout=timeout_ms)
    root = outputs.first
    root.scroll_into_view_if_needed()
    return PanelView(root)


def _wait_run_done(panel: PanelView, timeout_ms: float, *, old_figures: list[str],
                   old_table: str | None) -> tuple[list[str], str]:
    """After a click on Run: wait for 'done', a figure that was not there before and a table
    (different from ``old_table`` when given); fail with the panel's error if it shows one."""
    end = time.monotonic() + timeout_ms / 1000
    while True:
        status = panel.status_text()
        if status.startswith("error"):
            raise AssertionError(f"the panel's run failed: {status}\n{panel.output.text_content()}")
        if status.startswith("done") and panel.run_button.is_enabled():
            figs, table = panel.figures(), panel.table_text()
            fresh = [f for f in figs if f not in old_figures]
            if fresh and table and (old_table is None or table != old_table):
                return figs, table
        if time.monotonic() > end:
            raise AssertionError(
                f"the panel's run did not finish with a new figure and table within "
                f"{timeout_ms / 1000:.0f} s; status {status!r}, {len(panel.figures())} figure(s), "
                f"table {'changed' if panel.table_text() != old_table else 'unchanged'}")
        time.sleep(0.5)


def _set_slider(panel: PanelView, label: str, timeout_ms: float) -> tuple[float, float]:
    """Change slider ``label`` through its editable readout, as a reader typing a value:
    to its minimum, or one step up when it is already there. Returns (old, new)."""
    slider = panel.slider(label)
    assert slider.count() == 1, f"expected one '{label}' slider in the panel, found {slider.count()}"
    handle = slider.locator(".noUi-handle")
    old = float(handle.get_attribute("aria-valuenow"))
    lo = float(handle.get_attribute("aria-valuemin"))
    hi = float(handle.get_attribute("aria-valuemax"))
    new = lo if old > lo else min(old + 1, hi)
    readout = slider.locator(".widget-readout")
    readout.scroll_into_view_if_needed()
    readout.fill(f"{new:g}")
    readout.press("Enter")
    _poll(lambda: float(handle.get_attribute("aria-valuenow")) == new, timeout_ms,
          f"the '{label}' slider to show {new:g}")
    assert (readout.text_content() or "").strip() == f"{new:g}"
    return old, new


def _save(locator_or_page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    locator_or_page.screenshot(path=str(path))
    return path


# --------------------------------------------------------------------------- the test
@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_panel_reruns_after_a_slider_moves(notebook, chromium, lab_server, page):
    budget = Deadline(TEST_BUDGET_S)
    stem = Path(notebook).stem
    (ARTIFACTS / f"{stem}-failure.png").unlink(missing_ok=True)  # left by an earlier run
    t0 = time.monotonic()

    def phase(what: str) -> None:  # printed with the failure report, to see where time went
        print(f"{time.monotonic() - t0:6.1f} s  {what}")

    try:
        # A workspace of its own per notebook, so the other test's tabs are not restored.
        url = f"{lab_server.url}/lab/workspaces/{stem}/tree/{notebook}?reset&token={lab_server.token}"
        page.goto(url, timeout=budget.ms(60))
        page.locator(".jp-NotebookPanel").first.wait_for(timeout=budget.ms(60))
        _wait_kernel_idle(page, notebook, budget.ms(60))
        phase("notebook open, kernel idle")

        # Run > Run All Cells, from the menu bar as a reader would.
        page.locator("#jp-MainMenu .lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()
        state = _wait_all_cells_ran(page, notebook, budget.ms(150))
        assert len(state["cells"]) >= 2
        phase(f"Run All finished ({len(state['cells'])} code cells)")

        # 1. The panel rendered as widgets, not as text or an error.
        panel = _find_panel(page, SLIDER, budget.ms(20))
        assert panel.run_button.is_visible(), "the panel's Run button is not visible"
        assert panel.root.locator(".widget-slider").count() >= 1
        assert panel.slider(SLIDER).is_visible(), f"the '{SLIDER}' slider is not visible"
        assert page.get_by_text("Error displaying widget").count() == 0, str(page.console_log)
        assert panel.figures() == [] and panel.table_text() == "", "the panel's output starts empty"

        # 2. Run with the profile's defaults: a figure and the results table appear.
        panel.run_button.click()
        figs0, table0 = _wait_run_done(panel, budget.ms(90), old_figures=[], old_table=None)
        rows = panel.output.locator("table").last.locator("tbody tr").count()
        assert rows >= 1, f"the results table has no rows: {table0[:300]!r}"
        phase(f"panel run with defaults: {panel.status_text()!r}")

        # 3. Move the slider, Run again: a new figure and a different table.
        old, new = _set_slider(panel, SLIDER, budget.ms(10))
        assert new != old
        panel.run_button.click()
        figs1, table1 = _wait_run_done(panel, budget.ms(120), old_figures=figs0, old_table=table0)
        assert set(figs1).isdisjoint(figs0), "a figure from the first run is still shown"
        assert table1 != table0
        phase(f"panel rerun with {SLIDER} {old:g} -> {new:g}: {panel.status_text()!r}")
        assert page.get_by_text("Error displaying widget").count() == 0, str(page.console_log)
        assert not [m for m in page.console_log.errors() if "widget" in m.lower()], str(page.console_log)

        panel.root.scroll_into_view_if_needed()
        _save(panel.root, f"{stem}-panel.png")
    except BaseException:
        # Shown by pytest under "Captured stdout call", beside the original error.
        try:
            print(f"screenshot of the page: {_save(page, f'{stem}-failure.png')}")
        except Exception as shot_exc:  # the page itself may be gone
            print(f"no screenshot: {shot_exc}")
        print(page.console_log)
        print(f"server log (last lines):\n{lab_server.log_tail(20)}")
        raise
    finally:
        lab_server.shutdown_kernels_of(notebook)
