"""Lens view: top-1 token of every (layer, position) as a heatmap of its probability, with
layer/position sliders and the top-k tokens of the selected cell.

The layout is fixed per grid (see :mod:`ipy_intervene.widgets.heatmap`); the words are
written in the cells while the cells are wide enough to read them (hover always has them).

>>> view = ii.lens(model, prompt).show()     # doctest: +SKIP
>>> view.pos.value = 3
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets

from ipy_intervene.widgets import heatmap as grid
from ipy_intervene.widgets.fit import FitWidth, responsive
from ipy_intervene.widgets.heatmap import static_html
from ipy_intervene.widgets.sweep_view import _images, _slider

IN_CELL_MAX = 24     # positions up to which the top-1 word is written in its cell
IN_CELL_CHARS = 6


class LensView:
    """One FigureWidget, updated in place; click a cell to select it."""

    def __init__(self, result: Any, k: int = 5) -> None:
        self.result, self.k = result, k
        self.layer = _slider("layer", [f"L{l}" for l in result.layers])
        self.pos = _slider("position", result.tokens)
        self.layer.value, self.pos.value = len(result.layers) - 1, len(result.tokens) - 1
        self.detail = widgets.HTML()
        self.figure = self._figure()
        self._refresh()
        for slider in (self.layer, self.pos):
            slider.observe(lambda change: self._refresh(), names="value")
        self.figure.data[0].on_click(self._on_click)
        self.widget = widgets.VBox([self.figure, FitWidth(), widgets.HBox([self.layer, self.pos]),
                                    self.detail], layout=widgets.Layout(width="100%"))

    def _top1(self) -> tuple[list[list[float]], list[list[str]]]:
        best = self.result.probs.max(-1)
        words = [[self.result.decode([int(i)]).strip() or repr(self.result.decode([int(i)]))
                  for i in row] for row in best.indices]
        return best.values.tolist(), words

    def static_figure(self) -> Any:
        """The heatmap with the selected cell outlined (for HTML and images)."""
        import plotly.graph_objects as go

        fig = go.Figure(self._heatmap())
        fig.update_layout(self._layout())
        fig.update_layout(shapes=self._shapes())
        return fig

    def _heatmap(self) -> Any:
        import plotly.graph_objects as go

        probs, words = self._top1()
        r = self.result
        in_cell = len(r.tokens) <= IN_CELL_MAX
        cells = [[grid.short(w, IN_CELL_CHARS) for w in row] for row in words]
        return go.Heatmap(z=probs, x=r.tokens, y=[f"L{l}" for l in r.layers], text=cells,
                          customdata=words, texttemplate="%{text}" if in_cell else "",
                          textfont={"size": 10}, colorscale="Blues", zmin=0, zmax=1,
                          xgap=1, ygap=1, colorbar=grid.colorbar("p(top-1)"),
                          hovertemplate="layer %{y}, position %{x}<br>top-1 "
                                        "%{customdata}: %{z:.3f}<extra></extra>")

    def _layout(self) -> dict[str, Any]:
        r = self.result
        y = [f"L{l}" for l in r.layers]
        return grid.grid_layout(r.tokens, y, title="logit lens: top-1 token after each layer",
                                x_title="position")

    def _shapes(self) -> list[dict[str, Any]]:
        return [grid.cell_outline(self.pos.value, self.layer.value)]

    def _figure(self) -> Any:
        import plotly.graph_objects as go

        fig = go.Figure([self._heatmap(),
                         go.Scatter(x=[], y=[], mode="markers", hoverinfo="skip",
                                    showlegend=False, marker={"opacity": 0})])
        fig.update_layout(self._layout())
        return responsive(go.FigureWidget(fig))

    def _on_click(self, trace: Any, points: Any, state: Any) -> None:
        if points.point_inds:
            row, col = points.point_inds[0]
            self.layer.value, self.pos.value = row, col

    def _refresh(self) -> None:
        layer, pos = self.layer.value, self.pos.value
        tokens = self.result.tokens
        self.figure.data[1].update(x=[tokens[pos]], y=[f"L{self.result.layers[layer]}"])
        vals, text = grid.tick_text(tokens, selected=pos)
        with self.figure.batch_update():  # layout only: one relayout
            self.figure.layout.xaxis.update(tickvals=vals, ticktext=text)
            self.figure.layout.shapes = self._shapes()
        self.detail.value = self._detail_html(layer, pos)

    def _detail_html(self, layer: int, pos: int) -> str:
        rows = "".join(f"<tr><td>{html.escape(repr(t))}</td><td>{p:.3f}</td></tr>"
                       for t, p in self.result.top(layer, pos, self.k))
        where = html.escape(f"layer {self.result.layers[layer]}, {self.result.tokens[pos]}")
        return (f"<div class='ii-lens-detail'><b>top {self.k} after {where}</b>"
                f"<table>{rows}</table></div>")

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        bundle = dict(self.widget._repr_mimebundle_(include=include, exclude=exclude) or {})
        fig = self.static_figure()
        bundle["text/html"] = static_html(fig) + self.detail.value
        bundle.update(_images(fig))
        bundle["text/plain"] = repr(self.result)
        return bundle
