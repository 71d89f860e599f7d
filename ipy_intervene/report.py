"""Self-contained HTML reports of executed notebooks (``make demo`` writes one).

The views' ``text/html`` (plotly.js inlined) is preferred over the live-widget mime type,
which would need a running kernel or a CDN: the page opens offline.

>>> export_html("examples/ioi_activation_patching.ipynb", "build/ioi.html")   # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

OFFLINE_PRIORITY = ["text/html", "image/svg+xml", "image/png", "text/markdown", "text/latex",
                    "image/jpeg", "text/plain"]


def export_html(notebook: str | Path, target: str | Path) -> Path:
    """Write ``notebook`` (already executed) as one HTML page that needs no network."""
    import nbformat
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    config = Config({"NbConvertBase": {"display_data_priority": OFFLINE_PRIORITY}})
    exporter = HTMLExporter(config=config, template_name="lab")
    nb = nbformat.read(str(notebook), as_version=4)
    nb.metadata.pop("widgets", None)
    body, _ = exporter.from_notebook_node(nb)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(body, encoding="utf-8")
    return target.resolve()
