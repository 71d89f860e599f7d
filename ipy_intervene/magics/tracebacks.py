"""Short tracebacks for the magics: the user's line and our message, internals hidden.

A failing ``%%trace`` cell used to print 26-105 lines through the runtime, torch and
transformers. IPython renders an exception with a ``_render_traceback_`` method by calling it
(as ipyparallel's remote errors do), so the magics attach one that shows the line of the cell
that failed (numbered as in the editor, the magic line being line 1) and the message with its
notes. ``ii.debug(True)`` (or ``IPY_INTERVENE_DEBUG=1``) brings back the full traceback.

>>> ii.debug(True)       # full tracebacks, internal frames included     # doctest: +SKIP
"""

from __future__ import annotations

import linecache
import os
import traceback
from typing import Any

from ipy_intervene.errors import cell_line

_debug = os.environ.get("IPY_INTERVENE_DEBUG", "") not in ("", "0")
HINT = "(ii.debug(True) shows the full traceback)"


def debug(on: bool = True) -> None:
    """Show full tracebacks, internal frames included, for errors raised by the magics.

    >>> ii.debug(True)        # doctest: +SKIP
    """
    global _debug
    _debug = bool(on)


def shorten(exc: BaseException, filename: str | None, title: str) -> None:
    """Attach a short rendering to ``exc`` (unless debugging): ``title``, the line of
    ``filename`` that failed (when the traceback or the error knows it) and the message."""
    if _debug:
        return
    lines = render(exc, filename, title)
    try:
        exc._render_traceback_ = lambda: lines  # type: ignore[attr-defined]
    except (AttributeError, TypeError):  # an exception type without a __dict__: full traceback
        pass


def render(exc: BaseException, filename: str | None, title: str) -> list[str]:
    """The lines IPython shows for ``exc``: where, the source line, type and message."""
    out = []
    line = _failing_line(exc, filename)
    if line is not None and filename is not None:
        out.append(f"{title}, line {line}")
        text = linecache.getline(filename, line).rstrip()
        if text:
            out.append(f"----> {line} {text.strip()}")
    out.extend(traceback.format_exception_only(type(exc), exc))
    out.append(HINT)
    return [part.rstrip("\n") for part in out]


def _failing_line(exc: BaseException, filename: str | None) -> int | None:
    """The error's own line, else the last frame of the cell in its traceback."""
    line = getattr(exc, "line", None)
    if isinstance(line, int):
        return line
    return None if filename is None else cell_line(exc, filename)


def title_of(shell: Any) -> str:
    """``Cell In[7]``, as IPython names the cell being run."""
    return f"Cell In[{getattr(shell, 'execution_count', '?')}]"
