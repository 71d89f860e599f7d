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

A Ctrl-C can land while Python runs code that cannot raise: a weakref callback (a published
tensor's provenance entry, a ``WeakKeyDictionary``), a ``__del__``, a ``gc`` callback, a
generator or a greenlet being finalized. These run wherever the garbage is freed (the cyclic
gc runs them at any allocation), and Python only prints what they raise ("Exception ignored
in ..."). While the handler is installed, such a ``KeyboardInterrupt`` is sent again (it
reaches ``sys.unraisablehook``), so it is raised at the next instant where it can propagate.
"""

from __future__ import annotations

import _thread
import functools
import signal
import sys
import threading
from types import CodeType, FrameType
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_SAFE: set[CodeType] = set()       # the marked functions' own code
_WRAPPERS: set[CodeType] = set()   # their wrappers' code
_state: dict[str, Any] = {"depth": 0, "previous": None, "pending": False,
                          "unraisable": None, "thread": None}
_resending: list[Any] = []         # a lock per Ctrl-C being sent again, released once sent


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
    if _in_resend(frame):  # raised here, it would be lost again
        _resend_soon()
        return
    if _in_safe_section(frame):
        _state["pending"] = True
        return
    _deliver(signum, frame)


def _resend_lost(unraisable: Any) -> None:
    """``sys.unraisablehook`` while the handler is installed: a ``KeyboardInterrupt`` that
    came out of code that cannot raise (a weakref callback, ``__del__``, a gc callback, a
    finalized generator or greenlet) is a Ctrl-C that Python would only print. It is sent
    again, and raised at the next instant where it can propagate (held, if that instant is
    in cleanup). Anything else goes to the hook that was there before."""
    kind = unraisable.exc_type
    if (kind is not None and issubclass(kind, KeyboardInterrupt) and _state["depth"]
            and _thread.get_ident() == _state["thread"]):
        _resend_soon()
        return
    previous = _state["unraisable"] or sys.__unraisablehook__
    previous(unraisable)


def _resend_soon() -> None:
    """SIGINT again, from a thread of its own: it can only trip the signal once this thread
    lets go of the GIL, so the handler runs after the hook has returned (sent from here, it
    would run at once, still inside the hook, where it cannot raise either). The outermost
    :class:`holding` waits for it before it ends, so it is raised inside the block."""
    sent = _thread.allocate_lock()
    sent.acquire()
    _resending.append(sent)
    _thread.start_new_thread(_send_again, (sent,))


def _send_again(sent: Any) -> None:
    try:
        _thread.interrupt_main(signal.SIGINT)
    finally:
        sent.release()


def _in_resend(frame: FrameType | None) -> bool:
    """True inside :func:`_resend_lost` (or what it calls): it runs where nothing can raise."""
    while frame is not None:
        if frame.f_code is _resend_lost.__code__:
            return True
        frame = frame.f_back
    return False


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
                signal.signal(signal.SIGINT, _handler)  # may raise a Ctrl-C sent before it
                _state["unraisable"] = sys.unraisablehook
                _state["thread"] = _thread.get_ident()
                sys.unraisablehook = _resend_lost
            _state["depth"] += 1
            self.installed = True
        return self

    @uninterruptible
    def __exit__(self, *exc: Any) -> None:
        if not self.installed:
            return
        self.installed = False
        if _state["depth"] == 1:
            while _resending:  # a Ctrl-C sent again is handled here (held), not after
                _resending.pop().acquire()
        _state["depth"] -= 1
        if _state["depth"] == 0:
            if sys.unraisablehook is _resend_lost:  # a hook set after ours stays
                sys.unraisablehook = _state["unraisable"] or sys.__unraisablehook__
            _state["unraisable"] = None
            previous = _state["previous"]
            signal.signal(signal.SIGINT,
                          previous if previous is not None else signal.default_int_handler)
            _state["previous"] = None

