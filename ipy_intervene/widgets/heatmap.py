"""Static plotly heatmaps of sweep results, and the mime bundle that shows them anywhere.

>>> fig = sweep_heatmap(result)        # doctest: +SKIP
"""

from __future__ import annotations

import os
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


_shipped = False  # plotly.js goes into the first static view of a process only


def static_html(fig: Any, *, include_plotlyjs: bool | None = None) -> str:
    """Self-contained HTML of a figure (works offline and in ``nbconvert --to html``).

    plotly.js (about 4.6 MB) is inlined in the first view a kernel shows and shared by the
    ones after it, which is what a notebook run top to bottom and exported needs; pass
    ``include_plotlyjs=True`` for a fragment that stands alone. The environment variable
    ``IPY_INTERVENE_PLOTLYJS=none`` leaves it out everywhere (small committed notebooks).
    """
    global _shipped
    if include_plotlyjs is None:
        include_plotlyjs, _shipped = not _shipped, True
        if os.environ.get("IPY_INTERVENE_PLOTLYJS") == "none":
            include_plotlyjs = False
    return fig.to_html(full_html=False, include_plotlyjs=include_plotlyjs,
                       config={"displaylogo": False})
