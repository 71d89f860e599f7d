"""Axes of the static SVG renderer: which axes a figure has, their type, range, categories,
pixel placement and tick labels (every label when it fits, rotated when needed, smaller and
then thinned when even rotated labels would overlap; bold and coloured ones kept).

>>> axis.px("John")          # the pixel centre of a category       # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ipy_intervene.widgets import static_text as st

MIN_FONT = 7.0


@dataclass
class Axis:
    """One axis: ``name`` like ``x2``; ``span`` its pixel interval along its direction;
    ``cross`` the pixel position it is drawn at (bottom edge for x, left edge for y)."""

    name: str
    spec: dict[str, Any]
    kind: str = "linear"
    categories: list[str] = field(default_factory=list)
    low: float = 0.0
    high: float = 1.0
    span: tuple[float, float] = (0.0, 1.0)
    cross: float = 0.0

    @property
    def letter(self) -> str:
        return self.name[0]

    def value(self, v: Any) -> float | None:
        """A data value as a number on this axis (category name -> its index)."""
        if v is None:
            return None
        if self.kind == "category" and isinstance(v, str):
            return float(self.categories.index(v)) if v in self.categories else None
        try:
            number = float(v)
        except (TypeError, ValueError):
            return None
        return number if math.isfinite(number) else None

    def px(self, v: Any) -> float | None:
        number = self.value(v)
        if number is None:
            return None
        return self.frac_px((number - self.low) / ((self.high - self.low) or 1.0))

    def frac_px(self, fraction: float) -> float:
        """Pixel of a fraction of the axis (0 = its start: left for x, bottom for y)."""
        a, b = self.span
        return a + (b - a) * fraction

    @property
    def length(self) -> float:
        return abs(self.span[1] - self.span[0])

    @property
    def font(self) -> float:
        return float((self.spec.get("tickfont") or {}).get("size") or 12)


def axis_key(name: str) -> str:
    """``x2`` -> ``xaxis2`` (the layout key)."""
    return f"{name[0]}axis{name[1:]}"


def build_axes(data: list[dict], layout: dict) -> dict[str, Axis]:
    """Every axis the traces use or the layout names, with type, categories and range."""
    names = {t.get("xaxis", "x") for t in data} | {t.get("yaxis", "y") for t in data}
    names |= {k[0] + k[5:] for k in layout if k[1:5] == "axis" and k[0] in "xy"}
    names |= {"x", "y"}
    axes = {n: Axis(n, dict(layout.get(axis_key(n)) or {})) for n in sorted(names)}
    for axis in axes.values():
        values = _values_on(axis, data)
        axis.kind = _kind(axis.spec, values)
        if axis.kind == "category":
            axis.categories = _categories(axis.spec, values)
    for axis in axes.values():
        _set_range(axis, data, layout)
    for axis in axes.values():  # "matches": the same range (and categories) as another axis
        other = axes.get(axis.spec.get("matches") or "")
        if other is not None:
            axis.kind, axis.categories = other.kind, other.categories
            axis.low, axis.high = other.low, other.high
    return axes


def _values_on(axis: Axis, data: list[dict]) -> list[Any]:
    out: list[Any] = []
    for trace in data:
        if trace.get(f"{axis.letter}axis", axis.letter) != axis.name:
            continue
        values = trace.get(axis.letter)
        if values is None and trace.get("type") == "heatmap":
            z = trace.get("z") or [[]]
            values = range(len(z[0]) if axis.letter == "x" else len(z))
        out.extend(values or [])
    return out


def _kind(spec: dict, values: list[Any]) -> str:
    if spec.get("type") not in (None, "-"):
        return "category" if spec["type"] in ("category", "multicategory") else spec["type"]
    for v in values:
        if isinstance(v, str):
            try:
                float(v)
            except ValueError:
                return "category"
    return "linear"


def _categories(spec: dict, values: list[Any]) -> list[str]:
    if spec.get("categoryorder") == "array" and spec.get("categoryarray") is not None:
        ordered = [str(c) for c in spec["categoryarray"]]
        return ordered + [str(v) for v in dict.fromkeys(values) if str(v) not in ordered]
    return [str(v) for v in dict.fromkeys(values)]


def _set_range(axis: Axis, data: list[dict], layout: dict) -> None:
    spec = axis.spec
    given = spec.get("range")
    if given is not None and spec.get("autorange") not in (True, "reversed"):
        axis.low, axis.high = (axis.value(given[0]) or 0.0), (axis.value(given[1]) or 0.0)
        return
    if axis.kind == "category":
        low, high = -0.5, max(len(axis.categories), 1) - 0.5
    else:
        low, high = _extent(axis, data, layout)
    if spec.get("autorange") == "reversed":
        low, high = high, low
    axis.low, axis.high = low, high


def _extent(axis: Axis, data: list[dict], layout: dict) -> tuple[float, float]:
    """Auto range of a linear axis: the data (heatmap cell edges, bars from 0), padded."""
    values: list[float] = []
    pad = 0.0
    for trace in data:
        if trace.get(f"{axis.letter}axis", axis.letter) != axis.name:
            continue
        kind = trace.get("type", "scatter")
        raw = trace.get(axis.letter)
        if kind == "heatmap":
            z = trace.get("z") or [[]]
            count = len(z[0]) if axis.letter == "x" else len(z)
            raw = list(raw) if raw is not None else list(range(count))
            values += [float(raw[0]) - 0.5, float(raw[-1]) + 0.5] if raw else []
            continue
        values += [n for n in (axis.value(v) for v in raw or []) if n is not None]
        if kind == "bar" and _bar_value_axis(trace) == axis.letter:
            values.append(0.0)
        pad = 0.05
    for shape in layout.get("shapes") or []:
        if shape.get(f"{axis.letter}ref", axis.letter) == axis.name:
            values += [n for n in (axis.value(shape.get(f"{axis.letter}{i}")) for i in "01")
                       if n is not None]
    if not values:
        return -1.0, 6.0 if axis.letter == "x" else 4.0
    low, high = min(values), max(values)
    if low == high:
        low, high = low - 1.0, high + 1.0
    margin = (high - low) * pad
    return low - margin, high + margin


def _bar_value_axis(trace: dict) -> str:
    return "x" if trace.get("orientation") == "h" else "y"


# -- ticks --------------------------------------------------------------------------------

def ticks(axis: Axis) -> list[tuple[float, str]]:
    """(pixel, label) of the axis's ticks inside its range."""
    spec = axis.spec
    if spec.get("showticklabels") is False:
        return []
    if spec.get("tickmode") == "array" and spec.get("tickvals") is not None:
        texts = spec.get("ticktext") or [str(v) for v in spec["tickvals"]]
        pairs = list(zip(spec["tickvals"], texts))
    elif axis.kind == "category":
        pairs = [(c, c) for c in axis.categories]
    else:
        low, high = sorted((axis.low, axis.high))
        values = st.nice_ticks(low, high, axis.length / (80 if axis.letter == "x" else 40))
        pairs = [(v, st.tick_label(v, values)) for v in values]
    lo, hi = sorted((axis.low, axis.high))
    out = []
    for value, text in pairs:
        number = axis.value(value)
        if number is not None and lo - 1e-9 <= number <= hi + 1e-9:
            out.append((axis.px(value), str(text)))
    return out


