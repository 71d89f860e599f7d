"""The small pieces of the static SVG renderer: colours and colour scales as plotly computes
them, plotly's rich text (``<b>``, ``<br>``, ``<sub>``, coloured ``<span>``) as SVG
``<tspan>``, text widths, number formats and "nice" tick values.

>>> scale_color([(0, "rgb(0,0,0)"), (1, "rgb(255,255,255)")], 0.5)
(128, 128, 128)
>>> lines_of("a<br><b>b</b>")
[[('a', {})], [('b', {'bold': True})]]
"""

from __future__ import annotations

import html
import math
import re
from typing import Any, Sequence

MINUS = "\u2212"        # plotly writes negative tick labels with a real minus sign
RGB = tuple[int, int, int]
NAMED = {"black": (0, 0, 0), "white": (255, 255, 255), "red": (255, 0, 0),
         "green": (0, 128, 0), "blue": (0, 0, 255), "grey": (128, 128, 128),
         "gray": (128, 128, 128), "transparent": (0, 0, 0)}


# -- colours ------------------------------------------------------------------------------

def parse_color(color: Any) -> tuple[RGB, float]:
    """``(r, g, b), alpha`` of a CSS colour: ``#rgb``, ``#rrggbb``, ``rgb()``, ``rgba()``."""
    text = str(color).strip().lower()
    if text.startswith("#"):
        digits = text[1:]
        if len(digits) == 3:
            digits = "".join(d * 2 for d in digits)
        return (int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16)), 1.0
    match = re.fullmatch(r"rgba?\(([^)]*)\)", text)
    if match:
        parts = [float(p) for p in match.group(1).split(",")]
        alpha = parts[3] if len(parts) > 3 else 1.0
        return (int(parts[0] + 0.5), int(parts[1] + 0.5), int(parts[2] + 0.5)), alpha
    if text in NAMED:
        return NAMED[text], 0.0 if text == "transparent" else 1.0
    raise ValueError(f"cannot read the colour {color!r}")


def paint(attribute: str, color: Any) -> str:
    """SVG attributes for a colour (``fill="rgb(..)" fill-opacity=".."``); none if invisible."""
    if color is None:
        return f'{attribute}="none"'
    (r, g, b), alpha = parse_color(color)
    if alpha <= 0:
        return f'{attribute}="none"'
    opacity = f' {attribute}-opacity="{alpha:g}"' if alpha < 1 else ""
    return f'{attribute}="rgb({r},{g},{b})"{opacity}'


def scale_color(scale: Sequence[Sequence[Any]], t: float) -> RGB:
    """The colour at ``t`` in [0, 1] of a plotly colour scale: linear in RGB between stops
    (plotly.js: d3 linear scale over the stops' RGB), each channel rounded half up."""
    stops = [(float(at), parse_color(c)[0]) for at, c in scale]
    t = min(max(t, stops[0][0]), stops[-1][0])
    for (a, ca), (b, cb) in zip(stops, stops[1:]):
        if t <= b:
            f = 0.0 if b == a else (t - a) / (b - a)
            return tuple(int(x + (y - x) * f + 0.5) for x, y in zip(ca, cb))  # type: ignore
    return stops[-1][1]


def contrast(rgb: RGB) -> str:
    """Text colour on a cell: white on dark colours, plotly's ``#444`` on light ones."""
    r, g, b = rgb
    return "#ffffff" if (r * 299 + g * 587 + b * 114) / 1000 < 128 else "#444444"


# -- rich text ----------------------------------------------------------------------------

TAG = re.compile(r"<(/?)(b|i|em|strong|sub|sup|span)(\s[^<>]*)?>|<br\s*/?>", re.IGNORECASE)
COLOR_STYLE = re.compile(r"color\s*:\s*([^;'\"]+)")
TextRun = tuple[str, dict[str, Any]]


def lines_of(text: Any) -> list[list[TextRun]]:
    """Plotly's pseudo-HTML as lines of (text, style) runs; unknown tags stay literal."""
    lines: list[list[TextRun]] = [[]]
    stack: list[dict[str, Any]] = [{}]
    at = 0
    source = "" if text is None else str(text)
    for match in TAG.finditer(source):
        _add(lines[-1], source[at:match.start()], stack[-1])
        at = match.end()
        closing, name = match.group(1), (match.group(2) or "br").lower()
        if name == "br":
            lines.append([])
        elif closing:
            if len(stack) > 1:
                stack.pop()
        else:
            stack.append({**stack[-1], **_style(name, match.group(3) or "")})
    _add(lines[-1], source[at:], stack[-1])
    return lines


def _add(line: list[TextRun], text: str, style: dict[str, Any]) -> None:
    if text:
        line.append((html.unescape(text), dict(style)))


