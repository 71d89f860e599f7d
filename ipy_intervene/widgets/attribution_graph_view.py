"""The attribution graph view: one self-contained SVG (no script, no network), so it shows
in a live notebook, an HTML export and an image-only preview alike.

Tokens run along the bottom, layers go up, the output logits sit at the top. Features are
circles, error nodes grey squares, each in its (layer, position) cell; an edge's width grows
with ``|weight|`` and its colour gives the sign (blue raises its target, red lowers it).
Hovering a node shows its id, activation, influence and, when given, its top activating
tokens; hovering an edge shows its weight. Supernodes (``groups={"name": [ids]}``) are drawn as
labelled boxes around their members. Only the ``max_edges`` strongest edges are drawn, so a
graph of thousands of nodes stays a light picture.

>>> AttributionGraphView(graph, pruned=graph.prune()).svg()[:4]        # doctest: +SKIP
'<svg'
"""

from __future__ import annotations

import html
from typing import Any, Mapping, Sequence

POSITIVE, NEGATIVE = "#1f5fbf", "#c0392b"
COL, ROW, PAD = 78, 64, 40          # a position's least width, a layer's height, the margin
STEP, SUBROWS, SUB_GAP = 13, 4, 12  # node spacing, sub-rows of a crowded cell, their gap
MAX_COL, LOGIT_W = 300, 72          # a position's most width, each output's share of the top
BOTTOM = 8                          # below the token row's band: the token texts


