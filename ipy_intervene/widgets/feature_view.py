"""Feature view: a latent's top activating tokens over a prompt set (bars, each labelled
with its context), and the latent x position grid of one prompt (heatmap, the selected
latent's row outlined), with a latent picker and a prompt slider; a static SVG image too.

>>> view = ii.feature_activations(model, model.transformer.h[2].sae, prompts).show(latent=43)
>>> view.latent.value = 50          # doctest: +SKIP
"""

from __future__ import annotations

import html
from typing import Any, Sequence

import ipywidgets as widgets

from ipy_intervene.widgets import heatmap as grid
from ipy_intervene.widgets.fit import FitWidth, responsive
from ipy_intervene.widgets.heatmap import static_html
from ipy_intervene.widgets.sweep_view import _images

ROWS = 12            # latents in the grid by default
BAR_CHARS = 26       # characters of a bar's context label
HEIGHT = 720


class FeatureView:
    """One FigureWidget (bars on top, grid below), updated in place by the pickers."""

    def __init__(self, result: Any, *, latent: int | None = None, prompt: int = 0, k: int = 10,
                 rows: Sequence[int] | None = None) -> None:
        self.result, self.k = result, k
        result.of_prompt(prompt)  # a clear error for a prompt out of range
        self.fixed_rows = None if rows is None else [int(r) for r in rows]
        for r in self.fixed_rows or []:
            result.column(r)
        if latent is None:
            first = result.strongest(prompt, 1) or result.latents[:1]
            latent = first[0]
        result.column(latent)
        self.latent = widgets.Dropdown(options=[(f"latent {j}", j) for j in result.latents],
                                       value=latent, description="latent",
                                       layout=widgets.Layout(width="220px"))
        self.prompt = widgets.IntSlider(value=prompt % len(result.tokens), min=0,
                                        max=len(result.tokens) - 1, description="prompt",
                                        continuous_update=False,
                                        disabled=len(result.tokens) < 2)
        self.detail = widgets.HTML()
        self.figure = responsive(_as_widget(self.static_figure()))
        self._refresh()
        for picker in (self.latent, self.prompt):
            picker.observe(lambda change: self._refresh(), names="value")
        self.widget = widgets.VBox([self.figure, FitWidth(),
                                    widgets.HBox([self.latent, self.prompt]), self.detail],
                                   layout=widgets.Layout(width="100%"))

    # -- data ------------------------------------------------------------------------------

    def rows(self) -> list[int]:
        """The grid's latents: the fixed ones, or the strongest in the prompt, with the
        selected latent always among them."""
        chosen = list(self.fixed_rows or self.result.strongest(self.prompt.value, ROWS))
        if self.latent.value not in chosen:
            chosen = [self.latent.value] + chosen[: ROWS - 1]
        return chosen

    def static_figure(self) -> Any:
        """The whole view as one plotly figure (for HTML and the SVG image)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=2, cols=1, row_heights=[0.4, 0.6], vertical_spacing=0.24,
                            subplot_titles=self._titles())
        fig.add_trace(go.Bar(**self._bars()), row=1, col=1)
        fig.add_trace(go.Heatmap(**self._grid()), row=2, col=1)
        fig.update_layout(**self._layout())
        return fig

    def _titles(self) -> tuple[str, str]:
        j, p = self.latent.value, self.prompt.value
        n = len(self.result.tokens)
        return (f"latent {j}: top {self.k} activations over {n} prompt{'s' * (n != 1)}",
                f"prompt {p}: latents x positions")

    def _bars(self) -> dict[str, Any]:
        top = self.result.top_tokens(self.latent.value, self.k)
        labels = [f"{_tail(t.context)} · p{t.prompt}" for t in top] or ["(never fires)"]
        return {"x": labels, "y": [t.value for t in top] or [0.0], "showlegend": False,
                "marker": {"color": "#2166ac"},
                "hovertemplate": "%{x}<br>activation %{y:.4f}<extra></extra>"}

    def _grid(self) -> dict[str, Any]:
        p = self.prompt.value
        values = self.result.of_prompt(p)
        rows = self.rows()
        z = [values[:, self.result.column(j)].tolist() for j in rows]
        top = max((max(r) for r in z), default=0.0) or 1.0
        return {"z": z, "x": self._positions(), "y": [f"latent {j}" for j in rows],
                "colorscale": "Blues", "zmin": 0.0, "zmax": top, "xgap": 1, "ygap": 1,
                "colorbar": {**grid.colorbar("activation"), "len": 0.55, "y": 0.0,
                             "yanchor": "bottom"},
                "hovertemplate": "%{y}, %{x}: %{z:.4f}<extra></extra>"}

    def _positions(self) -> list[str]:
        words = self.result.tokens[self.prompt.value]
        return [f"{w.strip() or repr(w)} ({i})" for i, w in enumerate(words)]

    def _layout(self) -> dict[str, Any]:
        rows, positions = self.rows(), self._positions()
        return {"height": HEIGHT, "autosize": True, "showlegend": False,
                "title": {"text": f"feature view: {html.escape(self.result.site)}", "x": 0,
                          "xanchor": "left", "font": {"size": 14}},
                "margin": {"l": 120, "r": 96, "t": 76, "b": 110},
                "xaxis": {"type": "category", "tickangle": -30, "tickfont": {"size": 10}},
                "yaxis": {"title": {"text": "activation"}, "zeroline": True},
                "xaxis2": {"type": "category", "tickangle": grid.tick_angle(positions),
                           "tickfont": {"size": 10}, "title": {"text": "position"}},
                "yaxis2": {"type": "category", "autorange": "reversed",
                           "categoryorder": "array", "categoryarray": [f"latent {j}" for j in rows]},
                "shapes": [self._outline(rows, positions)]}

    def _outline(self, rows: list[int], positions: list[str]) -> dict[str, Any]:
        i = rows.index(self.latent.value)
        return {"type": "rect", "xref": "x2", "yref": "y2", "x0": -0.5,
                "x1": len(positions) - 0.5, "y0": i - 0.5, "y1": i + 0.5,
                "line": grid.HIGHLIGHT_LINE, "fillcolor": "rgba(0,0,0,0)"}

    # -- live ------------------------------------------------------------------------------

    def _refresh(self) -> None:
        fresh = self.static_figure()
        with self.figure.batch_update():
            self.figure.data[0].update(fresh.data[0])
            self.figure.data[1].update(fresh.data[1])
            self.figure.layout.update(fresh.layout)
        self.detail.value = self._detail_html()

    def _detail_html(self) -> str:
        top = self.result.top_tokens(self.latent.value, self.k)
        rows = "".join(f"<tr><td>{t.prompt}</td><td>{t.pos}</td><td>{html.escape(t.context)}"
                       f"</td><td style='text-align:right'>{grid.number(t.value)}</td></tr>"
                       for t in top)
        return (f"<table class='ii-feature-top'><tr><th>prompt</th><th>pos</th><th>context"
                f"</th><th>activation</th></tr>{rows}</table>" if top else
                f"<p>latent {self.latent.value} does not fire on these prompts</p>")

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        bundle = dict(self.widget._repr_mimebundle_(include=include, exclude=exclude) or {})
        fig = self.static_figure()
        bundle["text/html"] = static_html(fig) + self.detail.value
        bundle.update(_images(fig))
        bundle["text/plain"] = self.text()
        return bundle

    def text(self) -> str:
        """The top tokens of the selected latent as text."""
        top = self.result.top_tokens(self.latent.value, self.k)
        lines = [f"latent {self.latent.value} at {self.result.site}: top activations"]
        lines += [f"  {t.value:8.4f}  prompt {t.prompt} pos {t.pos}: {t.context}" for t in top]
        return "\n".join(lines if top else lines[:1] + ["  (never fires on these prompts)"])

    def __repr__(self) -> str:
        return f"FeatureView(latent={self.latent.value}, prompt={self.prompt.value})"


def _tail(context: str) -> str:
    """The end of a context (the token in brackets), cut at a word to BAR_CHARS."""
    if len(context) <= BAR_CHARS:
        return context
    cut = context[-BAR_CHARS:]
    return "…" + cut[cut.find(" ") + 1:] if " " in cut else "…" + cut


def _as_widget(fig: Any) -> Any:
    import plotly.graph_objects as go

    return go.FigureWidget(fig)
