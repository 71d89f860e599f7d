"""A cell runs in the notebook's own namespace; a failing cell is undone.

There is no private copy of the namespace: functions a cell defines see later globals, and a
helper's ``global`` writes stay. Atomicity comes from an undo of the cell's own bindings:
before the run, :class:`Bindings` remembers every name the cell's code could bind (found by
``symtable``: assignments, imports, ``def``/``class``, loop and ``with`` targets, ``del``,
walrus targets, and names its own functions declare ``global``); if the cell fails, each is
put back exactly as it was. What a function *defined elsewhere* writes with ``global`` is
that function's business.

>>> ns = {"keep": 1}
>>> undo = Bindings(ns, bound_names("keep = 2\\nnew = 3"))
>>> ns.update(keep=2, new=3); undo.restore(); ns
{'keep': 1}
"""

from __future__ import annotations

import functools
import symtable
from typing import Any

from ipy_intervene.infra.interrupts import uninterruptible

_ABSENT = object()
#: names Python's ``exec`` adds to a namespace it runs code in
EXEC_NAMES = ("__builtins__",)


@functools.lru_cache(maxsize=256)
def bound_names(source: str, filename: str = "<cell>") -> frozenset[str]:
    """Every global name the code of ``source`` can bind or delete."""
    table = symtable.symtable(source, filename, "exec")
    names = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}
    todo = list(table.get_children())
    while todo:
        child = todo.pop()
        names |= {s.get_name() for s in child.get_symbols()
                  if s.is_declared_global() and s.is_assigned()}
        todo.extend(child.get_children())
    return frozenset(names)


class Bindings:
    """The values ``names`` have in ``ns`` now, to publish changes or to undo them."""

    def __init__(self, ns: dict, names: frozenset[str] | set[str]) -> None:
        self.ns = ns
        self.before = {name: ns.get(name, _ABSENT) for name in (*names, *EXEC_NAMES)}

    def changed(self) -> dict[str, Any]:
        """The names now bound to a different object than before (new names included)."""
        return {name: self.ns[name] for name, old in self.before.items()
                if name not in EXEC_NAMES and name in self.ns and self.ns[name] is not old}

    @uninterruptible
    def restore(self) -> None:
        """Put every remembered name back as it was (deleting names that were absent)."""
        for name, old in self.before.items():
            if old is _ABSENT:
                self.ns.pop(name, None)
            elif self.ns.get(name, _ABSENT) is not old:
                self.ns[name] = old
