"""What is running now: the trace whose sites a cell talks to, and the hook scope whose hooks
may act.

Both are ``ContextVar``s, not module globals, so each greenlet of a trace, a sweep started
inside a ``%%trace`` cell and an ad hoc module call see their own:

>>> current_trace() is None
True
>>> with hook_scope(("a sweep",)):
...     current_scope()
('a sweep',)
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from ipy_intervene.errors import InterventionError
from ipy_intervene.infra.interrupts import entering, uninterruptible

_trace: ContextVar[Any] = ContextVar("ipy_intervene_trace", default=None)
_scope: ContextVar[tuple] = ContextVar("ipy_intervene_hook_scope", default=())


def current_trace() -> Any:
    """The trace running in this context, or None."""
    return _trace.get()


def require_trace(what: str) -> Any:
    """The running trace; a clear error when a site is used outside one."""
    run = _trace.get()
    if run is None:
        raise InterventionError(f"`{what}` is only available inside a %%trace cell (or "
                                "ii.trace): outside one, no forward is running")
    return run


class _Setting:
    """Sets a ContextVar for a ``with`` block; the reset is not cut short by Ctrl-C."""

    def __init__(self, var: ContextVar[Any], value: Any) -> None:
        self.var, self.value, self.token = var, value, None

    @entering
    def __enter__(self) -> None:
        self.token = self.var.set(self.value)

    @uninterruptible
    def __exit__(self, *exc: Any) -> None:
        if self.token is not None:
            self.var.reset(self.token)
            self.token = None


def tracing(run: Any) -> _Setting:
    """Make ``run`` the trace of this context for the ``with`` block."""
    return _Setting(_trace, run)


def current_scope() -> tuple:
    """The hook sessions whose hooks may act in this context (innermost last)."""
    return _scope.get()


def hook_scope(sessions: tuple) -> _Setting:
    """Only ``sessions``' hooks act inside the block; ``hook_scope(())``: none of ours do."""
    return _Setting(_scope, sessions)
