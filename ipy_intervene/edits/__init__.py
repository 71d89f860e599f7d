"""Edits that last: a trace cell applied at every later forward of a model.

Layer: above ``features``, ``analysis``, ``tracing``, ``runtime`` and ``compiler`` (an edit is a
compiled cell run by the trace runtime, on a model that may hold splices); below ``sweep``
(whose memo keys each edit set) and ``magics`` (``%%trace --edit``). :mod:`.clone` makes the
edited model, :mod:`.run` one run of the cell, :mod:`.hooks` the lasting hooks, :mod:`.api`
``ii.edit``, ``ii.edits``, ``ii.clear_edits``.
"""

from ipy_intervene.edits.api import Edit, clear_edits, edit, edits

__all__ = ["Edit", "clear_edits", "edit", "edits"]
