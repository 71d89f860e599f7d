"""Static plotly heatmaps of sweep results, and the mime bundle that shows them anywhere.

>>> fig = sweep_heatmap(result)        # doctest: +SKIP
"""

from __future__ import annotations

import json
from typing import Any

import torch


def sweep_heatmap(result: Any, pos: int | None = None) -> Any:
    """Layers up, positions (or heads) across, red/blue around 0, hover shows the raw metric."""
    import plotly.graph_objects as go

    values, raw, x, x_title, title = _plane(result, pos)
    limit = float(values.abs().nan_to_num(0.0).max()) or 1.0
    heat = go.Heatmap(
        z=values.tolist(), x=x, y=[f"L{l}" for l in result.layers],
        customdata=raw.tolist(), colorscale="RdBu", zmid=0.0, zmin=-limit, zmax=limit,
        colorbar={"title": {"text": "effect"}},
        hovertemplate=f"%{{y}} %{{x}}<br>effect %{{z:.3f}}<br>{result.metric} %{{customdata:.3f}}"
                      "<extra></extra>")
    fig = go.Figure(heat)
    fig.update_layout(
        title={"text": title}, xaxis={"title": {"text": x_title}, "type": "category"},
        yaxis={"title": {"text": "layer"}, "type": "category"},
        height=180 + 28 * len(result.layers), margin={"l": 60, "r": 20, "t": 60, "b": 60})
    return fig


def _plane(result: Any, pos: int | None) -> tuple[torch.Tensor, torch.Tensor, list[str], str, str]:
    title = (f"{result.method} patching of {result.site} ({result.direction}); "
             f"clean {result.clean:.3g}, corrupted {result.corrupted:.3g}")
    if result.dims == ("layer", "pos"):
        return (result.values, result.raw, [result.tokens[p] for p in result.positions],
                "position", title)
    heads = [f"H{h}" for h in result.heads]
    if result.dims == ("layer", "head"):
        return result.values, result.raw, heads, "head", title
    if pos is None:
        flat = result.values.abs().nan_to_num(0.0).amax(dim=(0, 2))
        index = int(flat.argmax())
    else:
        index = result.positions.index(pos)
    where = result.tokens[result.positions[index]]
    return (result.values[:, index], result.raw[:, index], heads, "head",
            f"{title}; at position {where}")


def mimebundle(fig: Any, text: str) -> dict[str, Any]:
    """A bundle every front end can show: plotly's own mime type (JupyterLab), a
    self-contained HTML page fragment (nbconvert, offline), and text."""
    return {
        "application/vnd.plotly.v1+json": json.loads(fig.to_json()),
        "text/html": fig.to_html(full_html=False, include_plotlyjs=True),
        "text/plain": text,
    }
