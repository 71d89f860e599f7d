"""Decompose view: each head's share as a layer x head heatmap (red/blue around 0), the metric
read off the accumulated residual stream after each layer, the other components as bars, and
the top-k components as a table. Static plotly HTML: it renders offline and in exports.

>>> ii.decompose(model, prompt, ii.logit_diff("Mary", "John")).show(k=5)   # doctest: +SKIP
"""

from __future__ import annotations

import html
from typing import Any

from ipy_intervene.widgets.heatmap import static_html


def decompose_figure(result: Any, k: int = 10) -> Any:
    """Heads heatmap and accumulated stream on top, the other components as bars below,
    titled with the total and the top components."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=2, column_widths=[0.55, 0.45], row_heights=[0.55, 0.45],
                        specs=[[{}, {}], [{"colspan": 2}, None]], horizontal_spacing=0.16,
                        vertical_spacing=0.2,
                        subplot_titles=("heads", "after each layer (solid: final norm scale frozen;"
                                        "<br>dotted: final norm recomputed)",
                                        "other components"))
    fig.add_trace(_heads(result), row=1, col=1)
    for name, values, dash in (("final norm scale frozen", result.accumulated, "solid"),
                               ("final norm recomputed", result.logit_lens, "dot")):
        fig.add_trace(go.Scatter(x=values.tolist(), y=result.labels, mode="lines+markers",
                                 name=name, line={"dash": dash}, showlegend=False,
                                 hovertemplate="after %{y}: %{x:.4f}<extra>" + name +
                                 "</extra>"), row=1, col=2)
    others = {n: v for n, v in result.components.items() if not _is_head(n)}
    fig.add_trace(go.Bar(x=list(others), y=list(others.values()), showlegend=False,
                         marker={"color": ["#b2182b" if v < 0 else "#2166ac"
                                           for v in others.values()]},
                         hovertemplate="%{x}: %{y:.4f}<extra></extra>"), row=2, col=1)
    top = ", ".join(f"{n} {v:+.3f}" for n, v in result.top(min(k, 5)))
    fig.update_layout(
        title={"text": f"direct attribution of {html.escape(result.metric)} at "
                       f"{html.escape(repr(result.token))} (position {result.position}): "
                       f"total {result.total:+.3f}<br><sub>top: {html.escape(top)}</sub>"},
        height=max(560, 420 + 24 * len(result.labels)),
        margin={"l": 70, "r": 20, "t": 120, "b": 80})
    fig.update_yaxes(type="category", autorange="reversed", row=1)
    fig.update_xaxes(type="category", title_text="head", row=1, col=1)
    fig.update_xaxes(title_text=result.metric, zeroline=True, row=1, col=2)
    fig.update_xaxes(type="category", tickangle=-45, row=2, col=1)
    fig.update_yaxes(title_text="share", zeroline=True, row=2, col=1)
    return fig


def _heads(result: Any) -> Any:
    import plotly.graph_objects as go

    n_layers, n_heads = result.heads.shape
    limit = float(result.heads.abs().max()) or 1.0
    labels = [[f"L{l}H{h}" for h in range(n_heads)] for l in range(n_layers)]
    return go.Heatmap(z=result.heads.tolist(), x=[f"H{h}" for h in range(n_heads)],
                      y=[f"L{l}" for l in range(n_layers)], text=labels,
                      colorscale="RdBu", zmid=0.0, zmin=-limit, zmax=limit,
                      colorbar={"title": {"text": "share"}, "x": 0.47, "y": 1.0,
                                "yanchor": "top", "len": 0.5},
                      hovertemplate="%{text}: %{z:.4f}<extra></extra>")


def _is_head(name: str) -> bool:
    return name.startswith("L") and "H" in name


class DecomposeView:
    """The figure and the top-k table; displays as offline HTML with a text fallback."""

    def __init__(self, result: Any, k: int = 10) -> None:
        self.result, self.k = result, k
        self.figure = decompose_figure(result, k)

    def table_html(self) -> str:
        rows = "".join(f"<tr><td>{html.escape(name)}</td><td style='text-align:right'>"
                       f"{value:+.4f}</td></tr>" for name, value in self.result.top(self.k))
        return (f"<table class='ii-decompose-top'><tr><th>top {self.k}</th><th>share</th>"
                f"</tr>{rows}<tr><td><b>total</b></td><td style='text-align:right'>"
                f"{self.result.total:+.4f}</td></tr></table>")

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        from ipy_intervene.widgets.static import images

        return {"text/html": static_html(self.figure) + self.table_html(),
                **images(self.figure), "text/plain": self.result.text(self.k)}

    def __repr__(self) -> str:
        return f"DecomposeView({self.result!r})"
