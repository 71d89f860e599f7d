"""Static SVG images of the plotly figures the views build, in pure Python: no browser, no
network, no plotly.js. A notebook keeps its pictures wherever only images and text are shown
(a code-hosting preview, ``jupyter nbconvert --to html`` offline, JupyterLab before running).

What it draws: heatmaps (cells in plotly's colour-scale colours, text in cells, a colour
bar), scatter lines and markers, bars, layout shapes (the selected-cell outline, dotted
reference lines), annotations (subplot titles), the title (wrapped to the width) and
category or linear axes on any subplot grid. Tick labels are all shown when they fit side by
side, rotated when they do not, and made smaller, then thinned (the bold selected label and
coloured ones kept) when even rotated labels would overlap.

>>> svg = images(view.static_figure())["image/svg+xml"]      # doctest: +SKIP
>>> svg[:4]                                                   # doctest: +SKIP
'<svg'
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from ipy_intervene.widgets import static_axes as ax
from ipy_intervene.widgets import static_marks as marks
from ipy_intervene.widgets import static_text as st

WIDTH = 820              # px, when the figure leaves its width to the page
HEIGHT = 450
FONT_FAMILY = '"Open Sans", verdana, arial, sans-serif'
COLORWAY = ["#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3"]


def images(fig: Any) -> dict[str, str]:
    """The static images of a plotly figure: ``{"image/svg+xml": svg}``.

    >>> images(go.Figure(go.Heatmap(z=[[0, 1]])))["image/svg+xml"][:4]   # doctest: +SKIP
    '<svg'
    """
    return {"image/svg+xml": render_svg(fig)}


class StaticFigure:
    """Displays a figure as self-contained HTML (plotly.js inlined) plus the SVG image and a
    text line, so it shows in a live notebook, an HTML export and an image-only renderer.

    >>> StaticFigure(fig)          # in a notebook cell                 # doctest: +SKIP
    """

    def __init__(self, fig: Any) -> None:
        self.fig = fig

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        from ipy_intervene.widgets.heatmap import static_html

        title = _spec(self.fig)["layout"].get("title") or {}
        text = title.get("text") if isinstance(title, dict) else title
        return {"text/html": static_html(self.fig), **images(self.fig),
                "text/plain": f"<figure: {st.plain(text or 'untitled')}>"}


def _spec(fig: Any) -> dict[str, Any]:
    """The figure as plain JSON data (``data`` and ``layout``)."""
    if isinstance(fig, dict):
        spec = fig
    else:
        spec = json.loads(fig.to_json()) if hasattr(fig, "to_json") else dict(fig)
    return {"data": list(spec.get("data") or []), "layout": dict(spec.get("layout") or {})}


def render_svg(fig: Any, width: int | None = None) -> str:
    """The figure as one standalone SVG document (UTF-8 text, no external references)."""
    spec = _spec(fig)
    return _Renderer(spec["data"], spec["layout"], width).svg()


class _Renderer:
    def __init__(self, data: list[dict], layout: dict, width: int | None) -> None:
        self.data = [t for t in data if t.get("visible", True) is True]
        self.layout = layout
        template = ((layout.get("template") or {}).get("layout")) or {}
        font = {**(template.get("font") or {}), **(layout.get("font") or {})}
        self.font_size = float(font.get("size") or 12)
        self.font_color = font.get("color") or "#444"
        self.paper = layout.get("paper_bgcolor") or template.get("paper_bgcolor") or "white"
        self.plot_bg = layout.get("plot_bgcolor") or template.get("plot_bgcolor") or "white"
        self.grid = ((template.get("xaxis") or {}).get("gridcolor")) or "#eee"
        self.colorway = layout.get("colorway") or template.get("colorway") or COLORWAY
        self.width = float(width or layout.get("width") or WIDTH)
        self.height = float(layout.get("height") or HEIGHT)
        margin = {"l": 80, "r": 80, "t": 100, "b": 80, **(layout.get("margin") or {})}
        self.l, self.r, self.t, self.b = (float(margin[k]) for k in "lrtb")
        self.uid = "ii" + hashlib.sha1(json.dumps([data, layout], sort_keys=True, default=str)
                                       .encode()).hexdigest()[:8]
        self.axes = ax.build_axes(self.data, layout)
        self.title_lines, self.title_size = self._title()
        self._fit_margins()

    # -- geometry ------------------------------------------------------------------------

    def _title(self) -> tuple[list[str], float]:
        title = self.layout.get("title") or {}
        text = title.get("text") if isinstance(title, dict) else title
        font = (title.get("font") or {}) if isinstance(title, dict) else {}
        size = float(font.get("size") or self.font_size * 1.4)
        if not text:
            return [], size
        return wrap(text, size, self.width - 24), size

    def _fit_margins(self) -> None:
        """Grow the canvas where the title or the x tick labels need more room than the
        figure's margins give (plotly's automargin, which our grids turn off for live use)."""
        block = len(self.title_lines) * self.title_size * 1.3
        grow_top = max(0.0, block + 16 - self.t)
        self.t += grow_top
        self.height += grow_top
        self._place()
        self.labels: dict[str, tuple[list, float, float]] = {}
        grow_bottom = 0.0
        for axis in self.axes.values():
            if axis.letter != "x" or axis.spec.get("visible") is False:
                continue
            fitted = ax.fit_labels(axis, ax.ticks(axis))
            self.labels[axis.name] = fitted
            need = ax.label_extent(*fitted) + (22 if ax.title_text(axis) else 0) + 4
            room = self.height - axis.cross if self._at_bottom(axis) else need
            grow_bottom = max(grow_bottom, need - room)
        if grow_bottom > 0:
            self.b += grow_bottom
            self.height += grow_bottom
            self._place()
            self.labels = {n: ax.fit_labels(self.axes[n], ax.ticks(self.axes[n]))
                           for n in self.labels}

    def _at_bottom(self, axis: ax.Axis) -> bool:
        anchor = self.axes.get(axis.spec.get("anchor") or "y")
        return anchor is None or float((anchor.spec.get("domain") or [0, 1])[0]) <= 0.01

    def _place(self) -> None:
        """Pixel spans of every axis from its domain, and where it crosses its anchor."""
        pw, ph = self.width - self.l - self.r, self.height - self.t - self.b
        for axis in self.axes.values():
            d0, d1 = (float(d) for d in axis.spec.get("domain") or [0, 1])
            low, high = (axis.low, axis.high)
            if axis.letter == "x":
                axis.span = (self.l + d0 * pw, self.l + d1 * pw)
            else:
                axis.span = (self.t + (1 - d0) * ph, self.t + (1 - d1) * ph)
            axis.low, axis.high = low, high
        for axis in self.axes.values():
            anchor = self.axes.get(axis.spec.get("anchor") or ("y" if axis.letter == "x"
                                                                else "x"))
            if axis.letter == "x":
                axis.cross = anchor.span[0] if anchor else self.height - self.b
            else:
                axis.cross = anchor.span[0] if anchor else self.l

    def plot_box(self) -> tuple[float, float, float, float]:
        return (self.l, self.t, self.width - self.l - self.r, self.height - self.t - self.b)

    def where(self, letter: str, ref: str, value: Any) -> float | None:
        """Pixel of a shape/annotation coordinate given its reference (axis, domain, paper)."""
        left, top, pw, ph = self.plot_box()
        ref = ref or letter
        if ref == "paper":
            number = float(value)
            return left + number * pw if letter == "x" else top + (1 - number) * ph
        name, _, domain = ref.partition(" ")
        axis = self.axes.get(name)
        if axis is None:
            return None
        return axis.frac_px(float(value)) if domain else axis.px(value)

    # -- drawing -------------------------------------------------------------------------

    def svg(self) -> str:
        w, h = self.width, self.height
        parts = [f'<rect width="{w:.0f}" height="{h:.0f}" {st.paint("fill", self.paper)}/>']
        parts += self._backgrounds()
        shapes = self.layout.get("shapes") or []
        parts += [marks.shape(s, self.where) for s in shapes if s.get("layer") == "below"]
        parts += self._traces()
        parts += [marks.shape(s, self.where) for s in shapes if s.get("layer") != "below"]
        parts += self._axes()
        parts += self._colorbars()
        parts += self._annotations()
        parts += self._title_svg()
        title = st.escape(" ".join(st.plain(t) for t in self.title_lines))
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" '
                f'viewBox="0 0 {w:.0f} {h:.0f}" font-family=\'{FONT_FAMILY}\'>'
                f"<title>{title}</title>{''.join(p for p in parts if p)}</svg>")

    def _subplots(self) -> list[tuple[ax.Axis, ax.Axis]]:
        pairs = {(t.get("xaxis", "x"), t.get("yaxis", "y")) for t in self.data}
        pairs |= {(a.name, a.spec.get("anchor") or "y") for a in self.axes.values()
                  if a.letter == "x" and a.spec.get("anchor") != "free"}
        return [(self.axes[x], self.axes[y]) for x, y in sorted(pairs)
                if x in self.axes and y in self.axes]

    def _backgrounds(self) -> list[str]:
        out = []
        for xa, ya in self._subplots():
            (x0, x1), (y0, y1) = xa.span, ya.span
            out.append(f'<rect x="{x0:.1f}" y="{y1:.1f}" width="{x1 - x0:.1f}" '
                       f'height="{y0 - y1:.1f}" {st.paint("fill", self.plot_bg)}/>')
            clip = f"{self.uid}-{xa.name}{ya.name}"
            out.append(f'<defs><clipPath id="{clip}"><rect x="{x0:.1f}" y="{y1:.1f}" '
                       f'width="{x1 - x0:.1f}" height="{y0 - y1:.1f}"/></clipPath></defs>')
            out += self._grid(xa, ya) + self._grid(ya, xa)
        return out

    def _grid(self, axis: ax.Axis, other: ax.Axis) -> list[str]:
        if axis.spec.get("showgrid") is False or axis.spec.get("visible") is False:
            return []
        (a, b) = other.span
        out = []
        for p, _ in ax.ticks(axis):
            x1, y1, x2, y2 = (p, a, p, b) if axis.letter == "x" else (a, p, b, p)
            out.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                       f'{st.paint("stroke", self.grid)} stroke-width="1"/>')
        zero = axis.px(0.0) if axis.kind == "linear" else None
        if zero is not None and axis.spec.get("zeroline") is not False and \
                min(axis.span) <= zero <= max(axis.span):
            x1, y1, x2, y2 = (zero, a, zero, b) if axis.letter == "x" else (a, zero, b, zero)
            out.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                       f'{st.paint("stroke", self.grid)} stroke-width="2"/>')
        return out

    def _traces(self) -> list[str]:
        out = []
        for k, trace in enumerate(self.data):
            xa = self.axes.get(trace.get("xaxis", "x"))
            ya = self.axes.get(trace.get("yaxis", "y"))
            if xa is None or ya is None:
                continue
            color = self.colorway[k % len(self.colorway)]
            kind = trace.get("type", "scatter")
            if kind == "heatmap":
                drawn = marks.heatmap(trace, xa, ya)
            elif kind == "bar":
                drawn = marks.bar(trace, xa, ya, color, 1 - float(self.layout.get("bargap", 0.2)))
            elif kind in ("scatter", "scattergl"):
                drawn = marks.scatter(trace, xa, ya, color)
            else:
                continue
            out.append(f'<g clip-path="url(#{self.uid}-{xa.name}{ya.name})">{"".join(drawn)}</g>')
        return out

    def _axes(self) -> list[str]:
        out = []
        for axis in self.axes.values():
            if axis.spec.get("visible") is False or not self._used(axis):
                continue
            title = ax.title_text(axis)
            if axis.letter == "x":
                labels, size, angle = self.labels.get(axis.name) or ([], axis.font, 0.0)
                out += ax.draw_x(axis, labels, size, angle, self.font_color)
                if title:
                    y = axis.cross + ax.label_extent(labels, size, angle) + 4
                    out.append(st.svg_text(title, sum(axis.span) / 2, y, size=14,
                                           color=self.font_color, anchor="middle",
                                           valign="top"))
            else:
                labels, size, _ = ax.fit_labels(axis, ax.ticks(axis))
                out += ax.draw_y(axis, labels, size, self.font_color)
                if title:
                    wide = max((st.text_width(t, size) for _, t in labels), default=0.0)
                    x, y = axis.cross - 12 - wide, sum(axis.span) / 2
                    out.append(st.svg_text(title, x, y, size=14, color=self.font_color,
                                           anchor="middle", rotate=-90))
        return out

    def _used(self, axis: ax.Axis) -> bool:
        return any(axis.name in (x.name, y.name) for x, y in self._subplots())

    def _colorbars(self) -> list[str]:
        out = []
        for k, trace in enumerate(self.data):
            if trace.get("type") == "heatmap":
                out += marks.colorbar(trace, self.plot_box(), f"{self.uid}-cb{k}",
                                      self.font_color)
        return out

    def _annotations(self) -> list[str]:
        out = []
        for note in self.layout.get("annotations") or []:
            if not note.get("text") or note.get("visible") is False:
                continue
            x = self.where("x", note.get("xref", "x"), note.get("x", 0.5))
            y = self.where("y", note.get("yref", "y"), note.get("y", 0.5))
            if x is None or y is None:
                continue
            size = float((note.get("font") or {}).get("size") or self.font_size)
            anchor = {"left": "start", "right": "end"}.get(note.get("xanchor"), "middle")
            x = self._inside(x, st.text_width(note["text"], size), anchor)
            valign = {"top": "top", "bottom": "bottom"}.get(note.get("yanchor"), "middle")
            out.append(st.svg_text(note["text"], x + float(note.get("xshift", 0)),
                                   y - float(note.get("yshift", 0)), size=size,
                                   color=(note.get("font") or {}).get("color") or
                                   self.font_color, anchor=anchor, valign=valign))
        return out

    def _inside(self, x: float, wide: float, anchor: str) -> float:
        """Move a label's anchor so the whole label stays on the canvas."""
        start = x - {"start": 0.0, "middle": wide / 2, "end": wide}[anchor]
        shift = max(4.0 - start, 0.0) - max(start + wide - (self.width - 4.0), 0.0)
        return x + shift if wide < self.width - 8 else x

    def _title_svg(self) -> list[str]:
        if not self.title_lines:
            return []
        title = self.layout.get("title") or {}
        x_frac = float(title.get("x", 0.05)) if isinstance(title, dict) else 0.05
        anchor = title.get("xanchor", "auto") if isinstance(title, dict) else "auto"
        if anchor == "auto":
            anchor = "left" if x_frac < 1 / 3 else "right" if x_frac > 2 / 3 else "center"
        x = min(max(x_frac * self.width, 12.0), self.width - 12.0)
        text_anchor = {"left": "start", "right": "end"}.get(anchor, "middle")
        return [st.svg_text("<br>".join(self.title_lines), x, self.t / 2, size=self.title_size,
                            color=self.font_color, anchor=text_anchor, valign="middle")]


