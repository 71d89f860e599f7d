"""Attention view: one head's pattern as a token-by-token heatmap (query rows, key columns;
keys a query cannot see are left blank, so the causal triangle shows), layer and head pickers,
and every head of the layer as small multiples: click one to pick it, click a cell of the big
heatmap to read that query -> key probability in the panel below.

As in the other views the layouts depend only on the prompt and the number of heads, never
on the selection: picking a head or a cell changes data, shapes and text only.

>>> view = ii.attention_patterns(model, prompt).show(layer=1, head=3)     # doctest: +SKIP
>>> view.head.value = 2                                     # the heatmap shows L1H2
"""

from __future__ import annotations

import html
import math
from typing import Any

import ipywidgets as widgets
import torch

from ipy_intervene.widgets import heatmap as grid
from ipy_intervene.widgets import labels as ticks
from ipy_intervene.widgets.fit import FitWidth, responsive
from ipy_intervene.widgets.heatmap import static_html
from ipy_intervene.widgets.sweep_view import _slider

CELL_PX = 26          # a query row of the big heatmap, up to MAX_HEIGHT in all
MAX_HEIGHT = 720
TILE_MAX = 32         # thumbnails of longer prompts are max-pooled to this many cells a side
TILE_COLS = 6
TILE_PX = 120
MASKED = "#e8e8e8"    # keys a query cannot see (probability exactly 0 above the diagonal)


def visible(plane: torch.Tensor) -> list[list[float | None]]:
    """A ``[query, key]`` pattern for plotting: None where the key is after the query (in a
    causal pattern) and its probability is exactly 0, so the masked triangle shows."""
    q, k = plane.shape
    future = torch.ones(q, k, dtype=torch.bool).triu(k - q + 1)
    hidden = future & (plane == 0)
    return [[None if h else v for v, h in zip(row, mask)]
            for row, mask in zip(plane.tolist(), hidden.tolist())]


def tiles(planes: torch.Tensor, cols: int) -> tuple[list[list[float | None]],
                                                     list[list[int | None]], int]:
    """Every head's pattern ``[head, query, key]`` tiled into one grid (a blank row and
    column between heads): (values, head of each cell, tile size)."""
    n, q, k = planes.shape
    if max(q, k) > TILE_MAX:
        planes = torch.nn.functional.adaptive_max_pool2d(planes[None], (min(q, TILE_MAX),
                                                                        min(k, TILE_MAX)))[0]
    th, tw = planes.shape[1:]
    rows = math.ceil(n / cols)
    z = torch.full((rows * (th + 1) - 1, cols * (tw + 1) - 1), float("nan"), dtype=torch.float32)
    head = torch.full_like(z, -1)
    for h in range(n):
        r, c = divmod(h, cols)
        z[r * (th + 1): r * (th + 1) + th, c * (tw + 1): c * (tw + 1) + tw] = planes[h]
        head[r * (th + 1): r * (th + 1) + th, c * (tw + 1): c * (tw + 1) + tw] = h
    values = [[None if math.isnan(v) else v for v in row] for row in z.tolist()]
    heads = [[None if v < 0 else int(v) for v in row] for row in head.tolist()]
    return values, heads, max(th, tw)


