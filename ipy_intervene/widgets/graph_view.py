"""Graph view: the intervention graph as SVG (pygraphviz), or DOT text without it.

>>> view = GraphView(result.graph)                            # doctest: +SKIP
>>> view.svg()[:4]                                            # doctest: +SKIP
'<svg'
"""

from __future__ import annotations

import html
from functools import lru_cache

from ipy_intervene.graph import InterventionGraph


@lru_cache(maxsize=64)
def render_svg(dot: str) -> str | None:
    """SVG text for DOT source, or None when pygraphviz (or Graphviz) is not available."""
    try:
        import pygraphviz
    except ImportError:
        return None
    try:
        svg = pygraphviz.AGraph(string=dot).draw(format="svg", prog="dot")
    except Exception:  # Graphviz missing or failing: the DOT fallback still shows the graph
        return None
    text = svg.decode("utf-8") if isinstance(svg, bytes) else svg
    return text[text.index("<svg"):] if "<svg" in text else text


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
