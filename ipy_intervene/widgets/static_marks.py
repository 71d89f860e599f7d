"""The marks of the static SVG renderer: heatmap cells (with their text), colour bars,
scatter lines and markers, bars, and layout shapes.

Each function returns SVG elements as strings; positions come from the axes
(:mod:`ipy_intervene.widgets.static_axes`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from ipy_intervene.widgets import static_text as st
from ipy_intervene.widgets.static_axes import Axis

DASHES = {"dot": "2,3", "dash": "6,4", "longdash": "10,5", "dashdot": "6,3,2,3",
          "longdashdot": "10,4,2,4", "solid": ""}


def color_scale(trace: dict) -> list[list[Any]]:
    scale = trace.get("colorscale")
    if isinstance(scale, str) or scale is None:
        import plotly.colors

        scale = plotly.colors.get_colorscale(scale or "Plasma")
    scale = [list(stop) for stop in scale]
    if trace.get("reversescale"):
        scale = [[1 - float(t), c] for t, c in reversed(scale)]
    return scale


def z_range(trace: dict) -> tuple[float, float]:
    """The values at the ends of the colour scale: zmin/zmax, or the data (around zmid)."""
    finite = [float(v) for row in trace.get("z") or [] for v in row
              if v is not None and math.isfinite(float(v))]
    low = trace.get("zmin")
    high = trace.get("zmax")
    if low is None or high is None:
        low = min(finite, default=0.0) if low is None else low
        high = max(finite, default=1.0) if high is None else high
        mid = trace.get("zmid")
        if mid is not None:
            reach = max(abs(high - mid), abs(mid - low))
            low, high = mid - reach, mid + reach
    return float(low), float(high)


def cell_color(trace: dict, value: Any) -> st.RGB | None:
    """The fill plotly gives a heatmap cell (None for a missing value)."""
    if value is None or not math.isfinite(float(value)):
        return None
    low, high = z_range(trace)
    t = 0.5 if high == low else (float(value) - low) / (high - low)
    return st.scale_color(color_scale(trace), t)


def _edges(axis: Axis, values: list[Any], i: int) -> tuple[float, float] | None:
    center = axis.value(values[i])
    if center is None:
        return None
    if axis.kind == "category" or len(values) < 2:
        half = 0.5
    else:
        j = i + 1 if i + 1 < len(values) else i - 1
        half = abs((axis.value(values[j]) or 0.0) - center) / 2 or 0.5
    a, b = axis.px(center - half), axis.px(center + half)
    return (min(a, b), max(a, b)) if a is not None and b is not None else None


def heatmap(trace: dict, xa: Axis, ya: Axis) -> list[str]:
    """One ``<rect>`` per cell with a value, inset by xgap/ygap; texttemplate text on top."""
    z = trace.get("z") or []
    xs = list(trace.get("x") or range(len(z[0]) if z else 0))
    ys = list(trace.get("y") or range(len(z)))
    template = trace.get("texttemplate") or ""
    texts = trace.get("text")
    font = trace.get("textfont") or {}
    gx, gy = float(trace.get("xgap") or 0) / 2, float(trace.get("ygap") or 0) / 2
    cells, labels = [], []
    for i, row in enumerate(z):
        for j, value in enumerate(row):
            rgb = cell_color(trace, value)
            xe, ye = _edges(xa, xs, j), _edges(ya, ys, i)
            if rgb is None or xe is None or ye is None:
                continue
            x0, y0 = xe[0] + gx, ye[0] + gy
            w, h = max(xe[1] - xe[0] - 2 * gx, 0.5), max(ye[1] - ye[0] - 2 * gy, 0.5)
            cells.append(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{w:.1f}" height="{h:.1f}" '
                         f'fill="rgb({rgb[0]},{rgb[1]},{rgb[2]})"/>')
            if template:
                text = texts[i][j] if isinstance(texts, list) and i < len(texts) else ""
                label = st.fill_template(template, {"text": text, "z": value, "x": xs[j],
                                                    "y": ys[i]})
                labels.append(_cell_text(label, x0 + w / 2, y0 + h / 2, w, h, rgb, font))
    return [f'<g class="heatmap">{"".join(cells)}</g>', *labels]


def _cell_text(label: str, x: float, y: float, w: float, h: float, rgb: st.RGB,
               font: dict) -> str:
    size = float(font.get("size") or 12)
    wide = st.text_width(label, size)
    if wide > w - 2:
        size *= (w - 2) / wide
    size = min(size, h * 0.8)
    if size < 6 or not label:
        return ""
    return st.svg_text(label, x, y, size=round(size, 1), color=font.get("color") or
                       st.contrast(rgb), anchor="middle", valign="middle")


def colorbar(trace: dict, plot: tuple[float, float, float, float], uid: str,
             font_color: str) -> list[str]:
    """The colour bar of a heatmap in the right margin (or where ``colorbar.x`` puts it)."""
    if trace.get("showscale") is False:
        return []
    spec = trace.get("colorbar") or {}
    left, top, width, height = plot
    thick = float(spec.get("thickness") or 30)
    title = spec.get("title") or {}
    title = title.get("text") if isinstance(title, dict) else title
    head = 22.0 if title else 0.0
    length = float(spec.get("len") or 1.0) * height - 2 * float(spec.get("ypad", 10)) - head
    x = left + float(spec.get("x", 1.02)) * width + float(spec.get("xpad", 10))
    anchor_y = top + (1 - float(spec.get("y", 0.5))) * height
    y_top = {"top": anchor_y, "bottom": anchor_y - length - head}.get(
        spec.get("yanchor", "middle"), anchor_y - (length + head) / 2) + head
    low, high = z_range(trace)
    stops = "".join(f'<stop offset="{float(t):.4f}" stop-color="rgb({r},{g},{b})"/>'
                    for t, c in color_scale(trace) for r, g, b in [st.parse_color(c)[0]])
    out = [f'<defs><linearGradient id="{uid}" x1="0" y1="1" x2="0" y2="0">{stops}'
           f"</linearGradient></defs>",
           f'<rect x="{x:.1f}" y="{y_top:.1f}" width="{thick:g}" height="{length:.1f}" '
           f'fill="url(#{uid})"/>']
    values = st.nice_ticks(low, high, length / 40)
    for v in values:
        y = y_top + length * (1 - (v - low) / ((high - low) or 1.0))
        out.append(st.svg_text(st.tick_label(v, values), x + thick + 4, y, size=11,
                               color=font_color, valign="middle"))
    if title:
        out.append(st.svg_text(title, x, y_top - 8, size=12, color=font_color))
    return out


def scatter(trace: dict, xa: Axis, ya: Axis, color: str) -> list[str]:
    """Lines (broken at missing values), markers and text of a scatter trace."""
    ys = list(trace.get("y") or [])
    xs = list(trace.get("x") or range(len(ys)))
    points = [(xa.px(x), ya.px(y)) for x, y in zip(xs, ys)]
    mode = trace.get("mode") or ("lines+markers" if len(points) < 20 else "lines")
    line = trace.get("line") or {}
    marker = trace.get("marker") or {}
    out = []
    if "lines" in mode:
        stroke = line.get("color") or color
        dash = DASHES.get(line.get("dash") or "solid", "3,3")
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        for run in _runs(points):
            if len(run) > 1:
                coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in run)
                out.append(f'<polyline points="{coords}" fill="none" {st.paint("stroke", stroke)} '
                           f'stroke-width="{float(line.get("width", 2)):g}"{dash_attr}/>')
    if "markers" in mode and marker.get("opacity", 1) != 0:
        colors = marker.get("color") or line.get("color") or color
        radius = float(marker.get("size") or 6) / 2
        for k, (x, y) in enumerate(points):
            fill = colors[k] if isinstance(colors, list) else colors
            if x is not None and y is not None:
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{radius:g}" '
                           f'{st.paint("fill", fill)}/>')
    if "text" in mode:
        texts = trace.get("text") or []
        for (x, y), text in zip(points, texts if isinstance(texts, list) else []):
            if x is not None and y is not None:
                out.append(st.svg_text(text, x, y - 6, size=11, anchor="middle"))
    return out


def _runs(points: list[tuple[float | None, float | None]]) -> list[list[tuple[float, float]]]:
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if x is None or y is None:
            runs.append([])
        else:
            runs[-1].append((x, y))
    return runs


def bar(trace: dict, xa: Axis, ya: Axis, color: str, width: float = 0.8) -> list[str]:
    """Bars from 0 (vertical, or ``orientation="h"``), each ``width`` of its slot."""
    horizontal = trace.get("orientation") == "h"
    cats, vals = (trace.get("y"), trace.get("x")) if horizontal else (trace.get("x"),
                                                                      trace.get("y"))
    vals = list(vals or [])
    cats = list(cats if cats is not None else range(len(vals)))
    slot, value = (ya, xa) if horizontal else (xa, ya)
    colors = (trace.get("marker") or {}).get("color") or color
    out = []
    for k, (c, v) in enumerate(zip(cats, vals)):
        center, base, tip = slot.value(c), value.px(0.0), value.px(v)
        if center is None or base is None or tip is None:
            continue
        a, b = slot.px(center - width / 2), slot.px(center + width / 2)
        fill = colors[k] if isinstance(colors, list) else colors
        if horizontal:
            x0, y0, w, h = min(base, tip), min(a, b), abs(tip - base), abs(b - a)
        else:
            x0, y0, w, h = min(a, b), min(base, tip), abs(b - a), abs(tip - base)
        out.append(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{w:.1f}" height="{h:.1f}" '
                   f'{st.paint("fill", fill)}/>')
    return out


def shape(spec: dict, where: Callable[[str, str, Any], float | None]) -> str:
    """A layout shape (rect, line or circle); ``where(letter, ref, value)`` gives pixels."""
    x0, x1 = (where("x", spec.get("xref", "x"), spec.get(k)) for k in ("x0", "x1"))
    y0, y1 = (where("y", spec.get("yref", "y"), spec.get(k)) for k in ("y0", "y1"))
    if None in (x0, x1, y0, y1):
        return ""
    line = spec.get("line") or {}
    stroke = line.get("color") or "#444"
    dash = DASHES.get(line.get("dash") or "solid", "3,3")
    attrs = (f'{st.paint("stroke", stroke)} stroke-width="{float(line.get("width", 2)):g}"'
             + (f' stroke-dasharray="{dash}"' if dash else ""))
    if spec.get("opacity") not in (None, 1):
        attrs += f' opacity="{float(spec["opacity"]):g}"'
    kind = spec.get("type", "rect")
    if kind == "line":
        return f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y1:.1f}" {attrs}/>'
    fill = st.paint("fill", spec.get("fillcolor") or "rgba(0,0,0,0)")
    if kind == "circle":
        return (f'<ellipse cx="{(x0 + x1) / 2:.1f}" cy="{(y0 + y1) / 2:.1f}" '
                f'rx="{abs(x1 - x0) / 2:.1f}" ry="{abs(y1 - y0) / 2:.1f}" {fill} {attrs}/>')
    return (f'<rect class="shape" x="{min(x0, x1):.1f}" y="{min(y0, y1):.1f}" '
            f'width="{abs(x1 - x0):.1f}" height="{abs(y1 - y0):.1f}" {fill} {attrs}/>')
