"""Self-contained HTML reports of executed notebooks (``make demo`` writes one).

The views' ``text/html`` (plotly.js inlined) is preferred over the live-widget mime type,
which would need a running kernel or a CDN: the page opens offline.

>>> export_html("examples/ioi_activation_patching.ipynb", "build/ioi.html")   # doctest: +SKIP
"""

from __future__ import annotations

import re
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
    body = offline(body)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(body, encoding="utf-8")
    return target.resolve()


PLOTLY_JS = re.compile(r"<script>/\*\*\s*\* plotly\.js.*?</script>", re.S)
REMOTE = re.compile(r'<script[^>]+src="https?://[^"]*"[^>]*>\s*</script>')


def offline(body: str) -> str:
    """The page with plotly.js inlined once (each notebook's kernel inlined its own copy) and
    without the template's remote scripts (require.js, MathJax), which the views never use.

    >>> offline('<script src="https://cdn.example/x.js"></script><p>hi</p>')
    '<p>hi</p>'
    """
    seen = []

    def first_only(match: re.Match) -> str:
        seen.append(match)
        return match.group(0) if len(seen) == 1 else ""

    return REMOTE.sub("", PLOTLY_JS.sub(first_only, body))


def execute(notebook: str | Path, timeout: int = 600) -> "object":
    """Run a notebook top to bottom in a fresh kernel (widget state left out) and return it.

    The kernel talks to us over local IPC sockets in a private temporary folder, not TCP: no
    port is open to other users of the machine (and the kernel has no plain-text TCP warning
    to print)."""
    import tempfile

    import nbformat
    from nbclient import NotebookClient
    from traitlets.config import Config

    nb = nbformat.read(str(notebook), as_version=4)
    with tempfile.TemporaryDirectory(prefix="ii-kernel-") as sockets:
        ipc = Config({"KernelManager": {"transport": "ipc", "ip": str(Path(sockets) / "kernel")}})
        # the client makes (and so shuts down) its kernel manager, configured for IPC
        NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=False,
                       config=ipc,
                       resources={"metadata": {"path": str(Path(notebook).parent)}}).execute()
    return nb


def demo_report(notebooks: list[str | Path], target: str | Path) -> Path:
    """Execute ``notebooks`` in one kernel each and write them as one offline HTML page."""
    import nbformat

    merged = nbformat.v4.new_notebook()
    for path in notebooks:
        nb = execute(path)
        merged.cells.extend(nb.cells)
        merged.metadata.setdefault("kernelspec", nb.metadata.get("kernelspec"))
        merged.metadata.setdefault("language_info", nb.metadata.get("language_info"))
    source = Path(target).with_suffix(".ipynb")
    source.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(merged, str(source))
    return export_html(source, target)


def ioi_summary() -> str:
    """The demo's headline numbers: clean/corrupted logit difference and the top sites."""
    import os

    import ipy_intervene as ii

    model = ii.load_model("demo")
    clean = "When Mary and John went to the store , John gave a drink to"
    corrupt = "When Mary and John went to the store , Mary gave a drink to"
    quiet = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"   # a summary line, not a progress bar, in the tool's output
    try:
        result = ii.patch_sweep(model, clean, corrupt, ii.logit_diff("Mary", "John"))
    finally:
        if quiet is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = quiet
    lines = [f"IOI logit difference (Mary - John): clean {result.clean:+.2f}, "
             f"corrupted {result.corrupted:+.2f}",
             "largest effects of patching resid_pre (clean = 1, corrupted = 0):"]
    lines += [f"  layer {c['layer']}, position {c['token']}: {c['value']:.3f}"
              for c in result.top(3)]
    return "\n".join(lines)


def main() -> None:
    """``python -m ipy_intervene.report``: what ``make demo`` runs."""
    import argparse

    parser = argparse.ArgumentParser(description="Execute the example notebooks into one "
                                                 "offline HTML report.")
    parser.add_argument("notebooks", nargs="+")
    parser.add_argument("--out", default="build/demo.html")
    args = parser.parse_args()
    print(f"running {len(args.notebooks)} example notebook(s), each in a fresh kernel ...",
          flush=True)
    page = demo_report(args.notebooks, args.out)
    print(ioi_summary(), flush=True)
    print(f"\nThe report: {page}\nOpen it in a browser (it works offline): "
          f"xdg-open {page} (Linux), open {page} (macOS), or go to {page.as_uri()}")


if __name__ == "__main__":
    main()
