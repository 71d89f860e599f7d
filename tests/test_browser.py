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

    html = demo_report([ROOT / "examples" / NOTEBOOK, ROOT / "examples" / "logit_lens.ipynb"],
                       tmp_path / "ioi.html")
    text = html.read_text()
    assert text.count("* plotly.js") == 1 and 'src="http' not in text  # once, nothing remote
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    remote: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda r: remote.append(r.url) if not r.url.startswith(
        ("file:", "data:", "blob:")) else None)
    page.route("**/*", lambda route: route.abort() if not route.request.url.startswith(
        "file:") else route.continue_())  # offline: nothing but the file itself
    page.goto(html.as_uri())
    page.wait_for_selector(".js-plotly-plot .main-svg .heatmaplayer", timeout=30_000)
    figures = text.count("Plotly.newPlot(")
    page.wait_for_function(f"() => [...document.querySelectorAll('.js-plotly-plot')].filter("
                           f"gd => gd.data && gd.data.length).length >= {figures}",
                           timeout=60_000, polling=250)  # the second notebook's too
    assert page.locator(".ii-sweep-detail").count() >= 1 and remote == []
    page.screenshot(path=str(tmp_path / "export.png"), full_page=False)
    assert not errors, errors
    page.close()


# -- every view at two widths: edge clicks, layout, screenshots (issue 14) -----------------

VIEWS_SETUP = """%load_ext ipy_intervene
import ipy_intervene as ii
model = ii.load_model("demo")
clean = "When Mary and John went to the store , John gave a drink to"
corrupt = "When Mary and John went to the store , Mary gave a drink to"
metric = ii.logit_diff("Mary", "John")
long = " ".join([clean + " Mary ."] * 3) + " " + clean
long_corrupt = " ".join([clean + " Mary ."] * 3) + " " + corrupt"""
VIEWS = {  # name: the cell whose output is the view
    "resid_pre": "ii.patch_sweep(model, clean, corrupt, metric)",
    "head_out_pos": "ii.patch_sweep(model, clean, corrupt, metric, site='head_out_pos')",
    "head_out": "ii.patch_sweep(model, clean, corrupt, metric, site='head_out')",
    "attribution": "ii.patch_sweep(model, clean, corrupt, metric, method='attribution')",
    "causal_tracing": "ii.patch_sweep(model, clean, method='noise', subject='Mary', window=3)",
    "long_prompt": "ii.patch_sweep(model, long, long_corrupt, metric, layers=[0, 3])",
    "lens": "ii.lens(model, clean)",
    "lens_long": "ii.lens(model, long)",
}
GEOMETRY = """(gd) => {
    const fl = gd._fullLayout, box = gd.getBoundingClientRect();
    const rects = [...gd.querySelectorAll('.nsewdrag, .colorbar, .xtick, .ytick, .g-y2title')]
        .map(e => { const r = e.getBoundingClientRect();
                    return [e.getAttribute('class'), r.left - box.left, r.top - box.top,
                            r.width, r.height].map(v => typeof v === 'number' ? Math.round(v) : v); });
    return {width: box.width, fullWidth: fl.width, height: fl.height,
            x: [fl.xaxis._offset, fl.xaxis._length, fl.xaxis.range],
            y: [fl.yaxis._offset, fl.yaxis._length, fl.yaxis.range],
            rows: fl.yaxis._categories.length, columns: gd.data[0].x.length,
            ticks: gd.querySelectorAll('.xtick').length, rects};
}"""


def put_notebook(lab: str, name: str, cells: list[str]) -> None:
    """Write a notebook into the lab's root through the contents API."""
    import json

    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    body = json.dumps({"type": "notebook", "content": json.loads(nbformat.writes(nb))})
    request = urllib.request.Request(f"{lab}/api/contents/{name}?token={TOKEN}",
                                     data=body.encode(), method="PUT",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30)


def open_and_run(page, lab: str, name: str, views: int) -> None:
    """Open a notebook without the side bar, run it and wait for ``views`` plotly views."""
    page.goto(f"{lab}/lab/tree/{name}?token={TOKEN}&reset")
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']",
                           timeout=90_000, state="attached")
    page.keyboard.press("Control+b")  # the file browser off: the notebook takes the width
    for attempt in range(2):
        page.wait_for_timeout(3000)
        run_all_cells(page)
        try:
            page.wait_for_function(
                f"() => [...document.querySelectorAll('.jupyter-widgets .js-plotly-plot')]"
                f".filter(gd => gd._fullLayout && gd.data && gd.data.length).length >= {views}",
                timeout=180_000)
            break
        except playwright.TimeoutError:
            if attempt:
                raise
    page.wait_for_timeout(2000)