def wrap(text: str, size: float, width: float) -> list[str]:
    """Lines of a title (plotly markup kept), broken at spaces to fit ``width`` px; a tag
    open at a break is closed there and opened again on the next line."""
    out = []
    for line in re.split(r"<br\s*/?>", str(text), flags=re.IGNORECASE):
        pieces: list[str] = []
        for part in re.split(r"(<[^<>]*>)", line):
            atomic = part.startswith("<") and st.TAG.fullmatch(part)
            pieces += [part] if atomic else [c for c in re.split(r"(?<= )", part) if c]
        current = ""
        for chunk in pieces:
            if st.plain(current).strip() and not chunk.startswith("<") and \
                    st.text_width(current + chunk, size) > width:
                out.append(current.rstrip())
                current = "".join(_open_tags(current))
            current += chunk
        out.append(current.rstrip())
    return [line + "".join(_closing(t) for t in reversed(_open_tags(line))) for line in out]


def _closing(tag: str) -> str:
    return "</" + re.match(r"<(\w+)", tag).group(1) + ">"


def _open_tags(line: str) -> list[str]:
    """The opening tags still open at the end of ``line``, outermost first."""
    stack: list[str] = []
    for match in re.finditer(r"<(/?)(b|i|em|strong|sub|sup|span)\b[^<>]*>", line, re.I):
        if match.group(1):
            if stack:
                stack.pop()
        else:
            stack.append(match.group(0))
    return stack
