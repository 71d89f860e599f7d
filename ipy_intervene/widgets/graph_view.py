"""Graph view: the intervention graph as SVG (pygraphviz), or DOT text without it.

>>> view = GraphView(result.graph)                            # doctest: +SKIP
>>> view.svg()[:4]                                            # doctest: +SKIP
'<svg'
"""

from __future__ import annotations

import html
import os
import sys
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

from ipy_intervene.compiler.graph import InterventionGraph


@lru_cache(maxsize=64)
def render_svg(dot: str) -> str | None:
    """SVG text for DOT source, or None when pygraphviz (or Graphviz) is not available."""
    try:
        import pygraphviz
    except ImportError:
        return None
    try:
        with _fontconfig_quiet():
            svg = pygraphviz.AGraph(string=dot).draw(format="svg", prog="dot")
    except Exception:  # Graphviz missing or failing: the DOT fallback still shows the graph
        return None
    text = svg.decode("utf-8") if isinstance(svg, bytes) else svg
    return text[text.index("<svg"):] if "<svg" in text else text


@contextmanager
def _fontconfig_quiet() -> Iterator[None]:
    """Graphviz's bundled fontconfig complains about newer system configs straight on fd 2
    (the notebook shows it as stderr); drop those lines, pass anything else on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
    rest = [line for line in text.splitlines() if not line.startswith("Fontconfig warning")]
    if rest:
        print("\n".join(rest), file=sys.stderr)


class GraphView:
    """Displays an :class:`InterventionGraph`; deterministic output for the same graph."""

    def __init__(self, graph: InterventionGraph) -> None:
        self.graph = graph

    def dot(self) -> str:
        return self.graph.to_dot()

    def svg(self) -> str | None:
        return render_svg(self.dot())

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, str]:
        bundle = {"text/plain": self.graph.summary()}
        svg = self.svg()
        if svg is not None:
            bundle["image/svg+xml"] = svg
            bundle["text/html"] = f'<div class="ii-graph">{svg}</div>'
        else:
            bundle["text/html"] = f"<pre>{html.escape(self.dot())}</pre>"
        return bundle

    def __repr__(self) -> str:
        return f"<GraphView sites={len(self.graph.sites)} invokes={len(self.graph.invokes)}>"