def plot(page, index: int):
    return page.locator(".jupyter-widgets .js-plotly-plot").nth(index)


def click_cell(page, gd, where: tuple[float, float]) -> None:
    box = gd.bounding_box()
    page.mouse.click(box["x"] + where[0], box["y"] + where[1])


def cell_centre(gd, row: int, col: int) -> tuple[float, float]:
    return tuple(gd.evaluate("""(gd, rc) => {
        const fl = gd._fullLayout;
        return [fl.xaxis._offset + fl.xaxis.l2p(rc[1]), fl.yaxis._offset + fl.yaxis.l2p(rc[0])];
    }""", [row, col]))


def selected(gd) -> list:
    return gd.evaluate("(gd) => [gd.data[1].x[0], gd.data[1].y[0]]")


@pytest.mark.parametrize("width", [800, 1600])
def test_every_view_fills_the_width_and_holds_still_when_edge_cells_are_clicked(
        lab, browser, width):
    name = f"views_{width}.ipynb"
    put_notebook(lab, name, [VIEWS_SETUP, *VIEWS.values()])
    page = browser.new_page(viewport={"width": width, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error"
            and "Error" in m.text and "plotly" not in m.text.lower() else None)
    open_and_run(page, lab, name, len(VIEWS))
    (ROOT / "build").mkdir(exist_ok=True)
    for index, view in enumerate(VIEWS):
        gd = plot(page, index)
        gd.scroll_into_view_if_needed()
        page.wait_for_timeout(300)
        before = gd.evaluate(GEOMETRY)
        area = gd.evaluate("(gd) => gd.closest('.jp-OutputArea-output').clientWidth")
        assert before["rows"] in (2, 4, 5), (view, before)  # every layer row (lens: + embed)
        assert before["columns"] >= 4 and before["ticks"] >= 4, (view, before)
        assert abs(before["fullWidth"] - before["width"]) < 2, (view, before)  # autosize
        assert before["width"] > 0.9 * area, (view, before, area)             # fills it
        _no_overlap(view, before["rects"])
        rows, cols = before["rows"], before["columns"]
        corners = [(0, 0), (0, cols - 1), (rows - 1, 0), (rows - 1, cols - 1)]
        targets = {rc: cell_centre(gd, *rc) for rc in corners}
        labels = gd.evaluate("(gd) => [gd.data[0].x, gd.data[0].y]")
        for rc in corners + corners:  # each edge cell twice, at the first layout's pixels
            click_cell(page, gd, targets[rc])
            want = [labels[0][rc[1]], labels[1][rc[0]]]
            page.wait_for_function("([gd, want]) => gd.data[1].x[0] === want[0] && "
                                   "gd.data[1].y[0] === want[1]",
                                   arg=[gd.element_handle(), want], timeout=30_000)
            assert selected(gd) == want, (view, rc)
            page.wait_for_timeout(150)
            after = gd.evaluate(GEOMETRY)
            moved = [(a, b) for a, b in zip(before["rects"], after["rects"])
                     if a[0] != "xtick" and a != b]
            assert (after["x"], after["y"], after["height"]) == \
                (before["x"], before["y"], before["height"]) and not moved, (view, rc, moved)
        view_box = gd.element_handle().evaluate_handle(
            "(gd) => gd.closest('.jp-OutputArea-output')").as_element()
        view_box.screenshot(path=str(ROOT / "build" / f"view_{view}_{width}.png"))
    assert not errors, errors
    page.close()


def _no_overlap(view: str, rects: list) -> None:
    """The colour bar covers no tick label (the line plot's layer labels included)."""
    bars = [r for r in rects if "colorbar" in r[0]]
    ticks = [r for r in rects if r[0] in ("xtick", "ytick") and r[3] and r[4]]
    for bar in bars:
        for tick in ticks:
            apart = (bar[1] >= tick[1] + tick[3] or tick[1] >= bar[1] + bar[3]
                     or bar[2] >= tick[2] + tick[4] or tick[2] >= bar[2] + bar[4])
            assert apart, (view, bar, tick)


# -- the analysis views: attention patterns, decomposition, screen, graph (issues 13-15) -----

ANALYSIS = [  # cells after VIEWS_SETUP; the attention view is the only widget among them
    "ii.attention_patterns(model, clean).show(layer=1, head=3)",
    "ii.decompose(model, clean, metric)",
    "ii.screen_and_verify(model, clean, corrupt, metric, site='head_out', top=3)",
    "%%trace model clean --graph\nh = model.transformer.h[1].output\n"
    "model.transformer.h[2].mlp.output[:, -1] = 0",
    "ii.edge_attribution(model, clean, corrupt, metric).circuit(top=20)",
]


def centre(gd) -> None:
    gd.evaluate("(gd) => gd.scrollIntoView({block: 'center'})")
    gd.page.wait_for_timeout(300)


def title(gd) -> str:
    return gd.evaluate("(gd) => gd.layout.title.text || gd.layout.title")


def test_analysis_views_render_and_the_attention_view_follows_clicks(lab, browser):
    for width in (800, 1600):
        name = f"analysis_{width}.ipynb"
        put_notebook(lab, name, [VIEWS_SETUP, *ANALYSIS])
        page = browser.new_page(viewport={"width": width, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        open_and_run(page, lab, name, 2)                    # the head and the layer's heads
        page.wait_for_function(
            "() => [...document.querySelectorAll('.jp-OutputArea-output .js-plotly-plot')]"
            ".filter(gd => gd._fullLayout && gd.data && gd.data.length).length >= 4",
            timeout=120_000)                                 # + decomposition and screen
        page.wait_for_function(  # the intervention graph and the circuit (pygraphviz SVG)
            "() => document.querySelectorAll('.jp-OutputArea-output svg g.node').length >= 2 && "
            "[...document.querySelectorAll('.jp-OutputArea-output svg')].filter("
            "s => s.querySelector('g.node')).length >= 2", timeout=60_000)
        main, heads = plot(page, 0), plot(page, 1)
        centre(main)  # clear of the notebook's sticky toolbar, which would take the clicks
        assert "L1H3" in title(main)
        before = main.evaluate(GEOMETRY)
        area = main.evaluate("(gd) => gd.closest('.jp-OutputArea-output').clientWidth")
        assert before["width"] > 0.9 * area and before["rows"] == before["columns"] == 15
        assert main.evaluate("(gd) => [...gd.querySelectorAll('.ytick text')].every("
                             "t => !(t.getAttribute('transform') || '').includes('rotate'))")
        n = before["rows"]
        for rc in ((0, 0), (n - 1, 0), (n - 1, n - 1)):  # edge cells the query can see
            target = cell_centre(main, *rc)
            click_cell(page, main, target)
            tokens = main.evaluate("(gd, rc) => [gd.data[0].y[rc[0]], gd.data[0].x[rc[1]]]",
                                   list(rc))
            page.wait_for_function(  # the HTML widget replaces its table: look it up anew
                "(want) => document.querySelector('.jupyter-widgets .ii-attention-detail')"
                ".innerText.includes(want)", arg=f"{tokens[0]} → {tokens[1]}:", timeout=60_000,
                polling=250)  # a timer: animation frames can stall in a headless page
            after = main.evaluate(GEOMETRY)
            assert (after["x"], after["y"], after["height"]) == \
                (before["x"], before["y"], before["height"]), rc
        centre(heads)
        click_cell(page, heads, cell_centre(heads, 2, 2 * (n + 1) + 2))  # a cell of head 2
        page.wait_for_function("(gd) => (gd.layout.title.text || '').includes('L1H2')",
                               arg=main.element_handle(), timeout=30_000)
        for index, view in enumerate(("attention", "decompose", "screen")):
            gd = page.locator(".jp-OutputArea-output .js-plotly-plot").nth(
                index + 1 if index else 0)
            box = gd.element_handle().evaluate_handle(
                "(gd) => gd.closest('.jp-OutputArea-output')").as_element()
            box.screenshot(path=str(ROOT / "build" / f"view_{view}_{width}.png"))
        graphs = page.locator(".jp-OutputArea-output:has(svg g.node)")
        for index, view in enumerate(("graph", "circuit")):
            graphs.nth(index).scroll_into_view_if_needed()
            graphs.nth(index).screenshot(path=str(ROOT / "build" / f"view_{view}_{width}.png"))
        assert not errors, errors
        page.close()