class AttentionView:
    """Two FigureWidgets (the head, all heads of the layer) and the pickers."""

    def __init__(self, result: Any, layer: int | None = None, head: int | None = None) -> None:
        self.result = result
        self.cols = min(result.n_heads, TILE_COLS)
        self.layer = _slider("layer", [f"L{l}" for l in result.layers])
        self.head = _slider("head", [f"H{h}" for h in range(result.n_heads)])
        self.layer.value = result.layer_index(layer) if layer is not None else \
            len(result.layers) - 1
        self.head.value = result.head_index(head) if head is not None else 0
        q = len(result.query_tokens) - 1
        self.cell = (q, int(self._plane()[q].argmax()))   # (query, key) in the panel
        self.detail = widgets.HTML()
        self.figure = responsive(self._main())
        self.heads = responsive(self._grid())
        self._refresh()
        for picker in (self.layer, self.head):
            picker.observe(lambda change: self._refresh(), names="value")
        self.figure.data[0].on_click(self._on_cell_click)
        self.heads.data[0].on_click(self._on_grid_click)
        self.widget = widgets.VBox([self.figure, FitWidth(), widgets.HBox([self.layer, self.head]),
                                    self.detail, self.heads],
                                   layout=widgets.Layout(width="100%"))

    # -- selection -----------------------------------------------------------------------

    def select(self, layer: int | None = None, head: int | None = None) -> None:
        """Pick a layer and/or head by the model's numbers (as ``result.pattern`` takes)."""
        if layer is not None:
            self.layer.value = self.result.layer_index(layer)
        if head is not None:
            self.head.value = self.result.head_index(head)

    def _plane(self, head: int | None = None) -> torch.Tensor:
        return self.result.patterns[self.layer.value, self.head.value if head is None else head]

    def _on_cell_click(self, trace: Any, points: Any, state: Any) -> None:
        if points.point_inds:
            self.cell = tuple(int(i) for i in points.point_inds[0])
            self._refresh_cell()

    def _on_grid_click(self, trace: Any, points: Any, state: Any) -> None:
        if not points.point_inds:
            return
        row, col = points.point_inds[0]
        size = self._tile + 1
        if row % size == self._tile or col % size == self._tile:
            return  # the gap between two heads
        head = (row // size) * self.cols + col // size
        if head < self.result.n_heads:
            self.head.value = head

    # -- figures -------------------------------------------------------------------------

    def _title(self) -> str:
        layer = self.result.layers[self.layer.value]
        return f"attention pattern of L{layer}H{self.head.value}: query rows, key columns"

    def _heatmap(self) -> Any:
        import plotly.graph_objects as go

        r = self.result
        return go.Heatmap(z=visible(self._plane()), x=r.tokens, y=r.query_tokens,
                          colorscale="Blues", zmin=0.0, zmax=1.0, xgap=1, ygap=1,
                          hoverongaps=False, colorbar=grid.colorbar("probability"),
                          hovertemplate="query %{y} → key %{x}<br>p = %{z:.4f}"
                                        "<extra></extra>")

    def _main(self) -> Any:
        import plotly.graph_objects as go

        r = self.result
        keys, queries = r.tokens, r.query_tokens
        rows = min(len(queries) * CELL_PX, MAX_HEIGHT)
        left, bottom = ticks.left_margin(queries), ticks.bottom_margin(keys)
        fig = go.Figure(self._heatmap())
        fig.update_layout(
            title={"text": self._title(), "x": 0, "xanchor": "left", "font": {"size": 14}},
            xaxis={**ticks.axis(keys, title="key"), "side": "bottom",
                   "constrain": "domain"},
            yaxis={**ticks.axis(queries, title="query"), "tickangle": 0,  # level rows
                   "range": [len(queries) - 0.5, -0.5], "scaleanchor": "x",
                   "constrain": "domain"},
            height=grid.MARGIN["t"] + bottom + max(rows, 160),
            autosize=True, plot_bgcolor=MASKED,
            margin={**grid.MARGIN, "l": left + 24, "b": bottom,
                    "autoexpand": False},
            hoverlabel={"align": "left"})
        return go.FigureWidget(fig)

    def _tile_values(self) -> tuple[list, list]:
        values, heads, self._tile = tiles(self.result.patterns[self.layer.value], self.cols)
        return values, heads

    def _grid(self) -> Any:
        import plotly.graph_objects as go

        values, heads = self._tile_values()
        n_rows = math.ceil(self.result.n_heads / self.cols)
        pooled = max(self.result.patterns.shape[-2:]) > TILE_MAX
        how = " (max over blocks of positions)" if pooled else ""
        heat = go.Heatmap(z=values, customdata=heads, colorscale="Blues", zmin=0.0, zmax=1.0,
                          showscale=False, hoverongaps=False,
                          hovertemplate=f"H%{{customdata}}: p = %{{z:.3f}}{how}<br>click to "
                                        "pick this head<extra></extra>")
        size = self._tile + 1
        axis = {"showticklabels": False, "showgrid": False, "zeroline": False,
                "autorange": False, "fixedrange": True}
        notes = [{"text": f"H{h}", "x": (h % self.cols) * size - 0.5,
                  "y": (h // self.cols) * size - 0.5, "xref": "x", "yref": "y",
                  "xanchor": "left", "yanchor": "top", "showarrow": False,
                  "font": {"size": 10}, "bgcolor": "rgba(255,255,255,0.75)"}
                 for h in range(self.result.n_heads)]
        fig = go.Figure(heat)
        fig.update_layout(
            title={"text": "every head of the layer (click one to pick it)", "x": 0,
                   "xanchor": "left", "font": {"size": 13}},
            xaxis={**axis, "range": [-0.5, len(values[0]) - 0.5], "constrain": "domain"},
            yaxis={**axis, "range": [len(values) - 0.5, -0.5], "scaleanchor": "x",
                   "constrain": "domain"},
            height=60 + n_rows * TILE_PX, autosize=True, annotations=notes,
            margin={"l": 10, "r": 10, "t": 40, "b": 10, "autoexpand": False},
            plot_bgcolor="white")
        return go.FigureWidget(fig)

    def _head_outline(self) -> dict[str, Any]:
        size, h = self._tile + 1, self.head.value
        r, c = divmod(h, self.cols)
        return {"type": "rect", "xref": "x", "yref": "y", "x0": c * size - 0.5,
                "x1": c * size + self._tile - 0.5, "y0": r * size - 0.5,
                "y1": r * size + self._tile - 0.5, "line": grid.HIGHLIGHT_LINE,
                "fillcolor": "rgba(0,0,0,0)", "layer": "above"}

    # -- refresh -------------------------------------------------------------------------

    def _refresh(self) -> None:
        self.figure.data[0].update(z=visible(self._plane()))
        self.figure.layout.title.text = self._title()
        values, heads = self._tile_values()
        self.heads.data[0].update(z=values, customdata=heads)
        self.heads.layout.shapes = [self._head_outline()]
        self._refresh_cell()

    def _refresh_cell(self) -> None:
        q, k = self.cell
        self.figure.layout.shapes = [grid.cell_outline(k, q)]
        self.detail.value = self._detail_html()

    def _detail_html(self) -> str:
        r, (q, k) = self.result, self.cell
        plane = self._plane()
        name = f"L{r.layers[self.layer.value]}H{self.head.value}"
        top = plane[q].topk(min(3, plane.shape[1]))
        best = ", ".join(f"{html.escape(r.tokens[int(i)])} {float(p):.3f}"
                         for p, i in zip(top.values, top.indices))
        rows = [("head", name),
                ("query → key", f"{html.escape(r.query_tokens[q])} → "
                                f"{html.escape(r.tokens[k])}: {float(plane[q, k]):.4f}"),
                (f"{html.escape(r.query_tokens[q])} attends most to", best)]
        cells = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{a}</th>"
                        f"<td>{b}</td></tr>" for a, b in rows)
        return f"<table class='ii-attention-detail'>{cells}</table>"

    # -- display -------------------------------------------------------------------------

    def static_figures(self) -> tuple[Any, Any]:
        """The two figures as they are now (selection included), for HTML and images."""
        import plotly.graph_objects as go

        return go.Figure(self.figure), go.Figure(self.heads)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        bundle = dict(self.widget._repr_mimebundle_(include=include, exclude=exclude) or {})
        main, heads = self.static_figures()
        bundle["text/html"] = static_html(main) + self.detail.value + static_html(heads)
        bundle.update(_images(main))
        bundle["text/plain"] = self.text()
        return bundle

    def text(self) -> str:
        q, k = self.cell
        r = self.result
        return (f"{r!r}\nL{r.layers[self.layer.value]}H{self.head.value}: "
                f"{r.query_tokens[q]} -> {r.tokens[k]} "
                f"{float(self._plane()[q, k]):.4f}")

    def __repr__(self) -> str:
        return f"AttentionView({self.result!r})"


def _images(fig: Any) -> dict[str, str]:
    """``image/svg+xml`` of the figure where :mod:`ipy_intervene.widgets.static` exists."""
    try:
        from ipy_intervene.widgets.static import images
    except ImportError:
        return {}
    return images(fig)