def fit_labels(axis: Axis, placed: list[tuple[float, str]]) -> tuple[list[tuple[float, str]],
                                                                      float, float]:
    """Choose (labels kept, font size, angle) so that x tick labels do not overlap:
    horizontal if they fit, else rotated -90; then a smaller font; then every k-th label
    (emphasised ones, ``<b>`` or coloured, always kept)."""
    size = axis.font
    angle = axis.spec.get("tickangle")
    if len(placed) < 2:
        return placed, size, float(angle) if isinstance(angle, (int, float)) else 0.0
    gap = min(abs(b[0] - a[0]) for a, b in zip(placed, placed[1:]))
    if axis.letter == "y":
        return _thin(placed, gap, size)
    if isinstance(angle, (int, float)) and angle not in (0, 90, -90):
        return placed, size, float(angle)  # a deliberate slant (bar charts): keep it
    if max(st.text_width(t, size) for _, t in placed) <= gap - 4:
        return placed, size, 0.0
    return (*_thin(placed, gap, size)[:2], -90.0)


def _thin(placed: list[tuple[float, str]], gap: float, size: float):
    size = max(MIN_FONT, min(size, gap / 1.15))
    need = size * 1.15
    if gap >= need:
        return placed, size, 0.0
    step = math.ceil(need / gap)
    kept = [p for i, p in enumerate(placed) if i % step == 0 or _emphasised(p[1])]
    return kept, size, 0.0


def _emphasised(label: str) -> bool:
    return "<b>" in label or "color" in label


def label_extent(labels: list[tuple[float, str]], size: float, angle: float) -> float:
    """How far the x tick labels reach from the axis line, in px."""
    if not labels:
        return 0.0
    longest = max(st.text_width(t, size) for _, t in labels)
    rad = math.radians(abs(angle))
    return 6 + size * math.cos(rad) + longest * math.sin(rad)


def draw_x(axis: Axis, labels: list[tuple[float, str]], size: float, angle: float,
           color: str) -> list[str]:
    y = axis.cross + 6
    out = []
    for x, text in labels:
        if angle == 0:
            out.append(st.svg_text(text, x, y, size=size, color=color, anchor="middle",
                                   valign="top"))
        else:
            out.append(st.svg_text(text, x + size * 0.35, y, size=size, color=color,
                                   anchor="end", rotate=angle))
    return out


def draw_y(axis: Axis, labels: list[tuple[float, str]], size: float, color: str) -> list[str]:
    return [st.svg_text(text, axis.cross - 6, y, size=size, color=color, anchor="end",
                        valign="middle") for y, text in labels]


def title_text(axis: Axis) -> str:
    title = axis.spec.get("title")
    return (title.get("text") if isinstance(title, dict) else title) or ""
