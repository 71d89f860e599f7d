"""The committed example notebooks read where only images and text are shown (a code-hosting
preview, ``jupyter nbconvert --to html`` offline, JupyterLab before running): every view has a
static image whose picture is really there, and the notebooks stay small."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.ipynb"))
STATIC = ("image/svg+xml", "image/png")
SVG = "{http://www.w3.org/2000/svg}"


def views(nb) -> list[dict]:
    """Outputs that carry a figure: a widget view or plotly HTML."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            html = data.get("text/html", "")
            if "application/vnd.jupyter.widget-view+json" in data or "Plotly.newPlot" in html:
                found.append(data)
    return found


def static_only(nb) -> list[str]:
    """What a renderer that shows only images and text shows: one mimetype per output."""
    shown = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "text" in out:
                shown.append("text/plain")
                continue
            shown.append(next((m for m in (*STATIC, "text/plain") if m in data), "nothing"))
    return shown


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_view_of_a_committed_example_has_a_static_picture(path):
    nb = nbformat.read(path, as_version=4)
    figures = views(nb)
    for data in figures:
        assert any(m in data for m in STATIC), f"{path.name}: a view without a static image"
        svg = data.get("image/svg+xml")
        if svg is not None:
            svg = "".join(svg) if isinstance(svg, list) else svg
            root = ET.fromstring(svg)                      # well-formed
            marks = [e for e in root.iter() if e.tag in {f"{SVG}{t}" for t in (
                "rect", "path", "circle", "polyline")}]
            labels = [e for e in root.iter()
                      if e.tag == f"{SVG}text" and "".join(e.itertext()).strip()]
            assert len(marks) >= 4 and len(labels) >= 4, (path.name, len(marks), len(labels))
    shown = static_only(nb)
    assert shown.count("image/svg+xml") + shown.count("image/png") >= len(figures)
    assert "nothing" not in shown, f"{path.name}: an output a static renderer cannot show"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_committed_examples_stay_small_and_need_no_network(path):
    text = path.read_text()
    assert len(text) < 400_000, f"{path.name} is {len(text) // 1000} kB"
    assert not re.search(r"<script[^>]+src=\"https?://", text), "a script from the network"


def test_the_examples_have_figures_to_show():
    counts = {p.stem: len(views(nbformat.read(p, as_version=4))) for p in EXAMPLES}
    assert sum(counts.values()) >= 10, counts
