"""Tick labels that are cut only when there is no room: a grid of a prompt's few tokens shows
each label whole (``<|endoftext|> (0)``), a long prompt's many labels are cut as
:mod:`ipy_intervene.widgets.heatmap` cuts them.

>>> cut("<|endoftext|> (0)", chars(["<|endoftext|> (0)", "When (1)"]))
'<|endoftext|> (0)'
"""

from __future__ import annotations

from typing import Any, Sequence

from ipy_intervene.widgets import heatmap as grid

ROOMY_COUNT = 24      # up to this many labels on an axis, each may take ROOMY_CHARS
ROOMY_CHARS = 24


def chars(labels: Sequence[str]) -> int:
    """How many characters a label of this axis may show."""
    return ROOMY_CHARS if len(labels) <= ROOMY_COUNT else grid.LABEL_CHARS


def cut(label: str, n: int) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def tick_angle(labels: Sequence[str]) -> int:
    n = chars(labels)
    return 0 if sum(len(cut(l, n)) + 2 for l in labels) * 7 < 360 else -90


def bottom_margin(labels: Sequence[str]) -> int:
    """Room under the x axis for its tick labels and title."""
    if tick_angle(labels) == 0:
        return 64
    n = chars(labels)
    return 44 + int(max((len(cut(l, n)) for l in labels), default=1) * grid.FONT_PX * 0.62)


def left_margin(labels: Sequence[str]) -> int:
    """Room left of a y axis whose labels stay level."""
    n = chars(labels)
    return 24 + int(max((len(cut(l, n)) for l in labels), default=1) * grid.FONT_PX * 0.62)


def tick_text(labels: Sequence[str], *, selected: int | None = None) -> tuple[list[str],
                                                                              list[str]]:
    """Every label, cut at :func:`chars`, the selected one bold (many labels: the shared
    rule of :func:`ipy_intervene.widgets.heatmap.tick_text`)."""
    if len(labels) > ROOMY_COUNT:
        return grid.tick_text(labels, selected=selected)
    n = chars(labels)
    text = [cut(l, n).replace("<", "&lt;") for l in labels]
    if selected is not None:
        text[selected] = f"<b>{text[selected]}</b>"
    return list(labels), text


def axis(labels: Sequence[str], *, title: str, selected: int | None = None,
         order: Sequence[str] | None = None) -> dict[str, Any]:
    """A category axis like :func:`~ipy_intervene.widgets.heatmap.category_axis` with roomy
    labels; ``order``: the categories from the axis start (default: ``labels``)."""
    spec = grid.category_axis(order or labels, title=title)
    vals, text = tick_text(labels, selected=selected)
    spec.update(tickvals=vals, ticktext=text, tickangle=tick_angle(labels))
    return spec
