"""Sweep view: the heatmap as a live plotly FigureWidget, with layer/position (and head)
sliders linked to a highlighted cell, click-to-select, a detail panel and a line plot of the
chosen position across layers.

>>> view = SweepView(result)            # doctest: +SKIP
>>> view.layer.value = 2                # moves the highlight, the line plot and the details
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets
import torch

from ipy_intervene.widgets.heatmap import static_html

HIGHLIGHT = {"symbol": "square-open", "size": 22, "color": "black", "line": {"width": 3}}


class SweepView:
    """One FigureWidget (heatmap + line plot), updated in place as the sliders move."""

    def __init__(self, result: Any, top_k: int = 5) -> None:
        self.result, self.top_k = result, top_k
        self.has_pos = "pos" in result.dims
        self.has_head = "head" in result.dims
        self.layer = _slider("layer", len(result.layers))
        self.pos = _slider("position", len(result.positions)) if self.has_pos else None
        self.head = _slider("head", len(result.heads)) if self.has_head else None
        self.detail = widgets.HTML()
        self.figure = self._figure()
        self._top_cache: dict[tuple[int, ...], list[tuple[str, float]]] = {}
        start = self._strongest()
        self.select(**start)
        for slider in self.sliders:
            slider.observe(self._on_slider, names="value")
        self.figure.data[0].on_click(self._on_click)
        self.widget = widgets.VBox([self.figure, widgets.HBox(self.sliders), self.detail])

    @property
    def sliders(self) -> list[widgets.IntSlider]:
        return [s for s in (self.layer, self.pos, self.head) if s is not None]

    # -- selection -----------------------------------------------------------------------

    def select(self, layer: int, pos: int | None = None, head: int | None = None) -> None:
        """Select a cell by grid index (not layer number): sliders, highlight and details."""
        with self.figure.batch_update():
            for slider, value in ((self.layer, layer), (self.pos, pos), (self.head, head)):
                if slider is not None and value is not None:
                    slider.value = value
        self._refresh()

    def index(self) -> tuple[int, ...]:
        """The selected cell's grid index, in the result's dims order."""
        chosen = {"layer": self.layer.value,
                  "pos": self.pos.value if self.pos else None,
                  "head": self.head.value if self.head else None}
        return tuple(chosen[d] for d in self.result.dims)

    def _strongest(self) -> dict[str, int]:
        flat = int(self.result.values.abs().nan_to_num(0.0).flatten().argmax())
        index = torch.unravel_index(torch.tensor(flat), self.result.values.shape)
        return {d: int(i) for d, i in zip(self.result.dims, index)}

    def _on_slider(self, change: dict) -> None:
        self._refresh()

    def _on_click(self, trace: Any, points: Any, state: Any) -> None:
        if not points.point_inds:
            return
        row, col = points.point_inds[0]
        if self.has_pos:
            self.select(layer=row, pos=col)
        else:
            self.select(layer=row, head=col)

    # -- drawing -------------------------------------------------------------------------

    def _plane(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, raw) of the heatmap: [layer, pos] or [layer, head] (at the chosen head)."""
        r = self.result
        if r.dims == ("layer", "pos", "head"):
            return r.values[:, :, self.head.value], r.raw[:, :, self.head.value]
        return r.values, r.raw

    def _x_labels(self) -> list[str]:
        r = self.result
        if self.has_pos:
            return [r.tokens[p] for p in r.positions]
        return [f"H{h}" for h in r.heads]

    def _figure(self) -> Any:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        from ipy_intervene.widgets.heatmap import sweep_heatmap

        base = sweep_heatmap(self.result)
        fig = make_subplots(rows=1, cols=2, column_widths=[0.72, 0.28], horizontal_spacing=0.1,
                            subplot_titles=("", "across layers"))
        heat = base.data[0]
        values, raw = self._plane()
        heat.update(z=values.tolist(), customdata=raw.tolist(), x=self._x_labels(),
                    colorbar={"x": 0.64, "title": {"text": "effect"}})
        fig.add_trace(heat, row=1, col=1)
        fig.add_trace(go.Scatter(x=[], y=[], mode="markers", marker=HIGHLIGHT, hoverinfo="skip",
                                 showlegend=False), row=1, col=1)
        fig.add_trace(go.Scatter(x=[], y=[f"L{l}" for l in self.result.layers],
                                 mode="lines+markers", showlegend=False,
                                 line={"color": "#444"}), row=1, col=2)
        fig.update_layout(title=base.layout.title, height=base.layout.height,
                          margin=base.layout.margin)
        fig.update_xaxes(type="category", title_text=base.layout.xaxis.title.text, row=1, col=1)
        fig.update_yaxes(type="category", title_text="layer", row=1, col=1)
        fig.update_yaxes(type="category", row=1, col=2)
        fig.update_xaxes(title_text="effect", zeroline=True, row=1, col=2)
        return go.FigureWidget(fig)

    def _refresh(self) -> None:
        r, layer = self.result, self.layer.value
        values, raw = self._plane()
        column = self.pos.value if self.has_pos else self.head.value
        x = self._x_labels()
        with self.figure.batch_update():
            heat, mark, line = self.figure.data
            if self.has_head and self.has_pos:
                heat.z, heat.customdata = values.tolist(), raw.tolist()
            mark.x, mark.y = [x[column]], [f"L{r.layers[layer]}"]
            line.x = values[:, column].tolist()
            line.name = x[column]
            self.figure.layout.annotations[-1].text = f"{x[column]} across layers"
        self.detail.value = self._detail_html()

    def _detail_html(self) -> str:
        r, index = self.result, self.index()
        cell = r._cell_at(index)
        where = ", ".join(f"{k} {html.escape(str(v))}" for k, v in cell.items() if k != "value")
        rows = [("cell", where), ("effect (normalised)", f"{float(r.values[index]):.4f}"),
                (f"{r.metric} under the patch", f"{float(r.raw[index]):.4f}"),
                (f"{r.metric}: clean / corrupted", f"{r.clean:.4f} / {r.corrupted:.4f}")]
        top = self._top_tokens(index)
        if top:
            rows.append((f"top {len(top)} next tokens (prompt 0)",
                         ", ".join(f"{html.escape(repr(t))} {p:.3f}" for t, p in top)))
        cells = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{k}</th>"
                        f"<td>{v}</td></tr>" for k, v in rows)
        return f"<table class='ii-sweep-detail'>{cells}</table>"

    def _top_tokens(self, index: tuple[int, ...]) -> list[tuple[str, float]]:
        patcher = self.result.patcher
        if patcher is None:
            return []
        if index not in self._top_cache:
            self._top_cache[index] = patcher.top_tokens(index, self.top_k)
        return self._top_cache[index]

    # -- display -------------------------------------------------------------------------

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        bundle = dict(self.widget._repr_mimebundle_(include=include, exclude=exclude) or {})
        bundle["text/html"] = static_html(self.result.figure()) + self.detail.value
        bundle["text/plain"] = repr(self.result)
        return bundle


def _slider(name: str, size: int) -> widgets.IntSlider:
    return widgets.IntSlider(value=0, min=0, max=max(size - 1, 0), description=name,
                             continuous_update=False, disabled=size < 2)
