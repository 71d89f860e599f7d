"""Cleanup that a Ctrl-C cannot cut in half.

A function marked :func:`uninterruptible` runs to its end even when SIGINT arrives while it
(or anything it calls) runs: the signal is held and delivered as ``KeyboardInterrupt`` when
the outermost such function returns. The handler decides by looking at the interrupted
frame's stack, so there is no window between "cleanup starts" and "signals are held".

>>> @uninterruptible
... def remove_all(handles):
...     for handle in handles:
...         handle.remove()

:class:`holding` installs the handler for a block (on the main thread; elsewhere SIGINT is
never delivered, so there is nothing to hold).
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
from types import CodeType, FrameType
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_SAFE: set[CodeType] = set()       # the marked functions' own code
_WRAPPERS: set[CodeType] = set()   # their wrappers' code
_state = {"depth": 0, "previous": None, "pending": False}


def uninterruptible(fn: F) -> F:
    """Mark ``fn`` as cleanup: a SIGINT during it is delivered after it returns."""

    @functools.wraps(fn)
    def run_whole(*args: Any, **kwargs: Any) -> Any:
        finishing = False
        try:
            return fn(*args, **kwargs)
        finally:
            finishing = True  # noqa: F841 - read by the handler through the frame
            _deliver_if_outermost()

    _SAFE.add(fn.__code__)
    _WRAPPERS.add(run_whole.__code__)
    return run_whole  # type: ignore[return-value]


def entering(fn: F) -> F:
    """Mark an ``__enter__`` as uninterruptible. A ``with`` statement does not call
    ``__exit__`` when ``__enter__`` raises, so a Ctrl-C held while entering first undoes the
    entering (``self.__exit__()``) and is raised after; one that arrives in the last
    instants of entering stays held until the next cleanup ends."""

    @functools.wraps(fn)
    def enter(self: Any) -> Any:
        result = fn(self)
        caller = sys._getframe(1)
        if _state["pending"] and not _in_safe_section(caller):
            self.__exit__(None, None, None)
            _deliver(signal.SIGINT, caller)
        return result

    _SAFE.add(fn.__code__)
    _SAFE.add(enter.__code__)
    return enter  # type: ignore[return-value]


def _in_safe_section(frame: FrameType | None) -> bool:
    """True while cleanup runs: a marked function's own frame, or its wrapper's before the
    function has returned (after that, a signal is delivered at once: nothing is left)."""
    while frame is not None:
        code = frame.f_code
        if code in _SAFE or (code in _WRAPPERS and not frame.f_locals.get("finishing")):
            return True
        frame = frame.f_back
    return False


def _deliver_if_outermost() -> None:
    caller = sys._getframe(2)  # the frame that called the wrapper
    if _state["pending"] and not _in_safe_section(caller):
        _deliver(signal.SIGINT, caller)


def _deliver(signum: int, frame: FrameType | None) -> None:
    _state["pending"] = False  # one KeyboardInterrupt for however many held signals
    previous = _state["previous"] if _state["depth"] else signal.getsignal(signal.SIGINT)
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        raise KeyboardInterrupt


def _handler(signum: int, frame: FrameType | None) -> None:
    if _in_safe_section(frame):
        _state["pending"] = True
        return
    _deliver(signum, frame)


class holding:
    """Install the holding SIGINT handler for a ``with`` block (nested blocks share it).

    Off the main thread it does nothing: SIGINT is only ever delivered on the main thread.
    """

    def __init__(self) -> None:
        self.installed = False

    @entering
    def __enter__(self) -> "holding":
        if threading.current_thread() is threading.main_thread() and not self.installed:
            if _state["depth"] == 0:
                _state["previous"] = signal.getsignal(signal.SIGINT)
                signal.signal(signal.SIGINT, _handler)
            _state["depth"] += 1
            self.installed = True
        return self

    @uninterruptible
    def __exit__(self, *exc: Any) -> None:
        if not self.installed:
            return
        self.installed = False
        _state["depth"] -= 1
        if _state["depth"] == 0:
            previous = _state["previous"]
            signal.signal(signal.SIGINT,
                          previous if previous is not None else signal.default_int_handler)
            _state["previous"] = None

