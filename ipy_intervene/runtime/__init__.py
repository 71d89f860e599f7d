"""The run side of a trace, in rooms: :mod:`.access` (what read, assign, in-place edit and
skip do to a site's value), :mod:`.scheduler` (greenlets, requests, serving, unreached
sites), :mod:`.hooks` (the trace's hooks on the shared hook layer), :mod:`.facade` (``__ii__``
and ``tracer``, what the rewritten cell calls) and :mod:`.run` (the run itself)."""

from ipy_intervene.runtime.run import NO_INPUT, Outcome, run_cell

__all__ = ["NO_INPUT", "Outcome", "run_cell"]
