"""Sweep view: the heatmap as a live plotly FigureWidget, with layer/position (and head)
sliders linked to a highlighted cell, click-to-select, a detail panel and a line plot of the
chosen column across layers.

The layout never depends on the selection (see :mod:`ipy_intervene.widgets.heatmap`): a
selection changes data, tick text and shapes only, so the plot stays where the pointer is.

>>> view = SweepView(result)            # doctest: +SKIP
>>> view.layer.value = 2                # moves the highlight, the line plot and the details
"""

from __future__ import annotations

import html
from typing import Any, Sequence

import ipywidgets as widgets
import torch

from ipy_intervene.widgets import heatmap as grid
from ipy_intervene.widgets.fit import FitWidth, responsive
from ipy_intervene.widgets.heatmap import number, static_html

HEAT_DOMAIN, LINE_DOMAIN = [0.0, 0.66], [0.76, 1.0]
DASH = {"color": "#999", "width": 1, "dash": "dot"}


class SweepView:
    """One FigureWidget (heatmap + line plot), updated in place as the sliders move."""

    def __init__(self, result: Any, top_k: int = 5) -> None:
        self.result, self.top_k = result, top_k
        self.has_pos = "pos" in result.dims
        self.has_head = "head" in result.dims
        self.row_dim = result.dims[0]            # "layer", or "latent" for a latent site
        self.row_index = shown_rows(result)      # grid rows drawn (the strongest latents)
        self.rows = [row_labels(result)[i] for i in self.row_index]
        self.note = "" if len(self.row_index) == result.values.shape[0] else (
            f"; the {len(self.row_index)} of {result.values.shape[0]} latents with the "
            "largest effect")
        self.layer = _slider(self.row_dim, self.rows)
        self.pos = _slider("position", [result.tokens[p] for p in result.positions]) \
            if self.has_pos else None
        self.head = _slider("head", [f"H{h}" for h in result.heads]) if self.has_head else None
        self.subject = grid.subject_positions(result)
        self.detail = widgets.HTML()
        self._selecting = False
        self.figure = self._figure()
        self._top_cache: dict[tuple[int, ...], list[tuple[str, float]]] = {}
        self.select(**self._strongest())
        for slider in self.sliders:
            slider.observe(self._on_slider, names="value")
        self.figure.data[0].on_click(self._on_click)
        self.widget = widgets.VBox([self.figure, FitWidth(), widgets.HBox(self.sliders), self.detail],
                                   layout=widgets.Layout(width="100%"))

    @property
    def sliders(self) -> list[widgets.SelectionSlider]:
        return [s for s in (self.layer, self.pos, self.head) if s is not None]

    # -- selection -----------------------------------------------------------------------

    def select(self, layer: int, pos: int | None = None, head: int | None = None) -> None:
        """Select a cell by grid index (not layer number): sliders, highlight and details."""
        self._selecting = True
        try:
            for slider, value in ((self.layer, layer), (self.pos, pos), (self.head, head)):
                if slider is not None and value is not None:
                    slider.value = value
        finally:
            self._selecting = False
        self._refresh()

    def index(self) -> tuple[int, ...]:
        """The selected cell's grid index, in the result's dims order."""
        chosen = {self.row_dim: self.row_index[self.layer.value],
                  "pos": self.pos.value if self.pos else None,
                  "head": self.head.value if self.head else None}
        return tuple(chosen[d] for d in self.result.dims)

    def _strongest(self) -> dict[str, int]:
        flat = int(self.result.values.abs().nan_to_num(0.0).flatten().argmax())
        index = torch.unravel_index(torch.tensor(flat), self.result.values.shape)
        found = {"layer" if d == self.row_dim else d: int(i)
                 for d, i in zip(self.result.dims, index)}
        row = found["layer"]
        found["layer"] = self.row_index.index(row) if row in self.row_index else 0
        return found

    def _on_slider(self, change: dict) -> None:
        if not self._selecting:  # select() refreshes once, after all its sliders moved
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
        if self.row_dim == "latent":
            return r.values[self.row_index], r.raw[self.row_index]
        return r.values, r.raw

    def _x_labels(self) -> list[str]:
        r = self.result
        if self.has_pos:
            return [r.tokens[p] for p in r.positions]
        return [f"H{h}" for h in r.heads]

    def _figure(self) -> Any:
        import plotly.graph_objects as go

        r, x = self.result, self._x_labels()
        y = self.rows
        values, raw = self._plane()
        limit = float(r.values.abs().nan_to_num(0.0).max()) or 1.0
        fig = go.Figure([
            go.Heatmap(z=values.tolist(), customdata=raw.tolist(), x=x, y=y, colorscale="RdBu",
                       zmid=0.0, zmin=-limit, zmax=limit, xgap=1, ygap=1,
                       colorbar=grid.colorbar("effect"),
                       hovertemplate=grid.hover(r).replace("layer %{y}", f"{self.row_dim} %{{y}}")),
            go.Scatter(x=[], y=[], mode="markers", hoverinfo="skip", showlegend=False,
                       marker={"opacity": 0}),  # the selected cell (drawn as a shape)
            go.Scatter(x=[], y=y, xaxis="x2", yaxis="y2", mode="lines+markers",
                       showlegend=False, line={"color": "#444"},
                       hovertemplate="%{y}: %{x:.4f}<extra></extra>")])
        x_title = "position" if self.has_pos else "head"
        layout = grid.grid_layout(x, y, title=(grid.sweep_title(r) + self.note), x_title=x_title)
        layout["xaxis"].update(domain=HEAT_DOMAIN, anchor="y")
        layout["xaxis2"] = {"domain": LINE_DOMAIN, "anchor": "y2", "range": _line_range(r),
                            "autorange": False, "automargin": False, "zeroline": False,
                            "title": {"text": "effect", "standoff": 6},
                            "tickfont": {"size": grid.FONT_PX}}
        layout["yaxis"]["title"] = {"text": self.row_dim, "standoff": 6}
        layout["yaxis2"] = {**grid.category_axis(y), "anchor": "x2", "matches": "y"}
        layout["annotations"] = [{"text": "", "xref": "paper", "yref": "paper",
                                  "x": LINE_DOMAIN[0], "y": 1.0, "xanchor": "left",
                                  "yanchor": "bottom", "showarrow": False,
                                  "font": {"size": 12}}]
        fig.update_layout(layout)
        return responsive(go.FigureWidget(fig))

    def _refresh(self) -> None:
        r, layer = self.result, self.layer.value
        values, raw = self._plane()
        column = self.pos.value if self.has_pos else self.head.value
        x = self._x_labels()
        heat, mark, line = self.figure.data
        # One restyle per trace: a batch over several traces resets the properties one
        # trace changes and another does not (the heatmap's x went null: one row, one tick).
        if self.has_head and self.has_pos:
            heat.update(z=values.tolist(), customdata=raw.tolist())
        mark.update(x=[x[column]], y=[self.rows[layer]])
        line.update(x=values[:, column].tolist(), name=x[column])
        vals, text = grid.tick_text(x, selected=column, marked=self.subject)
        title = (grid.sweep_title(r) + self.note) + (f"; head H{r.heads[self.head.value]}"
                                       if self.has_head and self.has_pos else "")
        with self.figure.batch_update():  # layout only: one relayout
            layout = self.figure.layout
            layout.title.text = title
            layout.xaxis.update(tickvals=vals, ticktext=text)
            layout.shapes = self._shapes(layer, column)
            layout.annotations[0].text = f"{html.escape(x[column])} across {self.row_dim}s"
        self.detail.value = self._detail_html()

    def _shapes(self, layer: int, column: int) -> list[dict[str, Any]]:
        """The selected cell (and, for causal tracing, the layers it restores together),
        and the corrupted (0) and clean (1) lines of the line plot."""
        r = self.result
        low, rows = layer, 1
        window = r.extra.get("window", 1)
        if r.method == "noise" and window > 1:
            low = max(0, layer - window // 2)
            rows = min(len(r.layers), layer - (-window // 2)) - low
        shapes = [grid.cell_outline(column, low, rows=rows)]
        if rows > 1:  # the cell itself, inside its window
            shapes.append({**grid.cell_outline(column, layer), "line": {"color": "black",
                                                                       "width": 1}})
        for value in (0.0, 1.0):
            shapes.append({"type": "line", "xref": "x2", "yref": "y2 domain", "x0": value,
                           "x1": value, "y0": 0, "y1": 1, "line": DASH, "layer": "below"})
        return shapes

    def _detail_html(self) -> str:
        r, index = self.result, self.index()
        cell = r._cell_at(index)
        where = ", ".join(f"{k} {html.escape(str(v))}" for k, v in cell.items() if k != "value")
        rows = [("cell", where), *self._value_rows(index),
                (f"{r.metric}: clean / corrupted", f"{number(r.clean)} / {number(r.corrupted)}")]
        if self.subject:
            subject = ", ".join(r.tokens[r.positions[i]] for i in self.subject)
            rows.append(("subject (noised)", html.escape(subject)))
        top = self._top_tokens(index)
        if top:
            rows.append((self._top_label(len(top)),
                         ", ".join(f"{html.escape(repr(t))} {p:.3f}" for t, p in top)))
        cells = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{k}</th>"
                        f"<td>{v}</td></tr>" for k, v in rows)
        return f"<table class='ii-sweep-detail'>{cells}</table>"

    def _value_rows(self, index: tuple[int, ...]) -> list[tuple[str, str]]:
        r = self.result
        value, raw = number(float(r.values[index])), number(float(r.raw[index]))
        if r.method == "attribution":
            return [("effect (normalised), linear estimate", value),
                    (f"{r.metric}, linear estimate (gradient x difference)", raw)]
        run = ("restoring this cell in the noised runs (mean over samples)"
               if r.method == "noise" else "in the patched run")
        return [("effect (normalised)", value), (f"{r.metric} {run}", raw)]

    def _top_label(self, k: int) -> str:
        method = self.result.method
        if method == "noise":
            return f"top {k} next tokens, restored run (prompt 0, mean over noise samples)"
        exact = ", exact patched run, not the estimate" if method == "attribution" else \
            ", patched run"
        return f"top {k} next tokens{exact} (prompt 0)"

    def _top_tokens(self, index: tuple[int, ...]) -> list[tuple[str, float]]:
        patcher = self.result.patcher
        if patcher is None:
            return []
        if index not in self._top_cache:
            self._top_cache[index] = patcher.top_tokens(index, self.top_k)
        return self._top_cache[index]

    # -- display -------------------------------------------------------------------------

    def static_figure(self) -> Any:
        """The figure as it is now (selection included), for HTML and images."""
        import plotly.graph_objects as go

        return go.Figure(self.figure)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        bundle = dict(self.widget._repr_mimebundle_(include=include, exclude=exclude) or {})
        fig = self.static_figure()
        bundle["text/html"] = static_html(fig) + self.detail.value
        bundle.update(_images(fig))
        bundle["text/plain"] = repr(self.result)
        return bundle


MAX_LATENT_ROWS = 40   # a latent grid draws its strongest rows: 16k SAE latents do not fit


def shown_rows(result: Any, limit: int = MAX_LATENT_ROWS) -> list[int]:
    """The grid rows a view draws: every layer; for a latent site, at most ``limit`` latents,
    those farthest from the unpatched value anywhere (in grid order)."""
    rows = result.values.shape[0]
    if result.dims[0] != "latent" or rows <= limit:
        return list(range(rows))
    effect = (result.values - result.unpatched).nan_to_num(0.0).abs().amax(1)
    return sorted(effect.argsort(descending=True, stable=True)[:limit].tolist())


def row_labels(result: Any) -> list[str]:
    """The heatmap's rows: layers (``L2``), or latents (``#12``) for a latent site."""
    if result.dims[0] == "latent":
        return [f"#{j}" for j in result.latents]
    return [f"L{l}" for l in result.layers]


def _line_range(result: Any) -> list[float]:
    """A fixed effect axis for the line plot: 0 (corrupted) and 1 (clean) always in view."""
    finite = result.values[torch.isfinite(result.values)]
    low = min(0.0, float(finite.min())) if finite.numel() else 0.0
    high = max(1.0, float(finite.max())) if finite.numel() else 1.0
    pad = 0.06 * (high - low)
    return [low - pad, high + pad]


def _slider(name: str, labels: Sequence[str]) -> widgets.SelectionSlider:
    """A slider over grid indices whose readout is the label (``John (10)``, ``L2``)."""
    options = [(f"{label}", i) for i, label in enumerate(labels)] or [("-", 0)]
    return widgets.SelectionSlider(options=options, value=0, description=name,
                                   continuous_update=False, disabled=len(labels) < 2,
                                   layout=widgets.Layout(width="auto", min_width="260px"))


def _images(fig: Any) -> dict[str, str]:
    """Static images of the figure (``image/svg+xml``) where the renderer is installed."""
    try:
        from ipy_intervene.widgets.static import images
    except ImportError:  # not built yet: the bundle still has text/html and text/plain
        return {}
    return images(fig)
