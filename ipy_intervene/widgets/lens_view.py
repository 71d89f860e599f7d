"""Lens view: top-1 token of every (layer, position) as a heatmap of its probability, with
layer/position sliders and the top-k tokens of the selected cell. The bottom row, ``embed``,
is the stream entering block 0 (the embeddings alone) read the same way, where the lens has it.

The layout is fixed per grid (see :mod:`ipy_intervene.widgets.heatmap`); the words are
written in the cells while the cells are wide enough to read them (hover always has them).

>>> view = ii.lens(model, prompt).show()     # doctest: +SKIP
>>> view.pos.value = 3
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets
import torch

from ipy_intervene.widgets import heatmap as grid
from ipy_intervene.widgets import labels as ticks
from ipy_intervene.widgets.fit import FitWidth, responsive
from ipy_intervene.widgets.heatmap import static_html
from ipy_intervene.widgets.sweep_view import _images, _slider

IN_CELL_MAX = 24     # positions up to which the top-1 word is written in its cell
IN_CELL_CHARS = 6


class LensView:
    """One FigureWidget, updated in place; click a cell to select it."""

    def __init__(self, result: Any, k: int = 5) -> None:
        self.result, self.k = result, k
        self.embed = getattr(result, "embedding", None) is not None
        self.layer = _slider("layer", self._rows())
        if self.embed:   # slider values: "embed", then the indices into result.layers
            self.layer.options = [("embed", "embed")] + [
                (f"L{l}", i) for i, l in enumerate(result.layers)]
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

    def _rows(self) -> list[str]:
        """The heatmap's rows, bottom up: ``embed`` (where the lens has it), then the layers."""
        return (["embed"] if self.embed else []) + [f"L{l}" for l in self.result.layers]

    def _row_label(self, layer: Any) -> str:
        return "embed" if layer == "embed" else f"L{self.result.layers[layer]}"

    def _top1(self) -> tuple[list[list[float]], list[list[str]]]:
        probs = self.result.probs
        if self.embed:
            probs = torch.cat([self.result.embedding[None], probs])
        best = probs.max(-1)
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
        return go.Heatmap(z=probs, x=r.tokens, y=self._rows(), text=cells,
                          customdata=words, texttemplate="%{text}" if in_cell else "",
                          textfont={"size": 10}, colorscale="Blues", zmin=0, zmax=1,
                          xgap=1, ygap=1, colorbar=grid.colorbar("p(top-1)"),
                          hovertemplate="layer %{y}, position %{x}<br>top-1 "
                                        "%{customdata}: %{z:.3f}<extra></extra>")

    def _layout(self) -> dict[str, Any]:
        r = self.result
        layout = grid.grid_layout(r.tokens, self._rows(),
                                  title="logit lens: top-1 token after each layer",
                                  x_title="position")
        bottom = ticks.bottom_margin(r.tokens)
        layout["xaxis"] = ticks.axis(r.tokens, title="position")
        layout["margin"]["b"] = bottom
        if self.embed:   # room for the longer row label
            layout["margin"]["l"] = grid.MARGIN["l"] + 12
        layout["height"] += bottom - grid.bottom_margin(r.tokens)
        return layout

    def _shapes(self) -> list[dict[str, Any]]:
        return [grid.cell_outline(self.pos.value, self._rows().index(
            self._row_label(self.layer.value)))]

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
            if self.embed:   # row 0 is the embedding row
                self.layer.value = "embed" if row == 0 else row - 1
            else:
                self.layer.value = row
            self.pos.value = col

    def _refresh(self) -> None:
        layer, pos = self.layer.value, self.pos.value
        tokens = self.result.tokens
        self.figure.data[1].update(x=[tokens[pos]], y=[self._row_label(layer)])
        vals, text = ticks.tick_text(tokens, selected=pos)
        with self.figure.batch_update():  # layout only: one relayout
            self.figure.layout.xaxis.update(tickvals=vals, ticktext=text)
            self.figure.layout.shapes = self._shapes()
        self.detail.value = self._detail_html(layer, pos)

    def _detail_html(self, layer: int, pos: int) -> str:
        rows = "".join(f"<tr><td>{html.escape(repr(t))}</td><td>{p:.3f}</td></tr>"
                       for t, p in self.result.top(layer, pos, self.k))
        row = "the embeddings" if layer == "embed" else f"layer {self.result.layers[layer]}"
        where = html.escape(f"{row}, {self.result.tokens[pos]}")
        return (f"<div class='ii-lens-detail'><b>top {self.k} after {where}</b>"
                f"<table>{rows}</table></div>")

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        bundle = dict(self.widget._repr_mimebundle_(include=include, exclude=exclude) or {})
        fig = self.static_figure()
        bundle["text/html"] = static_html(fig) + self.detail.value
        bundle.update(_images(fig))
        bundle["text/plain"] = repr(self.result)
        return bundle
