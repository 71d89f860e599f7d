"""Static plotly heatmaps of sweep results, the grid layout every view shares, and the HTML
that shows a figure anywhere.

The layout of a grid view depends only on the grid (its labels and size), never on the
selected cell: axis ranges are fixed, tick labels and margins are chosen up front and plotly's
automatic margins are off, so a click on an edge cell cannot move the plot under the pointer.
The width is left to the page (autosize), the height follows the number of rows.

>>> fig = sweep_heatmap(result)        # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch

MAX_TICKS = 40          # above this many columns, every k-th label (and the selected one)
LABEL_CHARS = 14        # tick labels are cut to this many characters (hover has them whole)
ROW_PX = 30             # height of a heatmap row
FONT_PX = 11
MARGIN = {"l": 64, "r": 96, "t": 76}   # r: the colour bar sits in the right margin
HIGHLIGHT_LINE = {"color": "black", "width": 3}


def number(x: float) -> str:
    """The one rounding of metric values in titles, panels and hover text: ``0.9996``."""
    return f"{x:.4f}"


def short(label: str, chars: int = LABEL_CHARS) -> str:
    return label if len(label) <= chars else label[: chars - 1] + "…"


def tick_angle(labels: Sequence[str]) -> int:
    """0 when the labels fit side by side in a narrow view, else -90 (fixed per figure)."""
    return 0 if sum(len(short(l)) + 2 for l in labels) * 7 < 360 else -90


def bottom_margin(labels: Sequence[str]) -> int:
    """Room for the x tick labels (cut to LABEL_CHARS) and the axis title under them."""
    if tick_angle(labels) == 0:
        return 64
    return 44 + int(max((len(short(l)) for l in labels), default=1) * FONT_PX * 0.62)


def category_axis(labels: Sequence[str], *, selected: int | None = None,
                  marked: Sequence[int] = (), title: str = "") -> dict[str, Any]:
    """A category axis with a fixed range and fixed tick labels (see :func:`tick_text`)."""
    vals, text = tick_text(labels, selected=selected, marked=marked)
    return {"type": "category", "categoryorder": "array", "categoryarray": list(labels),
            "range": [-0.5, len(labels) - 0.5], "autorange": False, "automargin": False,
            "tickmode": "array", "tickvals": vals, "ticktext": text,
            "tickangle": tick_angle(labels), "tickfont": {"size": FONT_PX},
            "title": {"text": title, "standoff": 6}, "showgrid": False, "zeroline": False}


def tick_text(labels: Sequence[str], *, selected: int | None = None,
              marked: Sequence[int] = ()) -> tuple[list[str], list[str]]:
    """Every label when there are at most MAX_TICKS, else every k-th; the selected column
    is always labelled (bold) and ``marked`` ones (a causal trace's subject) are red."""
    step = max(1, math.ceil(len(labels) / MAX_TICKS))
    keep = [i for i in range(len(labels)) if i % step == 0 or i == selected or i in marked]
    if selected is not None and step > 1:  # neighbours would overlap the selected label
        keep = [i for i in keep if i == selected or abs(i - selected) >= step or i in marked]
    text = []
    for i in keep:
        label = short(labels[i]).replace("<", "&lt;")
        if i in marked:
            label = f"<span style='color:#c0392b'>{label}</span>"
        text.append(f"<b>{label}</b>" if i == selected else label)
    return [labels[i] for i in keep], text


def cell_outline(col: int, row: int, xref: str = "x", yref: str = "y",
                 rows: int = 1) -> dict[str, Any]:
    """A rectangle around grid cell(s) (category axes take numeric positions in shapes)."""
    return {"type": "rect", "xref": xref, "yref": yref, "x0": col - 0.5, "x1": col + 0.5,
            "y0": row - 0.5, "y1": row + rows - 0.5, "line": HIGHLIGHT_LINE,
            "fillcolor": "rgba(0,0,0,0)", "layer": "above"}


def grid_height(n_rows: int, x_labels: Sequence[str]) -> int:
    return MARGIN["t"] + bottom_margin(x_labels) + max(ROW_PX * n_rows, 120)


def grid_layout(x_labels: Sequence[str], y_labels: Sequence[str], *, title: str,
                x_title: str) -> dict[str, Any]:
    """The layout of a heatmap grid: fixed ranges, ticks, margins and height; free width."""
    return {"title": {"text": title, "x": 0, "xanchor": "left", "font": {"size": 14}},
            "xaxis": category_axis(x_labels, title=x_title),
            "yaxis": category_axis(y_labels, title="layer"),
            "height": grid_height(len(y_labels), x_labels), "autosize": True,
            "margin": {**MARGIN, "b": bottom_margin(x_labels), "autoexpand": False},
            "hoverlabel": {"align": "left"}}


def colorbar(title: str) -> dict[str, Any]:
    """A colour bar in the right margin, clear of every subplot and its labels."""
    return {"title": {"text": title, "side": "top"}, "x": 1.0, "xanchor": "left",
            "xpad": 12, "thickness": 14, "len": 1.0, "lenmode": "fraction", "y": 0.5}


def sweep_title(result: Any) -> str:
    kind = {"attribution": "attribution patching (linear estimate)",
            "noise": "causal tracing"}.get(result.method, f"{result.method} patching")
    where = "" if result.method == "noise" else f" ({result.direction})"
    window = result.extra.get("window", 1)
    restore = f"; window {window} layers" if result.method == "noise" and window > 1 else ""
    reused = " (reused: an earlier identical sweep)" if result.extra.get("reused") else ""
    return (f"{kind} of {result.site}{where}{restore}; {result.metric}: clean "
            f"{number(result.clean)}, corrupted {number(result.corrupted)}{reused}")


def subject_positions(result: Any) -> list[int]:
    """Grid columns of a causal trace's subject tokens (the noised ones); [] otherwise."""
    if result.method != "noise" or "pos" not in result.dims:
        return []
    subject = result.extra.get("subject")
    if subject is None:  # the noise itself: non-zero exactly on the subject tokens
        noise = getattr(getattr(result.patcher, "run", None), "noise", None)
        if noise is None:
            return []
        subject = (noise[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    return [result.positions.index(p) for p in subject if p in result.positions]


def hover(result: Any) -> str:
    effect = "estimated effect" if result.method == "attribution" else "effect"
    return (f"layer %{{y}}, %{{x}}<br>{effect} %{{z:.4f}}<br>{result.metric} "
            "%{customdata:.4f}<extra></extra>")


def sweep_heatmap(result: Any, pos: int | None = None) -> Any:
    """Layers up, positions (or heads) across, red/blue around 0, hover shows the raw metric."""
    import plotly.graph_objects as go

    values, raw, x, x_title, where = _plane(result, pos)
    y = [f"L{l}" for l in result.layers]
    limit = float(values.abs().nan_to_num(0.0).max()) or 1.0
    heat = go.Heatmap(z=values.tolist(), x=x, y=y, customdata=raw.tolist(), colorscale="RdBu",
                      zmid=0.0, zmin=-limit, zmax=limit, colorbar=colorbar("effect"),
                      hovertemplate=hover(result), xgap=1, ygap=1)
    fig = go.Figure(heat)
    fig.update_layout(grid_layout(x, y, title=sweep_title(result) + where, x_title=x_title))
    subject = subject_positions(result) if x_title == "position" else []
    fig.update_xaxes(category_axis(x, marked=subject, title=x_title))
    return fig


def _plane(result: Any, pos: int | None) -> tuple[torch.Tensor, torch.Tensor, list[str], str, str]:
    if result.dims == ("layer", "pos"):
        return (result.values, result.raw, [result.tokens[p] for p in result.positions],
                "position", "")
    heads = [f"H{h}" for h in result.heads]
    if result.dims == ("layer", "head"):
        return result.values, result.raw, heads, "head", ""
    if pos is None:
        flat = result.values.abs().nan_to_num(0.0).amax(dim=(0, 2))
        index = int(flat.argmax())
    else:
        index = result.positions.index(pos)
    where = result.tokens[result.positions[index]]
    return (result.values[:, index], result.raw[:, index], heads, "head",
            f"; at position {where}")


_shipped = False  # plotly.js goes into the first static view of a process only


def static_html(fig: Any, *, include_plotlyjs: bool | None = None) -> str:
    """Self-contained HTML of a figure (works offline and in ``nbconvert --to html``); it
    fills the width of the page and follows it when the window is resized.

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
                       default_width="100%",
                       config={"displaylogo": False, "responsive": True, "doubleClick": False})
