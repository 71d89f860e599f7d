"""Lens view: top-1 token of every (layer, position) as a heatmap of its probability, with
layer/position sliders and the top-k tokens of the selected cell.

>>> view = ii.lens(model, prompt).show()     # doctest: +SKIP
>>> view.pos.value = 3
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets

from ipy_intervene.widgets.heatmap import static_html
from ipy_intervene.widgets.sweep_view import HIGHLIGHT, _slider


class LensView:
    """One FigureWidget, updated in place; click a cell to select it."""

    def __init__(self, result: Any, k: int = 5) -> None:
        self.result, self.k = result, k
        self.layer = _slider("layer", len(result.layers))
        self.pos = _slider("position", len(result.tokens))
        self.layer.value, self.pos.value = len(result.layers) - 1, len(result.tokens) - 1
        self.detail = widgets.HTML()
        self.figure = self._figure()
        self._refresh()
        for slider in (self.layer, self.pos):
            slider.observe(lambda change: self._refresh(), names="value")
        self.figure.data[0].on_click(self._on_click)
        self.widget = widgets.VBox([self.figure, widgets.HBox([self.layer, self.pos]),
                                    self.detail])

    def _top1(self) -> tuple[list[list[float]], list[list[str]]]:
        best = self.result.probs.max(-1)
        words = [[self.result.decode([int(i)]).strip() or "·" for i in row]
                 for row in best.indices]
        return best.values.tolist(), words

    def static_figure(self) -> Any:
        import plotly.graph_objects as go

        probs, words = self._top1()
        heat = go.Heatmap(z=probs, x=self.result.tokens, y=[f"L{l}" for l in self.result.layers],
                          text=words, texttemplate="%{text}", colorscale="Blues", zmin=0,
                          zmax=1, colorbar={"title": {"text": "p(top-1)"}},
                          hovertemplate="%{y} %{x}<br>%{text}: %{z:.3f}<extra></extra>")
        fig = go.Figure(heat)
        fig.update_layout(title={"text": "logit lens: top-1 token after each layer"},
                          xaxis={"type": "category", "title": {"text": "position"}},
                          yaxis={"type": "category", "title": {"text": "layer"}},
                          height=200 + 30 * len(self.result.layers),
                          margin={"l": 60, "r": 20, "t": 50, "b": 60})
        return fig

    def _figure(self) -> Any:
        import plotly.graph_objects as go

        fig = go.FigureWidget(self.static_figure())
        fig.add_trace(go.Scatter(x=[], y=[], mode="markers", marker=HIGHLIGHT,
                                 hoverinfo="skip", showlegend=False))
        return fig

    def _on_click(self, trace: Any, points: Any, state: Any) -> None:
        if points.point_inds:
            row, col = points.point_inds[0]
            self.layer.value, self.pos.value = row, col

    def _refresh(self) -> None:
        layer, pos = self.layer.value, self.pos.value
        with self.figure.batch_update():
            mark = self.figure.data[1]
            mark.x, mark.y = [self.result.tokens[pos]], [f"L{self.result.layers[layer]}"]
        self.detail.value = self._detail_html(layer, pos)

    def _detail_html(self, layer: int, pos: int) -> str:
        rows = "".join(f"<tr><td>{html.escape(repr(t))}</td><td>{p:.3f}</td></tr>"
                       for t, p in self.result.top(layer, pos, self.k))
        where = html.escape(f"layer {self.result.layers[layer]}, {self.result.tokens[pos]}")
        return (f"<div class='ii-lens-detail'><b>top {self.k} after {where}</b>"
                f"<table>{rows}</table></div>")

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        bundle = dict(self.widget._repr_mimebundle_(include=include, exclude=exclude) or {})
        bundle["text/html"] = static_html(self.static_figure()) + self.detail.value
        bundle["text/plain"] = repr(self.result)
        return bundle