def _style(name: str, attributes: str) -> dict[str, Any]:
    if name in ("b", "strong"):
        return {"bold": True}
    if name in ("i", "em"):
        return {"italic": True}
    if name in ("sub", "sup"):
        return {"shift": name}
    color = COLOR_STYLE.search(attributes)
    return {"color": color.group(1).strip()} if color else {}


def plain(text: Any) -> str:
    """The text a reader sees, without markup (lines joined by spaces)."""
    return " ".join("".join(t for t, _ in line) for line in lines_of(text))


NARROW, WIDE = set("iljftr.,;:'|!()[]{} "), set("mwMW@%")


def char_em(ch: str) -> float:
    """Rough advance of one character in font sizes (Arial-like metrics)."""
    if ch in NARROW:
        return 0.3
    if ch in WIDE:
        return 0.85
    if ch.isupper():
        return 0.66
    if ord(ch) > 0x2e80:  # CJK and other full-width scripts
        return 1.0
    return 0.55


def line_width(line: list[TextRun], size: float) -> float:
    """Estimated width in px of one line of runs at font ``size``."""
    total = 0.0
    for text, style in line:
        scale = 0.7 if "shift" in style else 1.0
        em = sum(char_em(ch) for ch in text)
        total += em * size * scale * (1.08 if style.get("bold") else 1.0)
    return total


def text_width(text: Any, size: float) -> float:
    return max((line_width(line, size) for line in lines_of(text)), default=0.0)


def escape(text: str) -> str:
    return html.escape(text, quote=True)


def tspans(line: list[TextRun], size: float) -> str:
    """One line of runs as SVG ``<tspan>`` elements."""
    out = []
    for text, style in line:
        attrs = []
        if style.get("bold"):
            attrs.append('font-weight="bold"')
        if style.get("italic"):
            attrs.append('font-style="italic"')
        if style.get("color"):
            attrs.append(paint("fill", style["color"]))
        if style.get("shift"):
            attrs.append(f'font-size="{size * 0.7:.1f}"')
            attrs.append(f'baseline-shift="{"sub" if style["shift"] == "sub" else "super"}"')
        out.append(f"<tspan {' '.join(attrs)}>{escape(text)}</tspan>" if attrs else escape(text))
    return "".join(out)


def svg_text(text: Any, x: float, y: float, *, size: float, color: str = "#2a3f5f",
             anchor: str = "start", valign: str = "baseline", rotate: float = 0,
             line_gap: float = 1.3) -> str:
    """A (possibly multi-line) label. ``valign``: where ``y`` is: the first line's
    ``baseline``, the block's ``top``, ``middle`` or ``bottom``."""
    lines = [line for line in lines_of(text)]
    if not any(lines):
        return ""
    step = size * line_gap
    block = step * (len(lines) - 1)
    first = {"baseline": y, "top": y + size * 0.8, "middle": y + size * 0.35 - block / 2,
             "bottom": y - block - size * 0.25}[valign]
    transform = f' transform="rotate({rotate:g} {x:.1f} {y:.1f})"' if rotate else ""
    body = "".join(f'<tspan x="{x:.1f}" y="{first + i * step:.1f}">{tspans(line, size)}</tspan>'
                   for i, line in enumerate(lines))
    return (f'<text font-size="{size:g}" {paint("fill", color)} text-anchor="{anchor}"'
            f"{transform}>{body}</text>")


# -- numbers ------------------------------------------------------------------------------

FORMAT = re.compile(r"%\{(\w+)(?::([^}]*))?\}")


def fill_template(template: str, values: dict[str, Any]) -> str:
    """plotly's ``texttemplate``: ``%{text}``, ``%{z:.2f}`` (d3 formats plotly uses)."""
    def one(match: re.Match) -> str:
        value, spec = values.get(match.group(1), ""), match.group(2)
        if spec and isinstance(value, (int, float)):
            try:
                return format(value, spec.replace("~", "")).replace("-", MINUS)
            except ValueError:
                pass
        return str(value)

    return FORMAT.sub(one, template)


def nice_ticks(low: float, high: float, target: float) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low] if math.isfinite(low) else []
    ticks = _ticks(low, high, target)
    return ticks if len(ticks) >= 3 or target > 50 else nice_ticks(low, high, target * 2)


def _ticks(low: float, high: float, target: float) -> list[float]:
    raw = (high - low) / max(target, 1.0)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw * 0.999)
    first = math.ceil(low / step - 1e-9)
    ticks = []
    k = first
    while k * step <= high + step * 1e-9:
        ticks.append(round(k * step, 12))
        k += 1
    return ticks


def tick_label(value: float, ticks: Sequence[float]) -> str:
    """A tick label with the decimals its step needs, negative with a minus sign."""
    step = min((abs(b - a) for a, b in zip(ticks, ticks[1:])), default=abs(value) or 1.0)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    text = f"{value:.{decimals}f}"
    if float(text) == 0:
        text = text.lstrip("-")
    return text.replace("-", MINUS)
