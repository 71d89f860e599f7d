"""Evaluating the Python expressions on a magic line, in the notebook's own namespace."""

from __future__ import annotations

from collections import ChainMap
from typing import Any, Mapping

from IPython.core.error import UsageError


def evaluate(shell: Any, expr: str, role: str, magic: str,
             helpers: Mapping[str, Any] | None = None) -> Any:
    """``expr`` evaluated as if typed in a cell: globals are the notebook's namespace itself
    (never a copy, so a ``lambda`` sees later rebindings and keeps nothing else alive).
    ``helpers`` fill in names the notebook does not define, at the top level of ``expr``
    only (inside a ``lambda`` names are the notebook's, as in a cell). A failure is a
    one-line UsageError.

    >>> from types import SimpleNamespace
    >>> ns = {"x": 2}
    >>> shell = SimpleNamespace(user_ns=ns, user_global_ns=ns)
    >>> f = evaluate(shell, "lambda y: x * y", "--metric", "%patch_sweep")
    >>> f.__globals__ is ns, f(3)
    (True, 6)
    >>> evaluate(shell, "double(x)", "--metric", "%patch_sweep", {"double": lambda v: 2 * v})
    4
    """
    scope = shell.user_ns
    if helpers:
        scope = ChainMap(shell.user_ns, shell.user_global_ns, helpers)
    try:
        return eval(expr, shell.user_global_ns, scope)
    except Exception as exc:
        raise UsageError(f"{magic}: {role} `{expr}` failed: {type(exc).__name__}: {exc}") from None