class AttributionGraphView:
    """Displays an attribution graph (duck-typed: ``nodes``, ``adjacency``, ``ids``) or a
    pruned one; deterministic output for the same graph and options."""

    def __init__(self, graph: Any, pruned: Any = None, *, groups: Mapping[str, Sequence[str]]
                 | None = None, top_tokens: Mapping[str, Sequence[Any]] | None = None,
                 max_edges: int = 600, title: str | None = None) -> None:
        self.graph, self.pruned = graph, pruned
        self.groups = {name: list(ids) for name, ids in (groups or {}).items()}
        self.top_tokens = dict(top_tokens or {})
        self.max_edges = max_edges
        self.title = title
        unknown = [i for ids in self.groups.values() for i in ids if i not in graph.ids]
        if unknown:
            graph.nodes.index(unknown[0])  # raises, saying why the id is not a node

    # -- what is drawn ---------------------------------------------------------------------

    def _kept(self) -> list[int]:
        n = self.graph.nodes
        if self.pruned is not None:
            return self.pruned.node_mask.nonzero().flatten().tolist()
        return list(range(len(n)))

    def _edges(self, kept: list[int]) -> list[tuple[int, int, float]]:
        """The ``max_edges`` strongest edges between kept nodes: (source, target, weight)."""
        adj = self.graph.adjacency
        mask = self.pruned.edge_mask if self.pruned is not None else adj != 0
        keep = adj.new_zeros(adj.shape[0], dtype=mask.dtype)
        keep[kept] = True
        strength = (adj.abs() * (mask & keep[:, None] & keep[None, :])).flatten()
        k = min(self.max_edges, int((strength > 0).sum()))
        top = strength.topk(k).indices.sort().values.tolist() if k else []
        size = adj.shape[1]
        return [(i % size, i // size, float(adj.view(-1)[i])) for i in top]

    def _cells(self, kept: list[int]) -> dict[tuple[int, int], list[int]]:
        """Kept nodes by (row, position): row 0 the tokens, row l + 1 layer l's features and
        error, the top row the outputs (position -1)."""
        n = self.graph.nodes
        cells: dict[tuple[int, int], list[int]] = {}
        for i in kept:
            key = n.key(n.ids[i])
            cell = (key[1] + 1, key[2]) if key[0] in "fe" else \
                (0, key[1]) if key[0] == "t" else (n.n_layers + 1, -1)
            cells.setdefault(cell, []).append(i)
        return cells

    def _columns(self, cells: dict[tuple[int, int], list[int]]) -> tuple[list[float],
                                                                          list[float]]:
        """Each position's left edge and width: wide enough for its fullest cell in up to
        SUBROWS rows of nodes STEP apart (at least COL, at most MAX_COL)."""
        n = self.graph.nodes
        widths = []
        for pos in range(n.n_pos):
            most = max((len(m) for (_, col), m in cells.items() if col == pos), default=0)
            widths.append(float(min(MAX_COL, max(COL, STEP * -(-most // SUBROWS) + 16))))
        lefts = [PAD + sum(widths[:pos]) for pos in range(n.n_pos)]
        return lefts, widths

    def _size(self, widths: list[float]) -> tuple[float, float]:
        n = self.graph.nodes
        width = max(sum(widths), LOGIT_W * len(n.logits))
        return PAD * 2 + width, PAD + ROW * (n.n_layers + 2) + BOTTOM

    def _layout(self, cells: dict[tuple[int, int], list[int]], lefts: list[float],
                widths: list[float]) -> dict[int, tuple[float, float]]:
        """Node centres: column = position (outputs spread along the top), row = layer; a
        crowded cell wraps into sub-rows (and ``self._crowded`` notes its count)."""
        width, height = self._size(widths)
        where: dict[int, tuple[float, float]] = {}
        self._crowded: list[tuple[float, float, int]] = []
        for (row, col), members in cells.items():
            y = height - BOTTOM - ROW * row - ROW / 2
            left, span = (PAD, width - 2 * PAD) if col < 0 else (lefts[col], widths[col])
            per_row = len(members) if col < 0 else max(1, int((span - 8) // STEP))
            rows = -(-len(members) // per_row)
            if rows > SUBROWS:
                per_row, rows = -(-len(members) // SUBROWS), SUBROWS
                self._crowded.append((left + span / 2, y - ROW / 2 + 6, len(members)))
            for j, i in enumerate(members):
                sub, k = divmod(j, per_row)
                in_row = min(per_row, len(members) - sub * per_row)
                where[i] = (left + span * (k + 1) / (in_row + 1),
                            y + (sub - (rows - 1) / 2) * SUB_GAP)
        return where

    # -- SVG -------------------------------------------------------------------------------

    def svg(self) -> str:
        """The whole picture as one SVG document."""
        n = self.graph.nodes
        kept = self._kept()
        cells = self._cells(kept)
        lefts, widths = self._columns(cells)
        where = self._layout(cells, lefts, widths)
        edges = self._edges(kept)
        width, height = self._size(widths)
        biggest = max((abs(w) for *_, w in edges), default=1.0) or 1.0
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
               f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
               'font-family="Helvetica, Arial, sans-serif" font-size="10">',
               '<rect width="100%" height="100%" fill="white"/>']
        out += self._grid(height, lefts, widths)
        out += self._groups(where)
        for s, t, w in edges:
            (x1, y1), (x2, y2) = where[s], where[t]
            stroke = 0.4 + 3.6 * abs(w) / biggest
            colour = POSITIVE if w > 0 else NEGATIVE
            tip = f"{n.ids[s]} -> {n.ids[t]}: {w:+.4g}"
            out.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                       f'stroke="{colour}" stroke-width="{stroke:.2f}" stroke-opacity="0.55">'
                       f'<title>{_esc(tip)}</title></line>')
        for i in kept:
            out.append(self._node(i, *where[i]))
        for x, y, count in self._crowded:
            out.append(f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="middle" fill="#555" '
                       f'font-size="9">{count} nodes</text>')
        out.append("</svg>")
        return "\n".join(out)

    def _grid(self, height: float, lefts: list[float], widths: list[float]) -> list[str]:
        n = self.graph.nodes
        out = []
        if self.title:
            out.append(f'<text x="{PAD}" y="16" font-size="13">{_esc(self.title)}</text>')
        for row in range(n.n_layers + 2):
            y = height - BOTTOM - ROW * row - ROW / 2
            label = "emb" if row == 0 else ("logits" if row == n.n_layers + 1 else
                                            f"L{row - 1}")
            out.append(f'<text x="4" y="{y + 3:.1f}" fill="#888">{label}</text>')
            if 0 < row <= n.n_layers:  # a faint line between layers
                line_y = y + ROW / 2
                out.append(f'<path d="M{PAD} {line_y:.1f}H{PAD + sum(widths):.1f}" '
                           'stroke="#eee"/>')
        token_y = height - BOTTOM - ROW / 2 + 22
        for pos, token in enumerate(n.tokens):
            x = lefts[pos] + widths[pos] / 2
            out.append(f'<text x="{x:.1f}" y="{token_y:.1f}" text-anchor="middle" '
                       f'fill="#333">{_esc(_short(token, max(6, int(widths[pos] // 7))))}'
                       '</text>')
        return out

    def _node(self, i: int, x: float, y: float) -> str:
        n = self.graph.nodes
        node_id = n.ids[i]
        key = n.key(node_id)
        tip = [n.label(i)]
        if key[0] == "f":
            tip.append(f"activation {n.features[i][3]:.4g}")
        if self.pruned is not None:
            tip.append(f"influence {float(self.pruned.node_influence[i]):.4g}")
        for example in self.top_tokens.get(node_id, [])[:5]:
            tip.append(f"  {_top_text(example)}")
        title = f"<title>{_esc(chr(10).join(tip))}</title>"
        if key[0] == "f":
            return (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="#e8f0fe" '
                    f'stroke="#1f5fbf">{title}</circle>')
        if key[0] == "e":
            return (f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" '
                    f'fill="#ddd" stroke="#777">{title}</rect>')
        if key[0] == "t":
            return (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="#e6f4ea" '
                    f'stroke="#2e7d32">{title}</circle>')
        label = _esc(_short(n.logits[key[1]], 12))
        return (f'<g>{title}<rect x="{x - 30:.1f}" y="{y - 9:.1f}" width="60" height="18" '
                f'rx="4" fill="#fff3cd" stroke="#b38f00"/><text x="{x:.1f}" y="{y + 3:.1f}" '
                f'text-anchor="middle">{label}</text></g>')

    def _groups(self, where: dict[int, tuple[float, float]]) -> list[str]:
        out = []
        for name, ids in self.groups.items():
            points = [where[self.graph.nodes.index(i)] for i in ids
                      if self.graph.nodes.index(i) in where]
            if not points:
                continue
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            x0, x1, y0, y1 = min(xs) - 10, max(xs) + 10, min(ys) - 10, max(ys) + 10
            out.append(f'<g><rect x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" '
                       f'height="{y1 - y0:.1f}" rx="6" fill="#fde68a" fill-opacity="0.35" '
                       f'stroke="#b38f00" stroke-dasharray="3,2"/><text x="{x0:.1f}" '
                       f'y="{y0 - 2:.1f}" fill="#7a5c00">{_esc(name)}</text></g>')
        return out

    # -- display ---------------------------------------------------------------------------

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        svg = self.svg()
        return {"image/svg+xml": svg,
                "text/html": f'<div class="ii-attribution-graph" style="overflow:auto">{svg}'
                             "</div>",
                "text/plain": repr(self.pruned if self.pruned is not None else self.graph)}

    def __repr__(self) -> str:
        return f"<AttributionGraphView nodes={len(self._kept())}>"


def _top_text(example: Any) -> str:
    context = getattr(example, "context", None)
    value = getattr(example, "value", None)
    if context is not None and value is not None:
        return f"{value:.3g}  {context}"
    return str(example)


def _short(text: str, limit: int) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)
