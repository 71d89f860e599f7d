"""Make live plotly figures fill the width of their output area, and follow it.

plotly's FigureWidget lays itself out when it first draws, before JupyterLab has given its
output area a width, and falls back to plotly's default of 700 px; it only re-measures on a
window ``resize`` event. ``FitWidth`` is an invisible widget placed in a view's box: when
the box changes size, or a plotly widget has just drawn, it sends that event (at most once a
frame), so every figure without a fixed width re-measures its container.

>>> widgets.VBox([figure, FitWidth(), sliders])      # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import anywidget

CONFIG = {"responsive": True, "displaylogo": False, "doubleClick": False}
_ESM = """
export default {
  render({ el }) {
    let queued = false;
    const kick = () => {
      if (queued) return;
      queued = true;
      requestAnimationFrame(() => { queued = false; window.dispatchEvent(new Event("resize")); });
    };
    const observer = new ResizeObserver(kick);
    let box = null;
    const watch = () => {
      box = el.closest(".widget-vbox") || el.parentElement;
      if (box) observer.observe(box); else requestAnimationFrame(watch);
    };
    requestAnimationFrame(watch);
    document.addEventListener("plotlywidget-after-render", kick);
    return () => {
      observer.disconnect();
      document.removeEventListener("plotlywidget-after-render", kick);
    };
  }
};
"""


class FitWidth(anywidget.AnyWidget):
    """Invisible; re-measures the plotly figures of the box it is in (see module doc)."""

    _esm = _ESM


def responsive(figure: Any) -> Any:
    """A FigureWidget that re-measures its container on window ``resize`` events (plotly.js
    ``responsive``; the widget's own listener is not attached under every front end).
    A double click does not autoscale the axes: two quick clicks on two cells are two
    selections, and the grid keeps its fixed ranges (the mode bar still resets a zoom)."""
    figure._config = {**figure._config, **CONFIG}
    return figure
