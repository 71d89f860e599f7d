"""The views in a real browser: JupyterLab on localhost, driven by Playwright with Debian's
chromium (``/usr/bin/chromium --no-sandbox``; no ``playwright install``), and the exported
HTML of the example opened offline. Screenshots go to ``build/``."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "ioi_activation_patching.ipynb"
CHROMIUM = "/usr/bin/chromium"
TOKEN = "ii-browser-test"

playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
if not Path(CHROMIUM).exists():
    pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium "
                "(apt-get install chromium)", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on localhost serving a copy of the example notebook."""
    root = tmp_path_factory.mktemp("lab")
    shutil.copy(ROOT / "examples" / NOTEBOOK, root)
    port = free_port()
    log = open(root / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}",
         "--allow-root", f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
         "--ServerApp.ip=127.0.0.1", "--LabApp.news_url=", "--LabApp.collaborative=False"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"JupyterLab did not start: {(root / 'lab.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def run_all_cells(page) -> None:
    page.click(".lm-MenuBar-itemLabel:text-is('Run')")
    page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")


def run_until_the_view_shows(page):
    """Run All Cells; once more if the kernel was still starting and ran nothing."""
    for attempt in range(2):
        page.wait_for_timeout(3000)
        run_all_cells(page)
        try:
            return page.wait_for_selector(".jupyter-widgets .ii-sweep-detail", timeout=90_000,
                                          state="attached")
        except playwright.TimeoutError:
            if attempt:
                raise


def marker_y(page) -> list:
    return page.evaluate("""() => {
        const gd = document.querySelector('.jupyter-widgets .js-plotly-plot');
        return gd && gd.data ? gd.data[1].y : null;
    }""")


def test_sweep_view_in_jupyterlab(lab, browser):
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{lab}/lab/tree/{NOTEBOOK}?token={TOKEN}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']",
                           timeout=90_000, state="attached")
    detail = run_until_the_view_shows(page)
    detail.scroll_into_view_if_needed()
    page.wait_for_selector(".jupyter-widgets .js-plotly-plot .main-svg", timeout=60_000)
    page.wait_for_function("() => document.querySelectorAll("
                           "'.jupyter-widgets .js-plotly-plot .heatmaplayer').length > 0")
    page.wait_for_function("() => document.querySelectorAll("  # every view of the notebook
                           "'.jupyter-widgets .ii-sweep-detail').length >= 4", timeout=120_000)
    before_text, before_y = detail.inner_text(), marker_y(page)
    assert "layer 1, pos 10" in before_text and before_y == ["L1"]

    handle = page.locator(".widget-slider .noUi-handle").first
    handle.focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_function("(before) => document.querySelector("
                           "'.jupyter-widgets .ii-sweep-detail').innerText !== before",
                           arg=before_text, timeout=30_000)
    after_text = page.locator(".jupyter-widgets .ii-sweep-detail").first.inner_text()
    assert "layer 2, pos 10" in after_text
    page.wait_for_function("() => document.querySelector('.jupyter-widgets .js-plotly-plot')"
                           ".data[1].y[0] === 'L2'", timeout=30_000)
    (ROOT / "build").mkdir(exist_ok=True)
    view = page.locator(".jp-OutputArea-output:has(.ii-sweep-detail)").first
    view.screenshot(path=str(ROOT / "build" / "sweep_view.png"))
    assert not errors, errors
    page.close()


def test_exported_html_renders_the_heatmap_offline(browser, tmp_path):
    from ipy_intervene.report import demo_report

    html = demo_report([ROOT / "examples" / NOTEBOOK], tmp_path / "ioi.html")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.route("**/*", lambda route: route.abort() if not route.request.url.startswith(
        "file:") else route.continue_())  # offline: nothing but the file itself
    page.goto(html.as_uri())
    page.wait_for_selector(".js-plotly-plot .main-svg .heatmaplayer", timeout=30_000)
    assert page.locator(".ii-sweep-detail").count() >= 1
    page.screenshot(path=str(tmp_path / "export.png"), full_page=False)
    assert not errors, errors
    page.close()
